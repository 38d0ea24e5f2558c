"""Export a Transformer model package as a Hugging Face `transformers` folder.

    export_hf("runs/p1/model", "runs/p1/hf")
    # then, with no seqfoundry code:
    model = AutoModelForSeq2SeqLM.from_pretrained("runs/p1/hf")
    tokenizer = AutoTokenizer.from_pretrained("runs/p1/hf")

Which architecture.  Our Transformer is a family of four (pre-/post-LN x
sinusoidal/learned positions), each with a shared embedding scaled by
sqrt(d_model), tied to the output projection (no bias), no LayerNorm on the
embeddings, positions counted from 0, biased linear layers and an exact-erf
GELU or ReLU.  Three `transformers` architectures are that family member
exactly:

    norm_first  positions    transformers       why this one
    true        sinusoidal   Pegasus            pre-LN, final LayerNorms, fixed sinusoids
    true        learned      Blenderbot         pre-LN, final LayerNorms, learned table without offset
    false       sinusoidal   Marian             post-LN, no final LayerNorm, fixed sinusoids

Post-LN with learned positions has no match: BART (and mBART, BlenderbotSmall)
always apply a LayerNorm to the embeddings (`layernorm_embedding`), which ours
does not have; such a package is refused in one line.

Sinusoids.  Ours interleave the channels (sin on even channels, cos on odd,
Vaswani et al.); Pegasus and Marian put all sines first, then all cosines,
with the same frequencies.  A model is unchanged by one fixed permutation of
the residual-stream channels applied to every weight that reads or writes the
stream (LayerNorm is permutation-equivariant; attention and FFN inner
dimensions are untouched), so the export permutes the channels to
[0, 2, 4, ..., 1, 3, 5, ...]: the permuted model's position table is then
exactly the HF one (which HF may recompute on load).

Generation defaults (`generation_config.json`): decoder start = bos = 1,
eos = 2, pad = 0, `forced_eos_token_id` = eos (at the length limit only eos,
as our decoder), pad and bos suppressed (never generated, as ours), and
`max_length` = 1 + our default length limit min(200, max_positions) (HF counts
the decoder start token).  The tokenizer appends eos to a source, as
`seqfoundry generate` does, and truncates to `max_positions` tokens.

`transformers` is imported lazily: only exporting needs it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from data_pipeline.storage import as_path

from .decoding import DecodingConfig
from .models import BOS_ID, EOS_ID, PAD_ID, UNK_ID, ModelConfig, Seq2SeqModel
from .package import TOKENIZER, PackageError, load_package, read_model_config

HF_ARCHITECTURES = {  # (norm_first, positions) -> transformers model_type
    (True, "sinusoidal"): "pegasus",
    (True, "learned"): "blenderbot",
    (False, "sinusoidal"): "marian",
}


def hf_model_type(cfg: ModelConfig) -> str:
    """The `transformers` model_type that computes exactly what a model of `cfg` computes.

    Raises ValueError (one line, naming the option) for LSTM/GRU models and for
    post-LN Transformers with learned positions.
    """
    if cfg.arch != "transformer":
        raise ValueError(f"model.arch: {cfg.arch!r} cannot be exported to transformers "
                         "(no LSTM/GRU encoder-decoder there); only arch=transformer can")
    key = (cfg.norm_first, cfg.positions)
    if key not in HF_ARCHITECTURES:
        raise ValueError("model.positions: 'learned' with model.norm_first=false has no transformers architecture "
                         "(BART adds a LayerNorm on the embeddings); use sinusoidal positions or pre-LN")
    return HF_ARCHITECTURES[key]


def hf_config(cfg: ModelConfig):
    """The `transformers` config (Pegasus, Blenderbot or Marian) of a model of `cfg`."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        hf_model_type(cfg), vocab_size=cfg.vocab_size, d_model=cfg.d_model, max_position_embeddings=cfg.max_positions,
        encoder_layers=cfg.num_encoder_layers, decoder_layers=cfg.num_decoder_layers,
        encoder_attention_heads=cfg.num_heads, decoder_attention_heads=cfg.num_heads,
        encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim, activation_function=cfg.activation,
        dropout=cfg.dropout, attention_dropout=0.0, activation_dropout=0.0,  # ours drops embeddings and residuals only
        scale_embedding=True, tie_word_embeddings=True, share_encoder_decoder_embeddings=True,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, decoder_start_token_id=BOS_ID,
        forced_eos_token_id=EOS_ID, unk_token_id=UNK_ID)


