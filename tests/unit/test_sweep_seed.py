"""`sweep.seed`: the search samples the same trials again (and other ones with another seed)."""

from __future__ import annotations

from orchestrator.config import compose_config, to_typed
from orchestrator.sweep.command import search_algorithm
from orchestrator.sweep.space import nest, parse_space


def sampled(seed: int | None, preset: str = "default") -> list[dict]:
    """The trial configs Tune's search hands out for the preset's space."""
    sweep = to_typed(compose_config([f"sweep={preset}"])).sweep
    space = nest({d.key: d.to_tune() for d in parse_space(sweep.space)})
    alg = search_algorithm(seed, max_concurrent=0)
    alg.add_configurations({"sweep": {"run": lambda config: None, "config": space,
                                      "num_samples": sweep.num_samples}})
    trials = []
    while (trial := alg.next_trial()) is not None:
        trials.append(trial.config)
    return trials


def test_the_same_seed_samples_the_same_trials():
    first = sampled(3)
    assert len(first) >= 2 and first == sampled(3)


def test_another_seed_or_none_samples_other_trials():
    assert sampled(3) != sampled(4)
    assert sampled(None) != sampled(None)


def test_the_default_seed_is_fixed():
    assert to_typed(compose_config(["sweep=default"])).sweep.seed == 0
