"""Decoding speed: our Transformer (trainers.decoding.decode) vs HF BART generate().

Same dimensions (d_model 256, 3+3 layers, 4 heads, FFN 1024, vocab 8000),
random weights, 32 sources of 40 tokens, exactly 40 generated tokens per
hypothesis (ours: min_len = max_len = 40; HF: min_new_tokens = max_new_tokens
= 40), greedy and beam 5, float32, CPU, one process.  The two are timed
alternately in the same run.  Our LSTM and GRU models at the same width are
timed too.  Both sides forbid pad/bos, forbid eos before the last step and
force it at the last step, and use length_penalty 1.0.

    python benchmarks/decode_vs_hf.py --iters 3 --warmup 1 [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trainers.decoding import DecodingConfig, decode
from trainers.models import BOS_ID, EOS_ID, PAD_ID, ModelConfig, build_model

D_MODEL, LAYERS, HEADS, FFN, VOCAB = 256, 3, 4, 1024, 8000
N_SRC, SRC_LEN, GEN_LEN, BEAM, LENGTH_PENALTY = 32, 40, 40, 5, 1.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=4, help="timed runs per model and strategy")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--no-rnn", action="store_true", help="skip the LSTM / GRU rows")
    p.add_argument("--profile", action="store_true", help="profile our beam decode and print the top ops")
    return p.parse_args()


def build_ours(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = dict(num_heads=HEADS, ffn_dim=FFN) if arch == "transformer" else {}
    return build_model(ModelConfig(arch=arch, vocab_size=VOCAB, d_model=D_MODEL, num_encoder_layers=LAYERS,
                                   num_decoder_layers=LAYERS, dropout=0.1, **extra)).eval()


def build_hf() -> torch.nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=VOCAB, d_model=D_MODEL, encoder_layers=LAYERS, decoder_layers=LAYERS,
                     encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                     encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, dropout=0.1, activation_function="gelu",
                     max_position_embeddings=1024, scale_embedding=True, tie_word_embeddings=True,
                     pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                     decoder_start_token_id=BOS_ID, forced_bos_token_id=None, forced_eos_token_id=EOS_ID)
    return BartForConditionalGeneration(cfg).eval()


def make_sources() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, VOCAB, (N_SRC, SRC_LEN), generator=g)
    src[:, -1] = EOS_ID
    return src, torch.full((N_SRC,), SRC_LEN)


def run_ours(model, src, lengths, beam: int) -> int:
    """Decode; returns the number of generated tokens of the best hypotheses."""
    cfg = DecodingConfig(strategy="greedy" if beam == 1 else "beam", beam_size=beam, n_best=1,
                         max_len=GEN_LEN, min_len=GEN_LEN, length_penalty=LENGTH_PENALTY)
    hyps = decode(model, src, lengths, cfg)
    assert all(len(h[0].tokens) == GEN_LEN for h in hyps)
    return sum(len(h[0].tokens) for h in hyps)


def run_hf(model, src, lengths, beam: int) -> int:
    with torch.no_grad():
        out = model.generate(input_ids=src, attention_mask=src != PAD_ID, num_beams=beam, do_sample=False,
                             min_new_tokens=GEN_LEN, max_new_tokens=GEN_LEN, length_penalty=LENGTH_PENALTY,
                             early_stopping=False, no_repeat_ngram_size=0, suppress_tokens=[PAD_ID, BOS_ID],
                             num_return_sequences=1)  # (B, 1 + GEN_LEN): decoder start + generated
    assert out.size(1) == 1 + GEN_LEN
    return out.size(0) * (out.size(1) - 1)


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def benchmark(runners: dict, warmup: int, iters: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Best tokens/s of each runner, and every timed run's seconds; the runners
    are timed alternately, round by round."""
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    tokens: dict[str, int] = {}
    for i in range(warmup + iters):
        for name, fn in runners.items():
            s, tokens[name] = timed(fn)
            if i >= warmup:
                seconds[name].append(s)
    return {name: tokens[name] / min(seconds[name]) for name in runners}, seconds


def profile_ours(model, src, lengths) -> None:
    from torch.profiler import ProfilerActivity, profile

    run_ours(model, src, lengths, BEAM)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_ours(model, src, lengths, BEAM)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    src, lengths = make_sources()
    ours, hf = build_ours("transformer"), build_hf()
    if args.profile:
        profile_ours(ours, src, lengths)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, float32, CPU; "
          f"{N_SRC} sources x {SRC_LEN} tokens, exactly {GEN_LEN} generated tokens, "
          f"warmup {args.warmup}, iters {args.iters} (best of iters)")
    rows = []
    for beam in (1, BEAM):
        rate, seconds = benchmark({"ours": lambda: run_ours(ours, src, lengths, beam),
                                   "hf": lambda: run_hf(hf, src, lengths, beam)}, args.warmup, args.iters)
        paired = statistics.median(h / o for o, h in zip(seconds["ours"], seconds["hf"]))
        rows.append((beam, rate["ours"], rate["hf"], paired))
    rnn_rates = {}
    if not args.no_rnn:
        for arch in ("lstm", "gru"):
            model = build_ours(arch)
            for beam in (1, BEAM):
                rnn_rates[arch, beam] = benchmark({arch: lambda: run_ours(model, src, lengths, beam)},
                                                  args.warmup, args.iters)[0][arch]
    print(f"{'strategy':<9} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'paired':>7}"
          + ("" if args.no_rnn else f" {'lstm tok/s':>11} {'gru tok/s':>10}"))
    for beam, r_ours, r_hf, paired in rows:
        name = "greedy" if beam == 1 else f"beam {beam}"
        line = f"{name:<9} {r_ours:>11.0f} {r_hf:>9.0f} {r_ours / r_hf:>5.2f}x {paired:>6.2f}x"
        if not args.no_rnn:
            line += f" {rnn_rates['lstm', beam]:>11.0f} {rnn_rates['gru', beam]:>10.0f}"
        print(line)
    print("tokens/s = generated tokens of the best hypothesis per source / best wall time of the runs; "
          "ratio = ours/hf of those, paired = median over rounds of hf time / ours time (target: ours >= 2x hf)")


if __name__ == "__main__":
    main()
