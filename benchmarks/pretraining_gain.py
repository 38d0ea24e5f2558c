"""Pretraining pays: the same fine-tune from the pretrained package and from random weights.

Runs the demo's prepare and BART pretraining (`experiment=demo`, as `seqfoundry pipeline` does), or
reuses a pipeline run folder (`--run`: its `data/` and `pretrain/model`), then fine-tunes twice on the
restoration pairs with one config — once from the pretrained package (`seqfoundry finetune`), once
from random initialisation (`seqfoundry pretrain objective=pairs`) — and evaluates both greedily on the
test split (`seqfoundry evaluate`), beside the copy-the-source baseline. Everything goes through the
real commands: Ray, Ray Train, DeepSpeed, W&B offline.

It prints, for both, the best validation loss (from the run's metrics.jsonl), the test loss and
greedy BLEU/chrF, and the difference. The check: pretraining wins (lower validation loss and higher
BLEU); the script exits 1 otherwise.

    python benchmarks/pretraining_gain.py                          # ~10 min on 2 idle cores
    python benchmarks/pretraining_gain.py --run runs/demo          # reuse a pipeline run's data and package
    python benchmarks/pretraining_gain.py --out runs/gain -- trainer.max_steps=300   # overrides, both fine-tunes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.cli import main  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="", help="a `seqfoundry pipeline` run folder to reuse (data/, pretrain/model)")
    p.add_argument("--out", default="", help="where the runs go (default: runs/pretraining_gain-<time>)")
    p.add_argument("--experiment", default="demo")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for both fine-tunes (after --)")
    return p.parse_args(argv)


def command(*args: str) -> None:
    print("$ seqfoundry " + " ".join(args), flush=True)
    code = main(list(args))
    if code != 0:
        raise SystemExit(f"seqfoundry {args[0]} failed (exit {code})")


def best_val_loss(run: Path) -> float:
    values = [json.loads(line).get("val_loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
    return min(v for v in values if isinstance(v, (int, float)))


def evaluate(exp: str, data: Path, package: Path, out: Path) -> dict:
    if not (out / "eval_results.json").is_file():
        command("evaluate", f"experiment={exp}", f"data.dir={data}", f"eval.package={package}",
                "eval.strategies=[greedy]", "eval.baseline=copy", f"run.dir={out}")
    return json.loads((out / "eval_results.json").read_text())


def fine_tune(exp: str, data: Path, run: Path, pretrained: Path | None, overrides: list[str]) -> None:
    if (run / "model" / "model.safetensors").is_file():
        return
    common = [f"experiment={exp}", "objective=pairs", f"data.dir={data}", f"run.dir={run}", *overrides]
    if pretrained:
        command("finetune", *common, f"pretrained={pretrained}")
    else:
        command("pretrain", *common)


def main_(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out or ROOT / "runs" / time.strftime("pretraining_gain-%Y%m%d-%H%M%S")).resolve()
    source = Path(args.run).resolve() if args.run else out
    data, package = source / "data", source / "pretrain" / "model"
    if not (data / "manifest.json").is_file():
        command("prepare", f"experiment={args.experiment}", f"data.dir={data}")
    if not (package / "model.safetensors").is_file():
        command("pretrain", f"experiment={args.experiment}", f"data.dir={data}", f"run.dir={package.parent}")
    t0 = time.perf_counter()
    rows = {}
    for name, init in (("pretrained", package), ("scratch", None)):
        run = out / f"finetune_{name}"
        fine_tune(args.experiment, data, run, init, args.overrides)
        results = evaluate(args.experiment, data, run / "model", out / f"eval_{name}")
        greedy = results["strategies"]["greedy"]
        rows[name] = {"val_loss": best_val_loss(run), "test_loss": results["loss"],
                      "bleu": greedy["bleu"], "chrf": greedy["chrf"]}
        copy = results["baselines"]["copy source"]
    print_table(rows, copy, wall_s=time.perf_counter() - t0, out=out)
    won = rows["pretrained"]["val_loss"] < rows["scratch"]["val_loss"] and rows["pretrained"]["bleu"] > rows["scratch"]["bleu"]
    print("check: pretraining wins (lower validation loss, higher BLEU):", "PASS" if won else "FAIL")
    return 0 if won else 1


def print_table(rows: dict, copy: dict, *, wall_s: float, out: Path) -> None:
    print(f"\npretraining gain: the same fine-tune from the pretrained package and from random weights ({out})")
    print(f"{'init':<14}{'val_loss':>10}{'test_loss':>11}{'BLEU':>8}{'chrF':>8}")
    for name, r in rows.items():
        print(f"{name:<14}{r['val_loss']:>10.3f}{r['test_loss']:>11.3f}{r['bleu']:>8.2f}{r['chrf']:>8.2f}")
    a, b = rows["pretrained"], rows["scratch"]
    print(f"{'difference':<14}{a['val_loss'] - b['val_loss']:>+10.3f}{a['test_loss'] - b['test_loss']:>+11.3f}"
          f"{a['bleu'] - b['bleu']:>+8.2f}{a['chrf'] - b['chrf']:>+8.2f}")
    print(f"{'copy source':<14}{'':>10}{'':>11}{copy['bleu']:>8.2f}{copy['chrf']:>8.2f}")
    print(f"(fine-tunes and evaluations: {wall_s:.0f}s)")


if __name__ == "__main__":
    raise SystemExit(main_())
