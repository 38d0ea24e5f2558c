"""Fine-tuning sweeps with Ray Tune: the `sweep` command (driver), its search space and one trial.
Kept light on import (the config module imports `sweep.config`)."""
