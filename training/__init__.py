"""Training: episode sampler, stage 1 (condition encoder + decoder), stage 2 (multimodal encoder),
VLSM baseline fine-tuning; one accelerate loop with DeepSpeed configs."""
