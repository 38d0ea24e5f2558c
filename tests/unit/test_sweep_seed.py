"""`sweep.seed`: the search samples the same trials again (and other ones with another seed), for
Tune's variant generator and for Optuna's TPE through Ray Tune's OptunaSearch (`sweep.search`)."""

from __future__ import annotations

import pytest

from orchestrator.config import compose_config, to_typed
from orchestrator.sweep.command import search_algorithm
from orchestrator.sweep.space import nest, parse_space


def sampled(seed: int | None, preset: str = "default") -> list[dict]:
    """The trial configs Tune's search hands out for the preset's space."""
    sweep = to_typed(compose_config([f"sweep={preset}"])).sweep
    space = nest({d.key: d.to_tune() for d in parse_space(sweep.space)})
    alg = search_algorithm(sweep.__class__(**{**sweep.__dict__, "seed": seed}), max_concurrent=0)
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


def optuna_suggestions(seed: int, n: int = 4) -> list[dict]:
    """What OptunaSearch suggests for the default space when every trial reports a loss in turn."""
    pytest.importorskip("optuna")
    sweep = to_typed(compose_config(["sweep=default", "sweep.search=optuna", f"sweep.seed={seed}"])).sweep
    alg = search_algorithm(sweep, max_concurrent=1)
    alg.set_search_properties(metric="val_loss", mode="min",
                              config=nest({d.key: d.to_tune(search="optuna") for d in parse_space(sweep.space)}))
    suggested = []
    for i in range(n):
        suggested.append(alg.suggest(f"t{i}"))
        alg.on_trial_complete(f"t{i}", {"val_loss": 1.0 / (i + 1)})
    return suggested


def test_optuna_search_is_seeded_and_reproducible():
    first = optuna_suggestions(5)
    assert all(c["trainer"]["lr"] > 0 for c in first) and len({c["trainer"]["lr"] for c in first}) == 4
    assert first == optuna_suggestions(5)
    assert first != optuna_suggestions(6)


def test_grid_search_runs_every_choice_and_refuses_ranges():
    from orchestrator.config import ConfigError
    from orchestrator.sweep.space import num_trials

    sweep = to_typed(compose_config(["sweep=tiny", "sweep.search=grid", "sweep.num_samples=1",
                                     "sweep.space.trainer.lr=[choice,1e-4,1e-3]"])).sweep
    assert num_trials(parse_space(sweep.space), sweep.num_samples, search="grid") == 8  # 2 lr x 2 freeze x 2 dropout
    assert len(sampled_with(sweep)) == 8
    with pytest.raises(ConfigError, match="sweep.space.trainer.lr: sweep.search=grid needs listed values"):
        to_typed(compose_config(["sweep=tiny", "sweep.search=grid"]))
    with pytest.raises(ConfigError, match="sweep.space.trainer.lr: sweep.search=optuna samples every domain"):
        to_typed(compose_config(["sweep=tiny", "sweep.search=optuna", "sweep.space.trainer.lr=[grid,1e-4,1e-3]"]))


def sampled_with(sweep) -> list[dict]:
    space = nest({d.key: d.to_tune(search=sweep.search) for d in parse_space(sweep.space)})
    alg = search_algorithm(sweep, max_concurrent=0)
    alg.add_configurations({"sweep": {"run": lambda config: None, "config": space, "num_samples": sweep.num_samples}})
    trials = []
    while (trial := alg.next_trial()) is not None:
        trials.append(trial.config)
    return trials


def test_bleu_and_chrf_are_maximised_by_default():
    for metric, mode in (("val_bleu", "max"), ("val_chrf", "max"), ("val_loss", "min")):
        assert to_typed(compose_config(["sweep=tiny", f"sweep.metric={metric}"])).sweep.mode == mode


def test_a_torn_tune_state_is_refused_in_one_line_instead_of_a_silent_restart(tmp_path):
    """Tune restores from its newest experiment_state-*.json and, when that file cannot be read, starts the
    sweep again from nothing; the resume refuses it first, naming the file."""
    from orchestrator.config import ConfigError
    from orchestrator.sweep.command import check_tune_state

    check_tune_state(str(tmp_path))  # no state yet: Tune's own check (can_restore) speaks
    (tmp_path / "experiment_state-2026-12-03_16-00-00.json").write_text('{"runner_data": {}}')
    check_tune_state(str(tmp_path))
    torn = tmp_path / "experiment_state-2026-12-03_17-00-00.json"
    torn.write_text("")
    with pytest.raises(ConfigError, match=rf"^resume: {torn} is empty or torn"):
        check_tune_state(str(tmp_path))
