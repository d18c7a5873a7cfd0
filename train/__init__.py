"""Training: data, optimizers, the pretrain/SFT/GRPO/distill/RM steps and `python -m train`."""