def channel_permutation(cfg: ModelConfig) -> torch.Tensor:
    """(D,) order of our residual channels in the HF model: sines first for sinusoidal positions, else identity."""
    D = cfg.d_model
    if cfg.positions != "sinusoidal":
        return torch.arange(D)
    return torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])


def permuted_state_dict(model: Seq2SeqModel, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our fp32 weights with the residual channels reordered by `perm` (D,).

    Reads the stream (input dim D): embeddings, position tables, QKV / Q / KV
    and fc1 weights.  Writes it (output dim D): attention `out` and fc2 weights
    and biases.  LayerNorm weights and biases live on it.
    """
    out = {}
    for name, value in model.state_dict().items():
        value = value.detach().float()
        if name.endswith(("embed.weight", "table.weight", "qkv.weight", ".q.weight", ".kv.weight", "fc1.weight")):
            value = value[:, perm]
        elif name.endswith(("out.weight", "fc2.weight")):
            value = value[perm, :]
        elif name.endswith(("out.bias", "fc2.bias")) or "norm." in name:
            value = value[perm]
        out[name] = value.contiguous()
    return out


def _hf_names(ours: dict[str, torch.Tensor], D: int) -> dict[str, torch.Tensor]:
    """Rename (and split the fused projections of) our weights to HF Pegasus/Blenderbot/Marian names."""
    hf = {"model.shared.weight": ours["embed.weight"]}
    for side, pos in (("encoder", "enc_pos"), ("decoder", "dec_pos")):
        if f"{pos}.table.weight" in ours:
            hf[f"model.{side}.embed_positions.weight"] = ours[f"{pos}.table.weight"]
    for name, norm in (("encoder", "enc_norm"), ("decoder", "dec_norm")):
        for p in ("weight", "bias"):
            if f"{norm}.{p}" in ours:
                hf[f"model.{name}.layer_norm.{p}"] = ours[f"{norm}.{p}"]
    rules = [  # (our sub-name, HF sub-names of its D-row blocks)
        (r"encoder\.(\d+)\.attn\.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        (r"encoder\.(\d+)\.attn\.out", ("self_attn.out_proj",)),
        (r"encoder\.(\d+)\.res_attn\.norm", ("self_attn_layer_norm",)),
        (r"encoder\.(\d+)\.res_ffn\.norm", ("final_layer_norm",)),
        (r"(?:en|de)coder\.(\d+)\.ffn\.(fc[12])", None),
        (r"decoder\.(\d+)\.self_attn\.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        (r"decoder\.(\d+)\.self_attn\.out", ("self_attn.out_proj",)),
        (r"decoder\.(\d+)\.cross_attn\.q", ("encoder_attn.q_proj",)),
        (r"decoder\.(\d+)\.cross_attn\.kv", ("encoder_attn.k_proj", "encoder_attn.v_proj")),
        (r"decoder\.(\d+)\.cross_attn\.out", ("encoder_attn.out_proj",)),
        (r"decoder\.(\d+)\.res_self\.norm", ("self_attn_layer_norm",)),
        (r"decoder\.(\d+)\.res_cross\.norm", ("encoder_attn_layer_norm",)),
        (r"decoder\.(\d+)\.res_ffn\.norm", ("final_layer_norm",)),
    ]
    for name, value in ours.items():
        stem, _, param = name.rpartition(".")
        for pattern, targets in rules:
            m = re.fullmatch(pattern, stem)
            if m is None:
                continue
            side = "encoder" if name.startswith("encoder") else "decoder"
            prefix = f"model.{side}.layers.{m.group(1)}."
            targets = targets or (m.group(2),)
            blocks = value.split(D) if len(targets) > 1 else (value,)  # fused QKV / KV rows: q, k, v blocks of D
            for block, target in zip(blocks, targets):
                hf[f"{prefix}{target}.{param}"] = block
            break
    return hf


def to_hf_model(model: Seq2SeqModel):
    """A `transformers` seq2seq LM (eval mode) that computes the same function as our `model`.

    Raises ValueError for a configuration with no matching architecture
    (see `hf_model_type`).
    """
    from transformers import AutoModelForSeq2SeqLM

    cfg = model.config
    hf = AutoModelForSeq2SeqLM.from_config(hf_config(cfg)).eval()
    perm = channel_permutation(cfg)
    ours = _hf_names(permuted_state_dict(model, perm), cfg.d_model)
    target = hf.state_dict()
    tied = re.compile(r"model\.(encoder|decoder)\.embed_tokens\.weight|lm_head\.weight")
    for name in target:
        if name in ours:
            continue
        if tied.fullmatch(name):
            ours[name] = ours["model.shared.weight"]
        elif name == "final_logits_bias" or name.endswith("embed_positions.weight"):
            ours[name] = target[name]  # zeros / HF's own fixed sinusoids (checked below)
        else:
            raise PackageError(f"transformers {hf.config.model_type}: no weight of ours for {name}")
    unexpected = set(ours) - set(target)
    if unexpected:
        raise PackageError(f"transformers {hf.config.model_type}: no place for {sorted(unexpected)[:3]}")
    if cfg.positions == "sinusoidal":
        _check_sinusoids(hf, model, perm)
    hf.load_state_dict(ours, strict=True)
    return hf


def _check_sinusoids(hf, model: Seq2SeqModel, perm: torch.Tensor) -> None:
    """HF's fixed position table must be ours with the channels permuted."""
    ours = model.enc_pos.table[:, perm]
    theirs = hf.get_encoder().embed_positions.weight.detach()
    err = (ours - theirs).abs().max().item()
    if err > 1e-5:
        raise PackageError(f"transformers {hf.config.model_type}: its sinusoids differ from ours by {err:.2e}")


def generation_config(cfg: ModelConfig):
    """HF generation defaults that mirror our decoder's contract (see the module docstring)."""
    from transformers import GenerationConfig

    return GenerationConfig(decoder_start_token_id=BOS_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                            pad_token_id=PAD_ID, forced_eos_token_id=EOS_ID, suppress_tokens=[PAD_ID, BOS_ID],
                            max_length=1 + min(DecodingConfig().max_len, cfg.max_positions))


def hf_tokenizer(tokenizer_json: str | Path, *, max_length: int):
    """Our `tokenizers` file as a `PreTrainedTokenizerFast`: special tokens set, eos appended to every text."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(tokenizer_json))
    pad, bos, eos, unk = (tok.id_to_token(i) for i in (PAD_ID, BOS_ID, EOS_ID, UNK_ID))
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                                       special_tokens=[(eos, EOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos,
                                   unk_token=unk, model_max_length=max_length)


def export_hf(package_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir`: a `transformers` model (safetensors), its generation config and tokenizer.

    `package_dir` is a seqfoundry model package (local or object-storage URL).
    Raises ValueError naming the model option when no `transformers`
    architecture matches (LSTM/GRU; post-LN with learned positions).
    Returns the output folder.
    """
    cfg = read_model_config(package_dir)
    hf_model_type(cfg)  # refuse before loading any weights
    hf = to_hf_model(load_package(package_dir))
    hf.generation_config = generation_config(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    from data_pipeline.storage import local_copy

    tokenizer = hf_tokenizer(local_copy(as_path(package_dir) / TOKENIZER), max_length=cfg.max_positions)
    tokenizer.save_pretrained(out)
    return out


__all__ = ["export_hf", "to_hf_model", "hf_model_type", "hf_config", "hf_tokenizer", "generation_config",
           "HF_ARCHITECTURES"]
