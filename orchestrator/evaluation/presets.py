"""Named decoding strategies for evaluation: a preset of `conf/decoding/`
(`greedy`, `beam`, `sample`) plus optional inline overrides.

    greedy
    beam:beam_size=10,length_penalty=0.6,no_repeat_ngram_size=3
    sample:top_k=20,temperature=0.7,seed=1

An entry may end with `@<engine>` or `@<engine>/<compute_type>` to decode with
another engine than `eval.engine` (`greedy@ctranslate2/int8`), so that one table
compares engines on the same package.

The entry, as written, is the strategy's name in tables and results.  The
length limits of the job's `decoding` slice (`max_len`, `max_len_a`,
`max_len_b`, `min_len`) apply to every strategy unless its entry sets them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from trainers.decoding import DecodingConfig
from trainers.engines import check_engine_keys

from ..conf_dir import CONF_DIR

PRESET_DIR = CONF_DIR / "decoding"
SHARED_KEYS = ("max_len", "max_len_a", "max_len_b", "min_len")
"""Keys every strategy takes from the job's `decoding` slice (an entry may still set them)."""


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def split_engine(entry: str) -> tuple[str, str | None, str | None]:
    """`beam:beam_size=4@ctranslate2/int8` -> ("beam:beam_size=4", "ctranslate2", "int8"); no suffix -> None, None."""
    decoding, at, engine = str(entry).strip().rpartition("@")
    if not at:
        return engine, None, None
    name, _, compute_type = engine.partition("/")
    try:
        check_engine_keys(name, compute_type or "float32", key="eval.strategies")
    except ValueError as err:
        raise ValueError(f"eval.strategies: {entry!r}: {str(err).removeprefix('eval.strategies.')}") from None
    return decoding, name, compute_type or None


def strategy_engines(entries: list[str], *, engine: str = "torch",
                     compute_type: str = "float32") -> dict[str, tuple[str, str]]:
    """Each entry's (engine, compute_type): its `@` suffix, else `eval.engine`/`eval.compute_type`
    (a suffix naming only the engine takes float32 for torch and `compute_type` otherwise)."""
    out = {}
    for entry in entries:
        _, name, ctype = split_engine(entry)
        name = name or engine
        out[str(entry).strip()] = (name, ctype or (compute_type if name == engine else "float32"))
    return out


def parse_entry(entry: str) -> tuple[str, dict]:
    """`beam:beam_size=4,length_penalty=0.6` -> ("beam", {"beam_size": 4, "length_penalty": 0.6})."""
    name, _, rest = split_engine(entry)[0].partition(":")
    overrides = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"eval.strategies: {entry!r}: expected key=value, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value.strip()) if value.strip() else None
    return name.strip(), overrides


def preset(name: str) -> dict:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no decoding preset {name!r} in conf/decoding (have {', '.join(preset_names())})")
    return OmegaConf.to_container(OmegaConf.load(path)) or {}


def strategy_config(entry: str, base: DecodingConfig | None = None) -> DecodingConfig:
    """DecodingConfig of one entry: defaults <- the base's length limits <- preset <- inline overrides."""
    name, overrides = parse_entry(entry)
    known = {f.name for f in dataclasses.fields(DecodingConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"eval.strategies: {entry!r}: no decoding key {unknown[0]!r}")
    shared = {k: getattr(base, k) for k in SHARED_KEYS} if base is not None else {}
    try:
        return DecodingConfig(**{**shared, **preset(name), **overrides})
    except (TypeError, ValueError) as err:
        raise ValueError(f"eval.strategies: {entry!r}: {err}") from None


def strategy_configs(entries: list[str], base: DecodingConfig | None = None) -> dict[str, DecodingConfig]:
    """Every entry's DecodingConfig, by entry (ValueError naming `eval.strategies` on a bad one)."""
    if not entries:
        raise ValueError("eval.strategies: must list at least one strategy")
    names = [str(e).strip() for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"eval.strategies: duplicate entries in {names}")
    return {name: strategy_config(name, base) for name in names}
