"""python -m phi3mlx: the same as the phi3mlx command."""

import sys

from .cli import main

sys.exit(main())
