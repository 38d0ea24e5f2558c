"""The result of one evaluation, typed: what the evaluator returns, what `eval_results.json` holds.

    result = Evaluator(spec).evaluate()
    result.strategies["greedy"]["bleu"]      # strategy -> metric -> value
    result.to_json()                          # eval_results.json (without the per-source outputs)
    EvalResult.from_json(json.load(f))        # read back (pipeline, report)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FORMAT = "seqfoundry.eval/1"


@dataclass
class EvalResult:
    dataset: dict[str, Any]
    """dir, split, manifest sha256, task, counts of the evaluated pairs."""
    perplexity: float
    """Teacher-forced perplexity of the references."""
    loss: float
    """Teacher-forced mean token negative log-likelihood (log of the perplexity)."""
    counts: dict[str, int]
    """samples, reference_tokens, truncated_sources."""
    strategies: dict[str, dict[str, Any]]
    """Strategy name -> metric name -> value (BLEU, chrF, exact match, speed, search errors, ...)."""
    signatures: dict[str, dict[str, str]]
    """Strategy name -> sacreBLEU signatures of its BLEU and chrF."""
    decoding: dict[str, dict[str, Any]]
    """Strategy name -> its DecodingConfig fields."""
    samples: list[dict[str, Any]]
    """The first `eval.num_examples` sources: key, source, reference, one output per strategy."""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    """Every source with every strategy's text, score and length (eval_outputs.jsonl)."""
    elapsed_s: float = 0.0
    format: str = FORMAT
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    """Rows that need no model (`copy source`: each source copied unchanged) -> BLEU, chrF, exact match."""
    package: dict[str, Any] | None = None
    """The evaluated package: path, weights sha256, arch, lineage (set by `seqfoundry evaluate`)."""
    wandb_run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """eval_results.json: everything but the per-source outputs, in the file's historical key order."""
        data = dataclasses.asdict(self)
        data.pop("outputs")
        order = ("format", "dataset", "perplexity", "loss", "counts", "strategies", "baselines", "signatures",
                 "decoding", "samples", "elapsed_s", "package", "wandb_run_id")
        return {key: data[key] for key in order}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EvalResult":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def margins(self, baseline: str) -> dict[str, dict[str, float]]:
        """Strategy -> BLEU and chrF minus the baseline's (positive: the model beats the baseline)."""
        base = self.baselines.get(baseline)
        if not base:
            return {}
        return {name: {k: m[k] - base[k] for k in ("bleu", "chrf") if m.get(k) is not None}
                for name, m in self.strategies.items()}

    def summary(self) -> dict[str, Any]:
        """The compact form (no samples or outputs): what eval_metrics.jsonl keeps per checkpoint."""
        return {"perplexity": self.perplexity, "loss": self.loss, "counts": self.counts,
                "strategies": self.strategies, "elapsed_s": self.elapsed_s}

    def wandb_metrics(self) -> dict[str, float]:
        """`eval/<strategy>/<metric>` for every numeric metric, plus `eval/perplexity` and `eval/loss`."""
        flat = {"eval/perplexity": self.perplexity, "eval/loss": self.loss}
        for name, metrics in {**self.strategies, **self.baselines}.items():
            flat.update({f"eval/{name}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        return flat
