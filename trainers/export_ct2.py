"""Export a Transformer model package as a CTranslate2 model, and keep one
converted copy per compute type beside the package (`ct2_model_for`).

    export_ctranslate2("runs/p1/model", "runs/p1/ct2", quantization="int8")
    translator = ctranslate2.Translator("runs/p1/ct2", compute_type="int8")

The conversion is a custom CTranslate2 converter (`PackageConverter`, like
those in `ctranslate2/converters/`) that fills a `TransformerSpec` through the
spec API; CTranslate2 then validates, quantizes and saves it.  Every one of
our four Transformer variants maps exactly:

* `pre_norm` = our `norm_first` (pre-LN keeps the final LayerNorms, post-LN has none);
* the position table -- sinusoidal or learned -- is written as the spec's
  `position_encodings.encodings` (positions from 0, as ours), so CTranslate2
  adds exactly our table, never its own sinusoids;
* embeddings scaled by sqrt(d_model) (`scale_embeddings`), shared by the
  encoder, the decoder and the output projection (tied, no bias);
* our fused QKV (self-attention) and KV (cross-attention) projections are
  CTranslate2's fused layouts already; activation GELU (erf) or ReLU;
  LayerNorm epsilon 1e-5.

The vocabulary is the package tokenizer's tokens in id order; the model config
names its pad/bos/eos/unk strings (decoder start = bos, no source bos/eos
added: seqfoundry sources already end with eos).  `tokenizer.json` is copied
beside the model.  LSTM/GRU packages are refused in one line (CTranslate2 has
no such family).  `ctranslate2` is imported lazily.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from data_pipeline.storage import as_path, cache_root, is_remote, local_copy, sha256_file

from .models import BOS_ID, EOS_ID, UNK_ID, ModelConfig, Seq2SeqModel
from .package import TOKENIZER, WEIGHTS, load_package, read_model_config

COMPUTE_TYPES = ("float32", "int8", "int8_float32", "bfloat16")
"""Compute types the engines accept (`bfloat16` only where CTranslate2 supports it on the device)."""
MARKER = "seqfoundry_ct2.json"
"""Written into a converted folder: the weights' sha256, the quantization and the model's max_positions."""


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse (one-line ValueError naming model.arch) a model CTranslate2 cannot run."""
    if cfg.arch != "transformer":
        raise ValueError(f"model.arch: {cfg.arch!r} cannot be exported to CTranslate2 "
                         "(it has no LSTM/GRU family); only arch=transformer can")


def vocabulary(tokenizer_json: str | Path, vocab_size: int) -> list[str]:
    """The tokenizer's token strings in id order (exactly `vocab_size` of them)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tokens = [tok.id_to_token(i) for i in range(vocab_size)]
    if any(t is None for t in tokens) or len(set(tokens)) != vocab_size:
        raise ValueError(f"{tokenizer_json}: does not hold {vocab_size} distinct tokens for ids 0..{vocab_size - 1}")
    return tokens


def transformer_spec(model: Seq2SeqModel, vocab: list[str]):
    """A `ctranslate2.specs.TransformerSpec` holding our model's fp32 weights (see the module docstring)."""
    from ctranslate2.specs import common_spec, transformer_spec as ts

    cfg = model.config
    check_exportable(cfg)
    act = common_spec.Activation.GELU if cfg.activation == "gelu" else common_spec.Activation.RELU
    encoder = ts.TransformerEncoderSpec(cfg.num_encoder_layers, cfg.num_heads, pre_norm=cfg.norm_first, activation=act)
    decoder = ts.TransformerDecoderSpec(cfg.num_decoder_layers, cfg.num_heads, pre_norm=cfg.norm_first, activation=act)
    spec = ts.TransformerSpec(encoder, decoder)
    w = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    for side, layers, pos, norm in ((encoder, "encoder", "enc_pos", "enc_norm"),
                                    (decoder, "decoder", "dec_pos", "dec_norm")):
        emb = side.embeddings[0] if isinstance(side.embeddings, list) else side.embeddings
        emb.weight = w["embed.weight"]
        side.scale_embeddings = True  # sqrt(d_model), as ours
        side.position_encodings.encodings = (w[f"{pos}.table.weight"] if cfg.positions == "learned"
                                             else getattr(model, pos).table.numpy())
        if cfg.norm_first:
            _norm(side.layer_norm, w, norm)
        for i, layer in enumerate(side.layer):
            (_encoder_layer if layers == "encoder" else _decoder_layer)(layer, w, f"{layers}.{i}")
    decoder.projection.weight = w["embed.weight"]  # tied output projection, no bias
    spec.register_source_vocabulary(vocab)
    spec.register_target_vocabulary(vocab)
    spec.config.unk_token, spec.config.bos_token, spec.config.eos_token = vocab[UNK_ID], vocab[BOS_ID], vocab[EOS_ID]
    spec.config.decoder_start_token = vocab[BOS_ID]
    spec.config.add_source_bos = spec.config.add_source_eos = False
    spec.config.layer_norm_epsilon = 1e-5
    return spec


def _linear(spec, w: dict[str, np.ndarray], name: str) -> None:
    spec.weight, spec.bias = w[f"{name}.weight"], w[f"{name}.bias"]


def _norm(spec, w: dict[str, np.ndarray], name: str) -> None:
    spec.gamma, spec.beta = w[f"{name}.weight"], w[f"{name}.bias"]


def _encoder_layer(spec, w: dict[str, np.ndarray], p: str) -> None:
    _linear(spec.self_attention.linear[0], w, f"{p}.attn.qkv")  # fused q, k, v rows
    _linear(spec.self_attention.linear[1], w, f"{p}.attn.out")
    _norm(spec.self_attention.layer_norm, w, f"{p}.res_attn.norm")
    _ffn(spec.ffn, w, p, "res_ffn")


