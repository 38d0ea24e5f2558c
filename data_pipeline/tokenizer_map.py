"""Bring your own tokenizer: an HF tokenizer.json or a sentencepiece .model, re-indexed onto our ids.

Every prepared dataset keeps DESIGN.md's token ids: pad 0, bos 1, eos 2, unk 3, the sentinels
`<extra_id_i>` at 4…4+S-1, `<mask>` at 4+S, then everything else. A given tokenizer is mapped onto
them without changing how it splits text:

1. its special tokens are matched to the roles by their usual names (`[PAD]`, `<|endoftext|>`, `[CLS]`,
   …, the model's own unk token; sentencepiece models name theirs), renamed to ours and moved to the
   reserved ids; its `<extra_id_i>` and `<mask>` (or `[MASK]`) likewise;
2. what it lacks is added (as special tokens);
3. every other token keeps its relative order, from id 5+S on.

Post-processing (templates that add specials), padding and truncation are dropped: the collator adds
bos/eos itself. The mapping (old id → new id, as ranges) goes into the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from .tokenizer import MASK_TOKEN, NAMED_SPECIALS, check_specials, sentinel_token
from .storage import local_copy

ROLE_NAMES = {
    "<pad>": ("<pad>", "[PAD]", "<|pad|>", "[pad]", "<|padding|>"),
    "<s>": ("<s>", "<bos>", "[BOS]", "[CLS]", "<|startoftext|>", "<|begin_of_text|>", "<|bos|>"),
    "</s>": ("</s>", "<eos>", "[EOS]", "[SEP]", "<|endoftext|>", "<|end_of_text|>", "<|eos|>"),
    "<unk>": ("<unk>", "[UNK]", "<|unk|>"),
    MASK_TOKEN: ("<mask>", "[MASK]", "<|mask|>"),
}
VOCAB_MODELS = ("BPE", "WordPiece", "WordLevel")


def load_given_tokenizer(path: str, num_sentinels: int) -> tuple[Tokenizer, int, dict]:
    """(re-indexed tokenizer, its sentinel count, the mapping for the manifest) for `data.tokenizer`;
    ValueError naming the key when it cannot be read or mapped."""
    local = str(local_copy(path))
    try:
        if local.endswith(".model"):
            state, roles = sentencepiece_state(local)
        else:
            state, roles = json.loads(Path(local).read_text()), {}
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"data.tokenizer: cannot load {path}: {err}") from None
    if state.get("model", {}).get("type") not in (*VOCAB_MODELS, "Unigram"):
        raise ValueError(f"data.tokenizer: {path}: model type {state.get('model', {}).get('type')!r} is not "
                         "one of BPE, WordPiece, WordLevel, Unigram")
    new, mapping, sentinels = reindex(state, num_sentinels, roles)
    try:
        tok = Tokenizer.from_str(json.dumps(new, ensure_ascii=False))
        check_specials(tok, sentinels)
    except Exception as err:  # tokenizers raises its own Exception type for a state it cannot load
        raise ValueError(f"data.tokenizer: {path}: cannot be re-indexed ({err})") from None
    return tok, sentinels, mapping


# --- the old vocabulary -------------------------------------------------------------------------


def old_vocabulary(state: dict) -> list[str]:
    """Tokens by old id (model vocabulary, then added tokens past it); ids must be dense."""
    model = state["model"]
    by_id: dict[int, str] = {}
    if model["type"] == "Unigram":
        by_id.update((i, piece) for i, (piece, _) in enumerate(model["vocab"]))
    else:
        by_id.update((i, t) for t, i in model["vocab"].items())
    by_id.update((a["id"], a["content"]) for a in state.get("added_tokens", []))
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError("token ids are not 0..n-1")
    return [by_id[i] for i in range(len(by_id))]


def role_tokens(state: dict, tokens: list[str], roles: dict[str, str]) -> dict[str, str]:
    """Our reserved name → the given tokenizer's token that plays it (when it has one)."""
    present = set(tokens)
    found = {ours: theirs for ours, theirs in roles.items() if theirs in present}
    model = state["model"]
    unk = model.get("unk_token") if model["type"] != "Unigram" else (
        model["vocab"][model["unk_id"]][0] if model.get("unk_id") is not None else None)
    if unk in present:
        found.setdefault("<unk>", unk)
    for ours, names in ROLE_NAMES.items():
        if ours not in found:
            hit = next((n for n in names if n in present and n not in found.values()), None)
            if hit is not None:
                found[ours] = hit
    return found


# --- re-indexing ---------------------------------------------------------------------------------


