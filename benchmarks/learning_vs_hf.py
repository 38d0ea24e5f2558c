"""Learning, not speed: our Transformer vs HF BART trained from scratch on the same data.

Prepares the built-in corpus for the punctuation-and-casing restoration task
with the project's own `data_pipeline` (into a temporary folder, or reuses
`--data`), then trains, in one process and interleaved step by step, our
Transformer and an HF `BartForConditionalGeneration` of the same dimensions
(d_model, layers, heads, FFN, vocabulary, dropout; tied embeddings), plus our
LSTM and GRU at their tiny sizes (conf/model/*_tiny.yaml), on the same
batches (the project's `TokenBatcher`), for the same steps, with the same
AdamW, schedule (`trainers.engine.lr_lambda`), gradient clipping and loss
(mean token cross-entropy, optionally label-smoothed), in float32.

Optionally each model is first pretrained with BART text infilling on the
same data's clean side (`--pretrain-steps`), as `seqfoundry pipeline` does.

It prints the validation loss (unsmoothed, on the same validation batches)
at fixed steps, then greedy BLEU/chrF (sacreBLEU) of every model on the
test split beside the copy-the-source baseline.  The check: our Transformer's
final validation loss is no worse than HF BART's (+2% tolerance).

    python benchmarks/learning_vs_hf.py           # default: 100 steps x 4 models, ~5 min on 2 idle cores
    python benchmarks/learning_vs_hf.py --steps 600 --max-tokens 2048 --max-sentences 32 --models transformer,hf_bart
    python benchmarks/learning_vs_hf.py --max-words 20 --lr 3e-3 --label-smoothing 0.1 --pretrain-steps 300  # a recipe

Cost: about 2 CPU-seconds a step for each Transformer at 2k padded tokens (measured), twice
that for the tiny LSTM/GRU (their decoders step token by token).
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from data_pipeline import BatchConfig, DataConfig, Manifest, ObjectiveConfig, ShardStream, build_batcher, prepare
from data_pipeline.tokenizer import load_tokenizer
from trainers.config import TrainerConfig
from trainers.decoding import DecodingConfig, decode
from trainers.engine import build_optimizer, lr_lambda
from trainers.models import BOS_ID, EOS_ID, PAD_ID, ModelConfig, build_model
from trainers.models.losses import linear_cross_entropy

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
MODELS = ("transformer", "hf_bart", "lstm", "gru")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = p.add_argument_group("data (the demo's, unless changed)")
    d.add_argument("--data", default="", help="reuse this prepared folder (task restore) instead of preparing one")
    d.add_argument("--max-documents", type=int, default=150)
    d.add_argument("--max-words", type=int, default=120, help="data.max_words: longest sample, in words")
    d.add_argument("--min-words", type=int, default=6)
    d.add_argument("--vocab-size", type=int, default=1024)
    d.add_argument("--tokenizer-type", default="bpe", choices=("bpe", "unigram"))
    d.add_argument("--max-tokens", type=int, default=1024, help="batch.max_tokens (padded tokens a batch; the demo's)")
    d.add_argument("--max-sentences", type=int, default=16, help="batch.max_sentences (the demo's micro_batch_size)")
    m = p.add_argument_group("Transformer dimensions (ours and HF BART)")
    m.add_argument("--d-model", type=int, default=128)
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--ffn", type=int, default=512)
    m.add_argument("--dropout", type=float, default=0.0)
    m.add_argument("--rnn-d-model", type=int, default=0, help="LSTM/GRU width; 0 = conf/model/*_tiny.yaml")
    t = p.add_argument_group("training (the same for every model)")
    t.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    t.add_argument("--steps", type=int, default=100, help="fine-tuning steps on the restoration pairs")
    t.add_argument("--pretrain-steps", type=int, default=0, help="BART text-infilling steps first (0 = none)")
    t.add_argument("--eval-at", default="", help="steps with a validation loss (default: 4 evenly spaced)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--schedule", default="cosine")
    t.add_argument("--min-lr-ratio", type=float, default=0.1)
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--val-batches", type=int, default=10)
    t.add_argument("--test-samples", type=int, default=100, help="first test pairs decoded (the demo's eval.max_samples)")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# --- data ------------------------------------------------------------------------------------

def data_config(args, folder: str) -> DataConfig:
    batch = BatchConfig(max_tokens=args.max_tokens, max_sentences=args.max_sentences, max_source_len=512,
                        max_target_len=512, pool_size=1000)
    return DataConfig(dir=folder, task="restore", max_documents=args.max_documents, max_words=args.max_words,
                      min_words=args.min_words, vocab_size=args.vocab_size, tokenizer_type=args.tokenizer_type,
                      num_sentinels=16, shard_samples=256, num_workers=0, batch=batch)


def take_batches(data: DataConfig, objective: str, n: int, *, seed: int, split: str = "train") -> list:
    """The first `n` batches of `split`, epoch after epoch (the same list feeds every model)."""
    batcher = build_batcher(data, ObjectiveConfig(name=objective), rank=0, world_size=1, seed=seed, split=split)
    out: list = []
    for epoch in itertools.count():
        batcher.set_epoch(epoch)
        out.extend(itertools.islice(batcher, n - len(out)))
        if len(out) >= n or split != "train":
            return out


@dataclass
class TestSet:
    src: list[list[int]]
    sources: list[str]
    references: list[str]


def test_set(manifest: Manifest, tok, limit: int) -> TestSet:
    """The first `limit` test pairs in corpus order, as `seqfoundry evaluate` reads them."""
    stream = ShardStream(manifest.path, rank=0, world_size=1, seed=0, shuffle=False, split="test")
    out = TestSet([], [], [])
    for sample in itertools.islice(stream, limit):
        src, tgt = [int(t) for t in sample["src"]], [int(t) for t in sample["tgt"]]
        out.src.append(src[:511] + [EOS_ID])
        out.sources.append(tok.decode(src, skip_special_tokens=True))
        out.references.append(tok.decode(tgt, skip_special_tokens=True))
    return out


# --- models ------------------------------------------------------------------------------------

def transformer_config(args, vocab: int) -> ModelConfig:
    return ModelConfig(arch="transformer", vocab_size=vocab, d_model=args.d_model, num_encoder_layers=args.layers,
                       num_decoder_layers=args.layers, num_heads=args.heads, ffn_dim=args.ffn, dropout=args.dropout,
                       max_positions=1024)


def rnn_config(arch: str, args, vocab: int) -> ModelConfig:
    import yaml

    fields = yaml.safe_load((CONF / f"{arch}_tiny.yaml").read_text())
    fields.update(vocab_size=vocab, dropout=args.dropout)
    if args.rnn_d_model:
        fields["d_model"] = args.rnn_d_model
    return ModelConfig(**fields)


def build_hf(args, vocab: int) -> torch.nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=vocab, d_model=args.d_model, encoder_layers=args.layers, decoder_layers=args.layers,
                     encoder_attention_heads=args.heads, decoder_attention_heads=args.heads,
                     encoder_ffn_dim=args.ffn, decoder_ffn_dim=args.ffn, dropout=args.dropout,
                     attention_dropout=0.0, activation_dropout=0.0, activation_function="gelu",
                     max_position_embeddings=1024, scale_embedding=True, tie_word_embeddings=True,
                     pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, decoder_start_token_id=BOS_ID,
                     forced_bos_token_id=None, forced_eos_token_id=EOS_ID)
    return BartForConditionalGeneration(cfg)


@dataclass
class Run:
    """One model under training: its optimizer, schedule and what was measured."""

    name: str
    model: torch.nn.Module
    hf: bool
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    seconds: float = 0.0
    """Wall seconds in training steps."""
    cpu_seconds: float = 0.0
    """Process CPU seconds in training steps (all threads): a load-independent cost measure."""
    val: dict[int, float] = field(default_factory=dict)

    def start(self, trainer: TrainerConfig) -> None:
        """A fresh AdamW and schedule (for each phase), as `trainers.engine.build_engine` makes them."""
        self.optimizer = build_optimizer(self.model, trainer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(trainer))

    def loss(self, b, eps: float = 0.0) -> torch.Tensor:
        if self.hf:
            logits = self.model(input_ids=b.src, attention_mask=b.src != PAD_ID, decoder_input_ids=b.tgt_in).logits
            return F.cross_entropy(logits.flatten(0, 1), b.tgt_out.flatten(), ignore_index=PAD_ID,
                                   label_smoothing=eps)
        hidden = self.model.hidden_states(b.src, b.src_lengths, b.tgt_in)  # (B, T, D)
        return linear_cross_entropy(hidden.flatten(0, 1), self.model.output_weight, b.tgt_out.flatten(),
                                    label_smoothing=eps)

    def step(self, b, *, eps: float, clip: float) -> float:
        start, cpu_start = time.perf_counter(), time.process_time()
        self.model.train()
        loss = self.loss(b, eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu_start
        return loss.item()

    @torch.no_grad()
    def val_loss(self, batches) -> float:
        self.model.eval()
        total = sum(self.loss(b).item() * b.num_tokens for b in batches)
        return total / sum(b.num_tokens for b in batches)

    @torch.no_grad()
    def greedy(self, src: list[list[int]], *, batch_size: int = 32) -> list[list[int]]:
        """Greedy outputs (token ids without bos/eos), max length 1.5 x source + 10 (the demo's limits)."""
        self.model.eval()
        order = sorted(range(len(src)), key=lambda i: len(src[i]))
        out: dict[int, list[int]] = {}
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            lengths = torch.tensor([len(src[i]) for i in idx])
            ids = torch.zeros(len(idx), int(lengths.max()), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, :len(src[i])] = torch.tensor(src[i])
            for i, hyp in zip(idx, self._greedy_batch(ids, lengths)):
                out[i] = [t for t in hyp if t not in (PAD_ID, BOS_ID, EOS_ID)]
        return [out[i] for i in range(len(src))]

    def _greedy_batch(self, ids: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        max_len = min(200, int(1.5 * int(lengths.max()) + 10))
        if self.hf:
            gen = self.model.generate(input_ids=ids, attention_mask=ids != PAD_ID, num_beams=1, do_sample=False,
                                      max_new_tokens=max_len, min_length=0, no_repeat_ngram_size=0,
                                      decoder_start_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
            return gen.tolist()
        cfg = DecodingConfig(strategy="greedy", max_len=200, max_len_a=1.5, max_len_b=10)
        return [hyps[0].tokens for hyps in decode(self.model, ids, lengths, cfg)]


def build_runs(args, vocab: int) -> list[Run]:
    runs = []
    for name in args.models.split(","):
        torch.manual_seed(args.seed)  # every model starts from its own seeded init
        if name == "transformer":
            runs.append(Run(name, build_model(transformer_config(args, vocab)), hf=False))
        elif name == "hf_bart":
            runs.append(Run(name, build_hf(args, vocab), hf=True))
        elif name in ("lstm", "gru"):
            runs.append(Run(name, build_model(rnn_config(name, args, vocab)), hf=False))
        else:
            raise SystemExit(f"--models: unknown model {name!r}; choose from {MODELS}")
    return runs


# --- training and evaluation ------------------------------------------------------------------

def trainer_config(args, steps: int) -> TrainerConfig:
    return TrainerConfig(max_steps=max(steps, 1), lr=args.lr, warmup_steps=min(args.warmup, steps),
                         schedule=args.schedule, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
                         label_smoothing=args.label_smoothing)


def train_phase(runs: list[Run], batches: list, trainer: TrainerConfig, *, eps: float,
                val_batches: list | None = None, eval_at: set[int] = frozenset(), label: str = "") -> None:
    """Every model steps through the same batches, interleaved step by step (fair under load drift)."""
    for run in runs:
        run.start(trainer)
    t0 = time.perf_counter()
    for step, b in enumerate(batches, 1):
        for run in runs:
            run.step(b, eps=eps, clip=trainer.grad_clip)
        if val_batches is not None and step in eval_at:
            for run in runs:
                run.val[step] = run.val_loss(val_batches)
            vals = "  ".join(f"{r.name} {r.val[step]:.3f}" for r in runs)
            print(f"  {label} step {step}: val_loss  {vals}   ({time.perf_counter() - t0:.0f}s)", flush=True)


def scores(hyps: list[str], refs: list[str]) -> tuple[float, float]:
    from sacrebleu.metrics import BLEU, CHRF

    return BLEU().corpus_score(hyps, [refs]).score, CHRF().corpus_score(hyps, [refs]).score


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="learning-vs-hf-") as tmp:
        folder = args.data or str(Path(tmp) / "data")
        data = data_config(args, folder)
        manifest = prepare(data, progress=False, use_ray=False) if not args.data else Manifest.load(folder)
        if manifest.data.get("task") != "restore" and "src" not in manifest.data.get("fields", []):
            raise SystemExit(f"--data: {folder} holds no source/target pairs (prepare with data.task=restore)")
        tok = load_tokenizer(manifest.tokenizer_path)
        vocab = tok.get_vocab_size()
        t_data = time.perf_counter() - t_start
        train = take_batches(data, "pairs", args.steps, seed=args.seed)
        val = take_batches(data, "pairs", args.val_batches, seed=args.seed, split="valid")[:args.val_batches]
        tests = test_set(manifest, tok, args.test_samples)
        runs = build_runs(args, vocab)
        splits = manifest.data["splits"]
        print(f"data: {manifest.folder.name if args.data else 'built-in corpus'}, restore task, "
              f"{splits['train']['num_samples']} train / {splits['valid']['num_samples']} valid / "
              f"{splits['test']['num_samples']} test pairs, {splits['train']['num_tokens'] // 2} train target "
              f"tokens, vocab {vocab} ({args.tokenizer_type}), max_words {args.max_words}  [{t_data:.0f}s]")
        print(f"training: {args.pretrain_steps} BART pretraining + {args.steps} fine-tuning steps, "
              f"batch <= {args.max_sentences} pairs / {args.max_tokens} padded tokens "
              f"(~{sum(b.num_tokens for b in train) / len(train):.0f} target tokens), AdamW lr {args.lr:g}, "
              f"warm-up {args.warmup}, {args.schedule}, label smoothing {args.label_smoothing:g}, fp32, "
              f"{torch.get_num_threads()} threads")
        for run in runs:
            print(f"  {run.name:<11} {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters")
        if args.pretrain_steps:
            pre = take_batches(data, "bart", args.pretrain_steps, seed=args.seed)
            train_phase(runs, pre, trainer_config(args, args.pretrain_steps), eps=0.0, label="pretrain")
            print(f"  pretrained ({args.pretrain_steps} steps)", flush=True)
        eval_at = ({int(s) for s in args.eval_at.split(",")} if args.eval_at
                   else {max(1, round(args.steps * k / 4)) for k in range(1, 5)})
        train_phase(runs, train, trainer_config(args, args.steps), eps=args.label_smoothing, val_batches=val,
                    eval_at=eval_at, label="finetune")
        results = report(runs, tests, tok, sorted(eval_at), args)
    print(f"total {time.perf_counter() - t_start:.0f}s")
    return results


def report(runs: list[Run], tests: TestSet, tok, eval_at: list[int], args) -> dict:
    copy_bleu, copy_chrf = scores(tests.sources, tests.references)
    cols = "".join(f" {'val@' + str(s):>9}" for s in eval_at)
    print(f"\n{'model':<12}{cols} {'BLEU':>6} {'chrF':>6} {'train s':>8} {'cpu s':>7}   "
          f"(greedy, {len(tests.references)} test pairs)")
    results = {"copy": {"bleu": copy_bleu, "chrf": copy_chrf}}
    for run in runs:
        t0 = time.perf_counter()
        hyps = [tok.decode(h, skip_special_tokens=True) for h in run.greedy(tests.src)]
        bleu, chrf = scores(hyps, tests.references)
        results[run.name] = {"val": run.val, "bleu": bleu, "chrf": chrf, "seconds": run.seconds,
                             "cpu_seconds": run.cpu_seconds,
                             "decode_s": time.perf_counter() - t0, "example": hyps[0] if hyps else ""}
        vals = "".join(f" {run.val.get(s, math.nan):>9.3f}" for s in eval_at)
        print(f"{run.name:<12}{vals} {bleu:>6.2f} {chrf:>6.2f} {run.seconds:>8.0f} {run.cpu_seconds:>7.0f}")
    print(f"{'copy source':<12}{'':>{10 * len(eval_at)}} {copy_bleu:>6.2f} {copy_chrf:>6.2f}")
    if tests.references:
        print(f"\nsource:     {tests.sources[0]}\nreference:  {tests.references[0]}")
        for run in runs:
            print(f"{run.name + ':':<12}{results[run.name]['example']}")
    if {"transformer", "hf_bart"} <= set(results):
        ours, hf = results["transformer"]["val"][eval_at[-1]], results["hf_bart"]["val"][eval_at[-1]]
        verdict = "OK" if ours <= hf * 1.02 else "WORSE"
        print(f"\nfinal val_loss ours {ours:.3f} vs hf_bart {hf:.3f}: {verdict} (ours must be <= hf_bart + 2%)")
    return results


if __name__ == "__main__":
    main()
