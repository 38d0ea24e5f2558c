"""Decoding speed by engine: HF BART generate() fp32, our decoder fp32, and our
model through CTranslate2 (trainers.engines) in float32 and int8.

Same shape as decode_vs_hf.py: d_model 256, 3+3 layers, 4 heads, FFN 1024,
vocab 8000, random weights, 32 sources of 40 tokens, exactly 40 generated
tokens per hypothesis (min_len = max_len = 40; HF: min_new_tokens =
max_new_tokens = 40), greedy and beam 5, length_penalty 1.0, CPU, one process.
Beam search on CTranslate2 refuses min_len > 1 (trainers.engines), so ours and
CTranslate2 beam run with min_len 1 and max_len 40: with random weights eos
almost never wins, and tokens/s counts the tokens actually generated.
The runners are timed alternately, round by round.  The CTranslate2 columns go
through the engine API (`load_engine(package, engine="ctranslate2",
compute_type=...)`): the model is converted once (not timed), and each decode
includes the engine's rescoring pass (`score_batch`) that appends the forced
eos and makes the scores our sum of log-probs.  The last column, for
reference, is CTranslate2 int8 alone: `translate_batch` with
min_decoding_length = max_decoding_length = 40 (40 tokens, no eos, its own
renormalised scores), i.e. what the engine costs without the rescoring pass.

    python benchmarks/decode_engines.py --threads 2 --iters 3 --warmup 1

With `--package runs/<run>/.../model --data <prepared folder>` it also times greedy search of that trained
package on the split's sources, where hypotheses end with eos by themselves (max_len_a 1.5, max_len_b 10,
as the demo evaluates): our decoder fp32, the CTranslate2 engine in int8 (one unmasked pass, rescoring only
hypotheses cut at the limit), the same engine made to rescore every hypothesis (min_len 2: eos masked at
the first step, CTranslate2's two-pass path), and `translate_batch` alone; then beam 5, ours fp32 and the
engine in int8.

    python benchmarks/decode_engines.py --package runs/<time>/sweep/<trial>/model --data runs/<time>/data/restore
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from decode_vs_hf import (BEAM, GEN_LEN, LENGTH_PENALTY, N_SRC, SRC_LEN, benchmark, build_hf, build_ours,
                          make_sources, run_hf)
from trainers.decoding import DecodingConfig
from trainers.engines import TorchEngine, load_engine
from trainers.package import Lineage, write_package


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=3, help="timed runs per engine and strategy")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every engine (torch and CTranslate2)")
    p.add_argument("--package", default=None, help="a trained model package: also time greedy on --data")
    p.add_argument("--data", default=None, help="the prepared folder whose --split sources --package decodes")
    p.add_argument("--split", default="test")
    return p.parse_args()


def write_tokenizer(path: Path, vocab_size: int) -> Path:
    """A word-level tokenizer with the specials and vocab_size - 4 words (the package needs one)."""
    from tokenizers import Tokenizer, models

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)} | {f"w{i}": i for i in range(4, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.save(str(path))
    return path


def run_engine(engine, sources: list[list[int]], beam: int) -> int:
    """Decode; returns the number of generated tokens of the best hypotheses."""
    cfg = DecodingConfig(strategy="greedy" if beam == 1 else "beam", beam_size=beam, n_best=1,
                         max_len=GEN_LEN, min_len=GEN_LEN if beam == 1 else 1, length_penalty=LENGTH_PENALTY)
    hyps = engine.decode(sources, cfg)
    if beam == 1:
        assert all(len(h[0].tokens) == GEN_LEN for h in hyps)
    return sum(len(h[0].tokens) for h in hyps)


def run_ct2_raw(engine, tokens: list[list[str]], beam: int) -> int:
    """translate_batch alone: exactly GEN_LEN tokens per hypothesis, no rescoring."""
    results = engine.translator.translate_batch(tokens, beam_size=beam, length_penalty=LENGTH_PENALTY,
                                                min_decoding_length=GEN_LEN, max_decoding_length=GEN_LEN,
                                                max_input_length=0, suppress_sequences=[["<pad>"], ["<s>"]])
    assert all(len(r.hypotheses[0]) == GEN_LEN for r in results)
    return sum(len(r.hypotheses[0]) for r in results)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    src, lengths = make_sources()
    sources = [row[:n] for row, n in zip(src.tolist(), lengths.tolist())]
    ours, hf = build_ours("transformer"), build_hf()
    with tempfile.TemporaryDirectory() as tmp:
        package = write_package(Path(tmp) / "model", ours, lineage=Lineage(),
                                tokenizer=write_tokenizer(Path(tmp) / "tokenizer.json", ours.config.vocab_size))
        start = time.perf_counter()
        engines = {"ours fp32": TorchEngine(ours),
                   "ct2 fp32": load_engine(package, engine="ctranslate2", compute_type="float32", threads=args.threads),
                   "ct2 int8": load_engine(package, engine="ctranslate2", compute_type="int8", threads=args.threads)}
        convert_s = time.perf_counter() - start
        print(f"torch {torch.__version__}, threads={args.threads}, CPU; {N_SRC} sources x {SRC_LEN} tokens, "
              f"exactly {GEN_LEN} generated tokens, warmup {args.warmup}, iters {args.iters} (best of iters); "
              f"CTranslate2 conversions {convert_s:.1f}s (not timed)")
        rows = []
        for beam in (1, BEAM):
            runners = {"hf fp32": lambda: run_hf(hf, src, lengths, beam)}
            runners |= {name: (lambda e=e: run_engine(e, sources, beam)) for name, e in engines.items()}
            int8 = engines["ct2 int8"]
            runners["ct2 int8 raw"] = lambda: run_ct2_raw(int8, [[int8.vocab[i] for i in s] for s in sources], beam)
            rate, _ = benchmark(runners, args.warmup, args.iters)
            rows.append((beam, rate))
    names = ["hf fp32", "ours fp32", "ct2 fp32", "ct2 int8"]
    print(f"{'strategy':<9}" + "".join(f" {n + ' tok/s':>15}" for n in names) + f" {'ct2 int8 / hf fp32':>19}"
          + f" {'ct2 int8 raw tok/s':>19} {'raw / hf':>9}")
    for beam, rate in rows:
        name = "greedy" if beam == 1 else f"beam {beam}"
        print(f"{name:<9}" + "".join(f" {rate[n]:>15.0f}" for n in names)
              + f" {rate['ct2 int8'] / rate['hf fp32']:>18.2f}x"
              + f" {rate['ct2 int8 raw']:>19.0f} {rate['ct2 int8 raw'] / rate['hf fp32']:>8.2f}x")
    print("tokens/s = generated tokens of the best hypothesis per source / best wall time of the runs "
          "(target: ct2 int8 >= 3x hf fp32 on 2 cores); raw = translate_batch alone, without the engine's "
          "forced-eos rescoring pass")
    if args.package:
        package_table(args)


def split_sources(data: str, split: str, max_len: int) -> list[list[int]]:
    """Sources (ids + eos, cut to max_len) of a prepared folder's split, in corpus order."""
    from data_pipeline import EOS_ID, Manifest, ShardStream

    stream = ShardStream(Manifest.load(data).path, rank=0, world_size=1, seed=0, shuffle=False, split=split)
    return [[int(t) for t in sample["src"]][: max_len - 1] + [EOS_ID] for sample in stream]


