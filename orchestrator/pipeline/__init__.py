"""The `pipeline` command: prepare -> pretrain -> sweep -> evaluate with a lineage record.
Kept light on import (the config module imports `pipeline.config`)."""