def _decoder_layer(spec, w: dict[str, np.ndarray], p: str) -> None:
    _linear(spec.self_attention.linear[0], w, f"{p}.self_attn.qkv")
    _linear(spec.self_attention.linear[1], w, f"{p}.self_attn.out")
    _norm(spec.self_attention.layer_norm, w, f"{p}.res_self.norm")
    _linear(spec.attention.linear[0], w, f"{p}.cross_attn.q")
    _linear(spec.attention.linear[1], w, f"{p}.cross_attn.kv")  # fused k, v rows
    _linear(spec.attention.linear[2], w, f"{p}.cross_attn.out")
    _norm(spec.attention.layer_norm, w, f"{p}.res_cross.norm")
    _ffn(spec.ffn, w, p, "res_ffn")


def _ffn(spec, w: dict[str, np.ndarray], p: str, residual: str) -> None:
    _linear(spec.linear_0, w, f"{p}.ffn.fc1")
    _linear(spec.linear_1, w, f"{p}.ffn.fc2")
    _norm(spec.layer_norm, w, f"{p}.{residual}.norm")


def _converter_class():
    from ctranslate2.converters.converter import Converter

    class PackageConverter(Converter):
        """CTranslate2 converter of a seqfoundry Transformer package."""

        def __init__(self, package_dir: str | Path):
            self.package_dir = package_dir

        def _load(self):
            cfg = read_model_config(self.package_dir)
            check_exportable(cfg)
            tokens = vocabulary(local_copy(as_path(self.package_dir) / TOKENIZER), cfg.vocab_size)
            return transformer_spec(load_package(self.package_dir), tokens)

    return PackageConverter


def export_ctranslate2(package_dir: str | Path, out_dir: str | Path, *, quantization: str | None = None) -> Path:
    """Write `out_dir`: the package as a CTranslate2 model, with `tokenizer.json` beside it.

    quantization: None or "float32" (fp32 weights), "int8", "int8_float32",
    "bfloat16", ... (any CTranslate2 weight type; the weights are stored in it).
    The folder is written under a temporary name and renamed into place, so a
    reader never sees half a model.  Raises ValueError for LSTM/GRU packages.
    Returns the output folder.
    """
    cfg = read_model_config(package_dir)
    check_exportable(cfg)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _converter_class()(package_dir).convert(str(tmp / "model"), quantization=quantization)
        shutil.copyfile(local_copy(as_path(package_dir) / TOKENIZER), tmp / "model" / TOKENIZER)
        marker = {"weights_sha256": sha256_file(local_copy(as_path(package_dir) / WEIGHTS)),
                  "quantization": quantization or "float32", "max_positions": cfg.max_positions}
        (tmp / "model" / MARKER).write_text(json.dumps(marker, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ct2_model_for(package_dir: str | Path, compute_type: str = "float32") -> Path:
    """The CTranslate2 model of a package for `compute_type`, converted once and then reused.

    Kept at `<package>/ctranslate2-<compute_type>/` when the package is a
    writable local folder, else at `$SEQFOUNDRY_CACHE/ctranslate2/<weights
    sha256>-<compute_type>/` (default cache ~/.cache/seqfoundry).  A copy is
    reused while its marker names the package's current weights (sha256), and
    converted again otherwise.  The weights are stored quantized to the compute
    type (int8 for int8 and int8_float32), so loading does not convert again.
    """
    if compute_type not in COMPUTE_TYPES:  # the device's support is checked where the model is loaded
        raise ValueError(f"compute_type: must be one of {COMPUTE_TYPES}, got {compute_type!r}")
    check_exportable(read_model_config(package_dir))
    weights_sha = sha256_file(local_copy(as_path(package_dir) / WEIGHTS))
    for folder in _candidate_folders(package_dir, compute_type, weights_sha):
        if _is_current(folder, weights_sha):
            return folder
    last_error: OSError | None = None
    for folder in _candidate_folders(package_dir, compute_type, weights_sha):
        try:
            return export_ctranslate2(package_dir, folder, quantization=compute_type)
        except OSError as err:  # not writable: try the cache
            last_error = err
    raise OSError(f"{package_dir}: no writable place for its CTranslate2 model ({last_error})")


def _candidate_folders(package_dir: str | Path, compute_type: str, weights_sha: str) -> list[Path]:
    folders = []
    if not is_remote(package_dir) and os.access(as_path(package_dir), os.W_OK):
        folders.append(as_path(package_dir) / f"ctranslate2-{compute_type}")
    folders.append(cache_root() / "ctranslate2" / f"{weights_sha[:16]}-{compute_type}")
    return folders


def _is_current(folder: Path, weights_sha: str) -> bool:
    try:
        return json.loads((folder / MARKER).read_text())["weights_sha256"] == weights_sha
    except (OSError, ValueError, KeyError):
        return False


def check_compute_type(compute_type: str, device: str = "cpu", *, key: str = "compute_type") -> None:
    """Refuse (one-line ValueError naming `key`) a compute type we do not offer or the device lacks."""
    if compute_type not in COMPUTE_TYPES:
        raise ValueError(f"{key}: must be one of {COMPUTE_TYPES}, got {compute_type!r}")
    import ctranslate2

    supported = ctranslate2.get_supported_compute_types(device)
    if compute_type not in supported:
        raise ValueError(f"{key}: {compute_type!r} is not supported by CTranslate2 on this {device} "
                         f"(supported here: {sorted(set(COMPUTE_TYPES) & set(supported))})")


__all__ = ["export_ctranslate2", "ct2_model_for", "transformer_spec", "vocabulary", "check_compute_type",
           "check_exportable", "COMPUTE_TYPES"]
