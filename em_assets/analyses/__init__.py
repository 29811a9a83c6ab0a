"""Analyses over organisms: model-variant sweeps (checkpoints, LoRA scaling, steering) and their statistics."""
