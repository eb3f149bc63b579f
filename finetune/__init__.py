"""Fine-tuning and pretraining for phi3mlx models (installed as ``phi3mlx.finetune``)."""
