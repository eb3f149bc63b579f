"""Phi-3-small parts (model_type "phi3small"): to be implemented."""