def package_table(args: argparse.Namespace) -> None:
    """Greedy on a trained package: hypotheses end by themselves; what the one-pass engine path saves."""
    engine = load_engine(args.package, engine="ctranslate2", compute_type="int8", threads=args.threads)
    sources = split_sources(args.data, args.split, engine.max_positions)
    torch_engine = load_engine(args.package)
    cfg = DecodingConfig(strategy="greedy", max_len_a=1.5, max_len_b=10)
    rescore_all = DecodingConfig(strategy="greedy", max_len_a=1.5, max_len_b=10, min_len=2)
    tokens = {}

    def run(e, c, name):
        hyps = e.decode(sources, c)
        tokens[name] = [h[0].tokens for h in hyps]
        return sum(len(h[0].tokens) for h in hyps)

    def raw():
        src = [[engine.vocab[i] for i in s] for s in sources]
        out = engine.translator.translate_batch(src, beam_size=1, max_decoding_length=max(
            cfg.length_limit(len(s)) for s in sources), min_decoding_length=0, max_input_length=0,
            return_end_token=True)
        return sum(len(r.hypotheses[0]) for r in out)

    runners = {"ours fp32": lambda: run(torch_engine, cfg, "ours fp32"),
               "ct2 int8 one pass": lambda: run(engine, cfg, "ct2 int8 one pass"),
               "ct2 int8 rescore all": lambda: run(engine, rescore_all, "ct2 int8 rescore all"),
               "ct2 int8 raw": raw}
    rate, times = benchmark(runners, args.warmup, args.iters)
    ended = sum(len(t) < cfg.length_limit(len(s)) for t, s in zip(tokens["ct2 int8 one pass"], sources))
    same = sum(a == b for a, b in zip(tokens["ct2 int8 one pass"], tokens["ct2 int8 rescore all"]))
    print(f"\ngreedy on {args.package} ({len(sources)} {args.split} sources; {ended} hypotheses end before their "
          f"limit; one pass and rescore-all agree on {same}):")
    print("".join(f" {n + ' tok/s':>25}" for n in runners) + f" {'one pass / rescore all':>23}")
    print("".join(f" {rate[n]:>25.0f}" for n in runners)
          + f" {rate['ct2 int8 one pass'] / rate['ct2 int8 rescore all']:>22.2f}x")
    print("raw = translate_batch alone, one call with the largest limit, no scores")
    beam = DecodingConfig(strategy="beam", beam_size=BEAM, max_len_a=1.5, max_len_b=10)
    rate, _ = benchmark({"ours fp32": lambda: run(torch_engine, beam, "ours beam"),
                         "ct2 int8": lambda: run(engine, beam, "ct2 beam")}, args.warmup, args.iters)
    same = sum(a == b for a, b in zip(tokens["ours beam"], tokens["ct2 beam"]))
    print(f"beam {BEAM} (length_penalty 0, same limits): ours fp32 {rate['ours fp32']:.0f} tok/s, ct2 int8 "
          f"{rate['ct2 int8']:.0f} tok/s ({rate['ct2 int8'] / rate['ours fp32']:.2f}x); same best hypothesis for "
          f"{same} of {len(sources)} sources (int8 vs fp32)")


if __name__ == "__main__":
    main()
