"""The evaluation actor on a real local Ray cluster: metrics of a package whose
outputs are known, `seqfoundry evaluate` end to end (results file, printed
table, W&B read back), evaluation of checkpoints during pretraining, and an
actor killed mid-evaluation that is restarted and still delivers."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import sacrebleu
import torch

from orchestrator.cli import main
from orchestrator.config import load_job_config
from orchestrator.evaluation.config import EvalConfig
from orchestrator.evaluation.actor import EvalSpec, EvaluationActor, Evaluator
from orchestrator.evaluation.presets import strategy_configs, strategy_engines
from orchestrator.tracking import TrackingConfig
from trainers.decoding import DecodingConfig
from trainers.package import load_package, read_model_config
from tests.helpers.copy_task import copy_package, split_batch
from tests.helpers.wandb_offline import history, offline_runs, records

ray = pytest.importorskip("ray")


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """A tiny Transformer trained to copy word sequences (<root>/run/model, data in <root>/data)."""
    return copy_package(tmp_path_factory.getbasetemp() / "copy_package", steps=400)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_groups(run_dir: Path) -> dict[str, str]:
    """job type -> W&B group of every offline run under run_dir."""
    out = {}
    for path in offline_runs(run_dir):
        for record in records(path):
            if record.WhichOneof("record_type") == "run":
                out[record.run.job_type] = record.run.run_group
    return out


# --- metrics of a package whose outputs are known -------------------------------------------

def test_actor_metrics_match_sacrebleu_and_the_model_on_a_copy_model(package):
    data = package.parents[1] / "data"
    spec = EvalSpec(data_dir=str(data), split="test", eval=EvalConfig(batch_size=7), package=str(package),
                    strategies=strategy_configs(["greedy", "beam:length_penalty=0.0", "sample:seed=3"],
                                                DecodingConfig(max_len=16)))
    actor = EvaluationActor.remote(spec)
    results = ray.get(actor.evaluate.remote())
    ray.kill(actor)
    refs = [o["reference"] for o in results.outputs]
    assert [o["source"] for o in results.outputs] == refs  # a copy task
    assert results.counts["samples"] == len(refs) == results.dataset["split_samples"] > 10
    for name, metrics in results.strategies.items():
        hyps = [o["outputs"][name]["text"] for o in results.outputs]
        assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
        assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
        assert metrics["exact_match"] == pytest.approx(sum(h == r for h, r in zip(hyps, refs)) / len(refs))
        assert results.signatures[name]["bleu"].startswith("nrefs:1|case:mixed")
        assert metrics["tokens_per_s"] > 0 and metrics["latency_ms"] > 0
    greedy, beam = results.strategies["greedy"], results.strategies["beam:length_penalty=0.0"]
    assert greedy["exact_match"] >= 0.75 and greedy["bleu"] > 75 and beam["exact_match"] >= 0.75  # 0.87-1.0 seen
    assert greedy["search_error_rate"] is None and 0.0 <= beam["search_error_rate"] <= 1.0
    # Search errors and perplexity recomputed from the model itself.
    model = load_package(package)
    scores = {name: [o["outputs"][name]["score"] for o in results.outputs] for name in ("greedy", "beam:length_penalty=0.0")}
    by_hand = sum(b < g - 1e-4 for b, g in zip(scores["beam:length_penalty=0.0"], scores["greedy"])) / len(refs)
    assert beam["search_error_rate"] == pytest.approx(by_hand)
    batch = split_batch(data, "test")
    with torch.no_grad():
        loss = model(batch.src, batch.src_lengths, batch.tgt_in, labels=batch.tgt_out).item()
    assert results.perplexity == pytest.approx(math.exp(loss), rel=1e-4) and results.perplexity < 1.5


def test_one_table_compares_engines_on_the_same_package(package):
    """`greedy@ctranslate2` (float32) decodes exactly our greedy tokens; the int8 row is reported beside them."""
    torch.set_num_threads(1)
    names = ["greedy", "greedy@ctranslate2", "greedy@ctranslate2/int8", "beam:length_penalty=0.0@ctranslate2"]
    spec = EvalSpec(data_dir=str(package.parents[1] / "data"), split="test",
                    eval=EvalConfig(max_samples=24, baseline="copy"), package=str(package),
                    strategies=strategy_configs(names, DecodingConfig(max_len=16)), engines=strategy_engines(names))
    results = Evaluator(spec).evaluate()
    sources, refs = [o["source"] for o in results.outputs], [o["reference"] for o in results.outputs]
    copy = results.baselines["copy source"]  # eval.baseline=copy: the sources as outputs, scored by sacreBLEU
    assert copy["bleu"] == pytest.approx(sacrebleu.corpus_bleu(sources, [refs]).score)
    assert copy["chrf"] == pytest.approx(sacrebleu.corpus_chrf(sources, [refs]).score)
    margin = results.margins("copy source")["greedy"]["bleu"]
    assert margin == pytest.approx(results.strategies["greedy"]["bleu"] - copy["bleu"])
    texts = {n: [o["outputs"][n]["text"] for o in results.outputs] for n in names}
    assert texts["greedy@ctranslate2"] == texts["greedy"]
    assert results.strategies["greedy@ctranslate2"]["bleu"] == pytest.approx(results.strategies["greedy"]["bleu"])
    assert 0.0 <= results.strategies["greedy@ctranslate2/int8"]["bleu"] <= 100.0 + 1e-9  # reported beside them
    assert results.strategies["beam:length_penalty=0.0@ctranslate2"]["search_error_rate"] is not None


def test_search_errors_use_the_beam_objective_with_or_without_a_listed_greedy(package):
    common = dict(data_dir=str(package.parents[1] / "data"), split="valid", eval=EvalConfig(max_samples=12),
                  package=str(package))
    alone = EvalSpec(**common, strategies=strategy_configs(["beam"], DecodingConfig(max_len=16)))
    actor = EvaluationActor.remote(alone)
    beam_only = ray.get(actor.evaluate.remote())  # no greedy listed: the actor decodes greedy's twin itself
    ray.kill(actor)
    torch.set_num_threads(1)
    both = Evaluator(EvalSpec(**common, strategies=strategy_configs(["greedy", "beam"], DecodingConfig(max_len=16))))
    with_greedy = both.evaluate()  # in this process: the Evaluator needs no Ray
    assert beam_only.decoding["beam"]["length_penalty"] == 1.0  # conf/decoding/beam.yaml
    rate = with_greedy.strategies["beam"]["search_error_rate"]
    assert beam_only.strategies["beam"]["search_error_rate"] == pytest.approx(rate)
    outs = [o["outputs"] for o in with_greedy.outputs]
    by_hand = sum(o["beam"]["score"] / o["beam"]["length"] < o["greedy"]["score"] / o["greedy"]["length"] - 1e-4
                  for o in outs) / len(outs)
    assert rate == pytest.approx(by_hand)


# --- seqfoundry evaluate ---------------------------------------------------------------------

def test_evaluate_cli_writes_results_prints_the_table_and_logs_wandb(package, tmp_path, capsys):
    run = tmp_path / "eval"
    assert main(["evaluate", f"package={package}", f"run.dir={run}", "decoding.max_len=16",
                 "eval.num_examples=4"]) == 0
    out = capsys.readouterr().out
    assert "BLEU" in out and "search err" in out and all(f"\n{s} " in out for s in ("greedy", "beam", "sample"))
    results = json.loads((run / "eval_results.json").read_text())
    assert results["format"] == "seqfoundry.eval/1" and set(results["strategies"]) == {"greedy", "beam", "sample"}
    assert Path(results["dataset"]["dir"]) == (package.parents[1] / "data").resolve()  # from <run>/config.yaml
    assert results["dataset"]["split"] == "test" and results["package"]["path"] == str(package.resolve())
    assert results["strategies"]["greedy"]["exact_match"] >= 0.75
    assert len(results["samples"]) == 4 and "outputs" not in results
    outputs = read_jsonl(run / "eval_outputs.jsonl")
    assert len(outputs) == results["counts"]["samples"]
    rows = [r for r in history(run) if "eval/greedy/bleu" in r]
    assert len(rows) == 1 and rows[0]["eval/greedy/bleu"] == pytest.approx(results["strategies"]["greedy"]["bleu"])
    table_file = next(run.glob("wandb/offline-run-*/files/" + rows[0]["eval/samples/path"]))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["key", "source", "reference", "greedy", "beam", "sample"]
    assert [r[0] for r in table["data"]] == [s["key"] for s in results["samples"]]
    assert results["wandb_run_id"] and run_groups(run) == {"evaluate": ""}


def test_evaluate_cli_takes_data_split_and_strategy_overrides(package, tmp_path):
    run = tmp_path / "eval"
    code = main(["evaluate", f"package={package}", f"run.dir={run}", f"data.dir={package.parents[1] / 'data'}",
                 "eval.split=valid", "eval.max_samples=5", "tracking.mode=disabled", "decoding.max_len=16",
                 'eval.strategies=[greedy,"beam:beam_size=3,no_repeat_ngram_size=2"]'])
    assert code == 0
    results = json.loads((run / "eval_results.json").read_text())
    assert results["dataset"]["split"] == "valid" and results["counts"]["samples"] == 5
    assert list(results["strategies"]) == ["greedy", "beam:beam_size=3,no_repeat_ngram_size=2"]
    assert results["decoding"]["beam:beam_size=3,no_repeat_ngram_size=2"]["beam_size"] == 3
    assert results["wandb_run_id"] is None and not (run / "wandb").exists()


@pytest.mark.parametrize("args, key", [
    (["package=/no/such/package"], "eval.package"),
    ([], "eval.package"),
    (["package={package}", "data.dir=/no/such/data"], "data.dir"),
    (["package={package}", "eval.split=nope"], "eval.split"),
    (["package={package}", "'eval.strategies=[greedy,nucleus]'"], "eval.strategies"),
    (["package={package}", "eval.engine=ctranslate2"], "eval.strategies: 'sample'"),  # CT2 cannot seed sampling
    (["package={package}", "'eval.strategies=[greedy@onnx]'"], "eval.strategies"),
])
def test_bad_evaluate_config_is_one_line_with_exit_2(args, key, package, tmp_path, capsys):
    args = [a.format(package=package).strip("'") for a in args]
    assert main(["evaluate", f"run.dir={tmp_path / 'eval'}", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"seqfoundry evaluate: error: {key}"), err
    assert not (tmp_path / "eval").exists()


def test_evaluate_needs_data_when_the_package_has_no_run_config(package, tmp_path, capsys):
    import shutil

    lone = tmp_path / "exported" / "model"
    shutil.copytree(package, lone)
    assert main(["evaluate", f"package={lone}", f"run.dir={tmp_path / 'eval'}"]) == 2
    assert "data.dir: cannot tell which data" in capsys.readouterr().err


# --- during pretraining ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(package, tmp_path_factory) -> Path:
    """4 pretraining steps, a checkpoint every 2, each handed to the evaluation actor."""
    run = tmp_path_factory.mktemp("pretrain") / "run"
    data = package.parents[1] / "data"
    vocab = read_model_config(package).vocab_size
    assert main(["pretrain", "experiment=tiny", f"data.dir={data}", f"run.dir={run}", f"model.vocab_size={vocab}",
                 "trainer.num_workers=2", "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.keep_last=3",
                 "trainer.log_every=1", "trainer.warmup_steps=1", "trainer.val_every=0", "data.num_workers=0",
                 "eval.during_training=true", "eval.max_samples=6", "decoding.max_len=12"]) == 0
    return run


def test_checkpoints_are_evaluated_during_pretraining_against_the_step(trained_run):
    rows = read_jsonl(trained_run / "eval_metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4]  # each checkpoint once, the final one included
    for r in rows:
        assert set(r["strategies"]) == {"greedy", "beam", "sample"} and r["counts"]["samples"] == 6
        assert r["perplexity"] > 1 and r["checkpoint"].endswith(f"step_{r['step']:08d}")
    assert [m["step"] for m in read_jsonl(trained_run / "metrics.jsonl") if "loss" in m] == [1, 2, 3, 4]
    logged = [(r["train_step"], r["eval/greedy/bleu"]) for r in history(trained_run) if "train_step" in r]
    assert logged == [(r["step"], pytest.approx(r["strategies"]["greedy"]["bleu"])) for r in rows]
    groups = run_groups(trained_run)
    assert groups["eval"] == groups["pretrain"] == f"train-{trained_run.name}"
    assert json.loads((trained_run / "eval_status.json").read_text())["state"] == "idle"


def test_a_killed_actor_is_restarted_and_the_evaluation_retried(trained_run, tmp_path):
    checkpoint = trained_run / "checkpoints" / "step_00000002"
    package = trained_run / "model"
    spec = EvalSpec(data_dir=load_job_config(trained_run / "config.yaml").data.dir, split="valid",
                    strategies=strategy_configs(["greedy", "beam:beam_size=6"], DecodingConfig(max_len=40)),
                    eval=EvalConfig(max_samples=24), model=read_model_config(package),
                    tokenizer=str(package / "tokenizer.json"), run_dir=str(tmp_path),
                    tracking=TrackingConfig(mode="disabled"))
    actor = EvaluationActor.remote(spec)
    first_pid = ray.get(actor.pid.remote())
    ref = actor.evaluate_checkpoint.remote(2, str(checkpoint))
    status = tmp_path / "eval_status.json"
    deadline = time.time() + 60
    while not (status.is_file() and json.loads(status.read_text())["state"] == "running"):
        assert time.time() < deadline, "the evaluation never started"
        time.sleep(0.02)
    os.kill(first_pid, signal.SIGKILL)  # mid-task
    row = ray.get(ref, timeout=180)
    assert row["step"] == 2 and set(row["strategies"]) == {"greedy", "beam:beam_size=6"}
    new_pid = ray.get(actor.pid.remote())
    assert new_pid != first_pid and json.loads(status.read_text())["pid"] == new_pid  # the retry ran there
    assert [r["step"] for r in read_jsonl(tmp_path / "eval_metrics.jsonl")] == [2]
    again = ray.get(actor.evaluate_checkpoint.remote(2, str(checkpoint)))  # idempotent: not evaluated twice
    assert again == row
    ray.kill(actor)
