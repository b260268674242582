"""Evaluation of trained checkpoints: log-likelihood scoring (`lm.py`)."""
