"""Stream a chat answer with the Python API.

    python examples/generate_api.py                       # built-in tiny model (random weights)
    python examples/generate_api.py --model phi3-mini-4k-q4
"""

import argparse

from phi3mlx import load, stream_generate

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="phi3mlx:tiny")
parser.add_argument("--prompt", default="Explain LongRoPE in one sentence.")
args = parser.parse_args()

model, tokenizer = load(args.model)
prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
last = None
for last in stream_generate(model, tokenizer, prompt, max_tokens=128, temperature=0.0):
    print(last.text, end="", flush=True)
print(f"\n[{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s, finish: {last.finish_reason}]")
