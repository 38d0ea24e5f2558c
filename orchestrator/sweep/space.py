"""The search space of `seqfoundry sweep`, as written in `conf/sweep/*.yaml`.

    space:
      trainer:
        lr: [loguniform, 1.0e-5, 1.0e-3]
        warmup_steps: [choice, 0, 100, 500]
      model:
        dropout: [uniform, 0.0, 0.3]

Every leaf is one *domain* over a config key (the nested path, `trainer.lr`):
a list that starts with the domain's name. Lists, unlike mappings, are replaced
whole by a Hydra override (`sweep.space.trainer.lr=[grid,1e-4,1e-3]`).
This module parses and checks the space without importing Ray (the config
slice validates it); `Domain.to_tune` builds the Ray Tune object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

RANGES = ("uniform", "loguniform", "randint")
"""Domains over an interval `[low, high]` (`randint`: integers, high excluded)."""
SETS = ("choice", "grid")
"""Domains over listed values: `choice` samples one per trial, `grid` runs every value."""
DOMAINS = RANGES + SETS


@dataclass(frozen=True)
class Domain:
    key: str
    """Dotted config key (`trainer.lr`)."""
    kind: str
    """One of DOMAINS."""
    values: tuple
    """(low, high) for ranges; the listed values for choice/grid."""

    def candidates(self) -> tuple:
        """Values a trial may take that bound the domain (checked before any trial runs)."""
        if self.kind == "randint":
            return (self.values[0], self.values[1] - 1)
        return self.values

    def grid_size(self, *, search: str = "random") -> int:
        return len(self.values) if self.kind == "grid" or (search == "grid" and self.kind == "choice") else 1

    def to_tune(self, *, search: str = "random"):
        """The Tune domain; with `sweep.search=grid` a `choice` is searched as a grid."""
        from ray import tune

        if self.kind == "grid" or (search == "grid" and self.kind == "choice"):
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.kind)(*self.values)


def parse_space(space: Mapping[str, Any], prefix: str = "") -> list[Domain]:
    """The domains of a nested space, in order (ValueError naming `sweep.space.<key>`)."""
    domains: list[Domain] = []
    for name, node in space.items():
        key = f"{prefix}{name}"
        if isinstance(node, (list, tuple)) and node and node[0] in DOMAINS:
            domains.append(_domain(key, node[0], tuple(node[1:])))
        elif isinstance(node, Mapping) and node:
            domains.extend(parse_space(node, f"{key}."))
        else:
            raise ValueError(f"sweep.space.{key}: must be a domain such as [loguniform, 1e-5, 1e-3] or "
                             f"[choice, a, b] (domains: {', '.join(DOMAINS)}), got {node!r}")
    return domains


def _domain(key: str, kind: str, values: tuple) -> Domain:
    where = f"sweep.space.{key}"
    if kind in SETS:
        if not values:
            raise ValueError(f"{where}: [{kind}, ...] needs at least one value")
        return Domain(key, kind, values)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{where}: needs [{kind}, low, high] with numbers, got {[kind, *values]}")
    low, high = values
    if not low < high:
        raise ValueError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{where}: loguniform needs 0 < low, got {low}")
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise ValueError(f"{where}: randint needs integer bounds, got [{low}, {high}]")
    if kind == "randint":
        values = (int(low), int(high))
    return Domain(key, kind, values)


def num_trials(domains: list[Domain], num_samples: int, *, search: str = "random") -> int:
    """Tune runs the whole grid once per sample."""
    return num_samples * math.prod(d.grid_size(search=search) for d in domains)


def check_search(domains: list[Domain], search: str) -> None:
    """Domains the search cannot use (ValueError naming `sweep.space.<key>`)."""
    for d in domains:
        if search == "grid" and d.kind in RANGES:
            raise ValueError(f"sweep.space.{d.key}: sweep.search=grid needs listed values ([choice, ...] or "
                             f"[grid, ...]), not a {d.kind} range")
        if search == "optuna" and d.kind == "grid":
            raise ValueError(f"sweep.space.{d.key}: sweep.search=optuna samples every domain; use [choice, ...] "
                             "instead of [grid, ...] (or sweep.search=random)")


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"trainer.lr": x} -> {"trainer": {"lr": x}} (Tune's param_space)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"trainer": {"lr": x}} -> {"trainer.lr": x}, with NumPy scalars made plain Python."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value.item() if hasattr(value, "item") else value
    return out
