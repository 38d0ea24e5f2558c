"""Evaluation: the `evaluate` command, the evaluation actor, metrics, decoding presets, evaluation
during training.  Kept light on import (the config module imports `evaluation.config`)."""
