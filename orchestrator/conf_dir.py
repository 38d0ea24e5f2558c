"""Where the Hydra configs are: conf/ of the source tree, or the copy a non-editable install carries."""

from __future__ import annotations

from pathlib import Path


def _conf_dir() -> Path:
    source = Path(__file__).resolve().parents[1] / "conf"
    if (source / "config.yaml").is_file():  # a source checkout or an editable install
        return source
    from importlib.util import find_spec

    spec = find_spec("seqfoundry_conf")  # a wheel: pyproject maps conf/ to this data-only (namespace) package
    if spec is None or not spec.submodule_search_locations:
        return source  # neither: compose_config will say that conf/ is missing
    return Path(next(iter(spec.submodule_search_locations)))


CONF_DIR = _conf_dir()
