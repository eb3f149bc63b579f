#!/usr/bin/env bash
# Convert Phi-3-mini-4k-instruct from the Hugging Face Hub to a 4-bit MLX folder, then chat with it.
set -euo pipefail
phi3mlx convert --hf-path microsoft/Phi-3-mini-4k-instruct --mlx-path phi3-mini-4k-q4 -q --q-bits 4 --q-group-size 64
phi3mlx bench --model phi3-mini-4k-q4 --compare-mlx-lm
phi3mlx chat --model phi3-mini-4k-q4 --system "You are a concise assistant."
