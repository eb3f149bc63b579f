"""phi3mlx: run, convert, quantize and chat with Phi-3 family models on Apple silicon with MLX.

Public API::

    from phi3mlx import load, generate, stream_generate
    model, tokenizer = load("path/or/hub-id")
    print(generate(model, tokenizer, "Hello", max_tokens=32))

    # vision models (phi3_v): load gives the processor, which is also the text tokenizer
    model, processor = load("path/to/phi-3.5-vision")
    print(generate(model, processor, prompt_with_image_1_placeholder, images=["photo.jpg"]))
"""

from .errors import Phi3MLXError
from .generate import generate, stream_generate
from .loader import load

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "Phi3MLXError", "__version__"]