def reindex(state: dict, num_sentinels: int, roles: dict[str, str]) -> tuple[dict, dict, int]:
    """The state with reserved tokens at our ids, the mapping, and the number of sentinels."""
    tokens = old_vocabulary(state)
    present = set(tokens)
    given = next(i for i in range(len(tokens) + 1) if sentinel_token(i) not in present)
    sentinels = given or num_sentinels
    found = role_tokens(state, tokens, roles)
    reserved = [*NAMED_SPECIALS, *(sentinel_token(i) for i in range(sentinels)), MASK_TOKEN]
    theirs = [found.get(name, name if name in present else None) for name in reserved]
    used = {t for t in theirs if t is not None}
    rest = [t for t in tokens if t not in used]
    new_id = {t: i for i, t in enumerate(reserved)} | {t: len(reserved) + i for i, t in enumerate(rest)}
    rename = {old: name for name, old in zip(reserved, theirs) if old is not None and old != name}
    old_id = {t: i for i, t in enumerate(tokens)}
    mapping = {
        "reserved": [{"token": name, "given": old, "given_id": old_id.get(old), "id": i}
                     for i, (name, old) in enumerate(zip(reserved, theirs))],
        "added": [name for name, old in zip(reserved, theirs) if old is None],
        "moved": id_ranges([(old_id[t], new_id[t]) for t in rest]),
    }
    return rebuilt_state(state, reserved, rest, rename, new_id), mapping, sentinels


def id_ranges(pairs: list[tuple[int, int]]) -> list[list[int]]:
    """[(old, new), …] in old order as runs [old_start, new_start, length]."""
    runs: list[list[int]] = []
    for old, new in pairs:
        if runs and old == runs[-1][0] + runs[-1][2] and new == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([old, new, 1])
    return runs


def rebuilt_state(state: dict, reserved: list[str], rest: list[str], rename: dict[str, str],
                  new_id: dict[str, int]) -> dict:
    state = json.loads(json.dumps(state))  # a deep copy
    model = state["model"]
    order = reserved + rest
    if model["type"] == "Unigram":
        scores = {piece: score for piece, score in model["vocab"]}
        back = {name: old for old, name in rename.items()}
        model["vocab"] = [[t, scores.get(back.get(t, t), 0.0)] for t in order]
        model["unk_id"] = 3
    else:
        model["vocab"] = {t: i for i, t in enumerate(order)}
        if model.get("unk_token") is not None or model["type"] == "WordPiece":
            model["unk_token"] = "<unk>"
    old_added = {rename.get(a["content"], a["content"]): a for a in state.get("added_tokens", [])}
    special = set(reserved)
    state["added_tokens"] = [
        {**old_added.get(t, {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}),
         "id": new_id[t], "content": t, **({"special": True, "normalized": False} if t in special else {})}
        for t in order if t in special or t in old_added]
    state["added_tokens"].sort(key=lambda a: a["id"])
    state["post_processor"] = state["padding"] = state["truncation"] = None
    return state


# --- sentencepiece -------------------------------------------------------------------------------


def sentencepiece_state(path: str) -> tuple[dict, dict[str, str]]:
    """An HF tokenizer state equivalent to a sentencepiece model (Unigram or BPE), and its roles."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise ValueError("reading a sentencepiece .model needs sentencepiece "
                         "(pip install 'seqfoundry[sentencepiece]')") from None
    from tokenizers import decoders, models, normalizers, pre_tokenizers, Regex

    proto = pb.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    spec, pieces = proto.trainer_spec, list(proto.pieces)
    vocab = [(p.piece, p.score) for p in pieces]
    if spec.model_type == pb.TrainerSpec.UNIGRAM:
        model = models.Unigram(vocab, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    elif spec.model_type == pb.TrainerSpec.BPE:
        ids = {piece: i for i, (piece, _) in enumerate(vocab)}
        model = models.BPE(ids, bpe_merges(ids), unk_token=vocab[spec.unk_id][0], fuse_unk=True,
                           byte_fallback=spec.byte_fallback)
    else:
        raise ValueError(f"sentencepiece model type {spec.model_type} is not Unigram or BPE")
    tok = Tokenizer(model)
    charsmap = proto.normalizer_spec.precompiled_charsmap
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(Regex(" {2,}"), " ")])
    scheme = "always" if proto.normalizer_spec.add_dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    controls = [p.piece for p in pieces if p.type in (pb.ModelProto.SentencePiece.CONTROL,
                                                      pb.ModelProto.SentencePiece.UNKNOWN)]
    tok.add_special_tokens(controls)
    tok.add_tokens([p.piece for p in pieces if p.type == pb.ModelProto.SentencePiece.USER_DEFINED])
    roles = {name: vocab[i][0] for name, i in zip(NAMED_SPECIALS, (spec.pad_id, spec.bos_id, spec.eos_id,
                                                                    spec.unk_id)) if 0 <= i < len(vocab)}
    return json.loads(tok.to_str()), roles


def bpe_merges(ids: dict[str, int]) -> list[tuple[str, str]]:
    """Merges of a sentencepiece BPE model, recovered from its vocabulary (a piece's id is its rank)."""
    merges = []
    for piece, rank in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((rank, ids[left], ids[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]
