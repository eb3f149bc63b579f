"""Phi-3.5-MoE parts (model_type "phimoe"): to be implemented."""
