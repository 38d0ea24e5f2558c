"""A tiny Transformer model package with non-trivial random weights and a
word-level tokenizer, for the export / engine / serving tests (no training)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from trainers.models import ModelConfig, build_model
from trainers.models.base import Seq2SeqModel
from trainers.package import Lineage, write_package

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def word_tokenizer(path: Path, vocab_size: int) -> Path:
    """A whitespace word-level `tokenizers` file: the 4 specials, then words w4 ... w{V-1}."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))
    return path


def tiny_model(seed: int = 0, *, vocab_size: int = 48, d_model: int = 32, layers: int = 2, num_heads: int = 4,
               ffn_dim: int = 64, max_positions: int = 64, eos_scale: float = 2.5, **overrides) -> Seq2SeqModel:
    """A Transformer whose weights are drawn wide (std 0.3, LayerNorm gains 1 +- 0.3): its next-token
    distributions are peaked and far from uniform, so argmax and beam choices have no near-ties.
    The eos embedding row is scaled by `eos_scale` so that some hypotheses end early and others
    run to the length limit (where eos is forced)."""
    cfg = ModelConfig(arch="transformer", vocab_size=vocab_size, d_model=d_model, num_encoder_layers=layers,
                      num_decoder_layers=layers, num_heads=num_heads, ffn_dim=ffn_dim, dropout=0.0,
                      max_positions=max_positions, **overrides)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
        model.embed.weight[2] *= eos_scale
    return model.eval()


def tiny_package(folder: Path, model: Seq2SeqModel | None = None, *, seed: int = 0, **overrides) -> Path:
    """`<folder>/model`: a package of `model` (default `tiny_model(seed, **overrides)`) with a word tokenizer."""
    model = model if model is not None else tiny_model(seed, **overrides)
    folder.mkdir(parents=True, exist_ok=True)
    tok = word_tokenizer(folder / "tokenizer.json", model.config.vocab_size)
    return write_package(folder / "model", model, tokenizer=tok, lineage=Lineage())


def sources(n: int, *, vocab_size: int = 48, min_len: int = 3, max_len: int = 9, seed: int = 1) -> list[list[int]]:
    """n random sources (ids >= 4, varied lengths), each ending with eos as `seqfoundry generate` builds them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        out.append(torch.randint(4, vocab_size, (length - 1,), generator=g).tolist() + [2])
    return out


def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, S) ids and (B,) lengths."""
    lengths = torch.tensor([len(r) for r in rows])
    src = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for row, ids in zip(src, rows):
        row[: len(ids)] = torch.tensor(ids)
    return src, lengths


@functools.lru_cache(maxsize=None)
def trained_tiny_model(seed: int = 0, *, steps: int = 60, **overrides) -> Seq2SeqModel:
    """`tiny_model` trained briefly to copy random word sequences (target = source), so that
    its hypotheses end with eos by themselves, about as long as the source, while its
    distributions stay far from one-hot (the copy is not learned perfectly).

    Cached for the test session: callers must not modify the model."""
    model = tiny_model(seed, eos_scale=1.0, **overrides).train()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed + 100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        rows = sources(32, vocab_size=vocab, seed=int(torch.randint(0, 2**31, (1,), generator=g)))
        src, lengths = padded(rows)
        labels = src.clone()  # target + eos, pad 0
        tgt_in = torch.cat([torch.ones_like(src[:, :1]), src[:, :-1]], dim=1)
        tgt_in[tgt_in == 2] = 0
        loss = model(src, lengths, tgt_in, labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
