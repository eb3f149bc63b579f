"""Checkpoint conversion between Hugging Face and MLX folders (installed as ``phi3mlx.convert``)."""
