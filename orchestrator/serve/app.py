"""The Ray Serve deployment: JSON in, hypotheses out, texts batched across requests.

    POST /   {"text": "a source", "decoding": {"strategy": "beam", "beam_size": 4}}
    200      {"hypotheses": [{"text": ..., "tokens": [...], "score": -3.2, "normalized_score": -3.2}, ...]}
    POST /   {"text": ["one", "two"]}        ->  {"results": [{"hypotheses": [...]}, {"hypotheses": [...]}]}
    4xx      {"error": "<one line: what is wrong>"}

`decoding` overrides keys of the server's decoding config (the job's
`decoding.*`), validated as `DecodingConfig` validates them.  Each text is
encoded as `seqfoundry generate` encodes a line (its tokens, cut to the
model's max_positions - 1, then eos).  Texts from concurrent requests meet in
`decode_batch` (`@serve.batch`: up to serve.max_batch_size texts, waiting at
most serve.batch_wait_ms); a batch is decoded in groups of equal decoding
configs, in a worker thread so that the replica keeps answering (and
rejecting bad requests) while it decodes.  A request whose decoding fails
(e.g. decoding.min_len beyond the model) gets a 400; its batch-mates do not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import typing
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from data_pipeline.storage import as_path, local_copy
from data_pipeline.tokenizer import EOS_ID, detokenize, load_tokenizer, tokenize
from trainers.decoding import DecodingConfig, Hypothesis
from trainers.engines import Engine, load_engine
from trainers.package import TOKENIZER

from .config import ServeConfig


class RequestError(ValueError):
    """A bad request: answered with 400 and this one-line reason."""


_FIELDS = {f.name: f for f in dataclasses.fields(DecodingConfig)}
_TYPES = typing.get_type_hints(DecodingConfig)


def decoding_for(overrides: Any, default: DecodingConfig) -> DecodingConfig:
    """`default` with the request's `decoding` overrides, type-checked and validated (RequestError)."""
    if not isinstance(overrides, dict):
        raise RequestError("decoding: must be a JSON object of decoding.* keys")
    for key, value in overrides.items():
        if key not in _FIELDS:
            raise RequestError(f"decoding.{key}: unknown key (known: {', '.join(_FIELDS)})")
        expected = _TYPES[key]
        allowed = typing.get_args(expected) or (expected,)
        if not any(_matches(value, t) for t in allowed):
            names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
            raise RequestError(f"decoding.{key}: expected {names}, got {json.dumps(value)}")
    try:
        return DecodingConfig(**{**dataclasses.asdict(default), **overrides})
    except ValueError as err:
        raise RequestError(" ".join(str(err).split())) from None


def _matches(value: Any, t: type) -> bool:
    """Whether a JSON value fits a DecodingConfig field type (an int fits float; a bool fits only bool)."""
    if t is type(None):
        return value is None
    if isinstance(value, bool):
        return t is bool
    return isinstance(value, (int, float)) if t is float else isinstance(value, t)


def parse_request(body: Any, default: DecodingConfig) -> tuple[list[str], bool, DecodingConfig]:
    """(texts, whether `text` was a list, decoding config) of a request body, or RequestError."""
    if not isinstance(body, dict) or "text" not in body:
        raise RequestError('body: must be a JSON object with "text" (a string or a list of strings)')
    extra = set(body) - {"text", "decoding"}
    if extra:
        raise RequestError(f"body: unknown field {sorted(extra)[0]!r} (expected 'text' and optional 'decoding')")
    text = body["text"]
    batched = isinstance(text, list)
    texts = text if batched else [text]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise RequestError("text: must be a string or a non-empty list of strings")
    return texts, batched, decoding_for(body.get("decoding", {}), default)


def decode_grouped(engine: Engine, items: list[tuple[tuple[int, ...], DecodingConfig]]
                   ) -> list[list[Hypothesis] | Exception]:
    """Decode (source ids, config) items, one engine call per distinct config; a group whose
    decoding raises ValueError gets the error back for each of its items."""
    groups: dict[tuple, list[int]] = {}
    for i, (_, cfg) in enumerate(items):
        groups.setdefault(dataclasses.astuple(cfg), []).append(i)
    out: list[Any] = [None] * len(items)
    for indices in groups.values():
        cfg = items[indices[0]][1]
        try:
            results = engine.decode([list(items[i][0]) for i in indices], cfg)
        except ValueError as err:
            results = [RequestError(" ".join(str(err).split()))] * len(indices)
        for i, r in zip(indices, results):
            out[i] = r
    return out


@serve.deployment
class Seq2SeqServer:
    """One replica: the engine, the tokenizer and the default decoding config."""

    def __init__(self, serve_cfg: ServeConfig, decoding: DecodingConfig):
        self.engine = load_engine(serve_cfg.package, engine=serve_cfg.engine, compute_type=serve_cfg.compute_type,
                                  threads=serve_cfg.threads, key="serve")
        self.tokenizer = load_tokenizer(local_copy(as_path(serve_cfg.package) / TOKENIZER))
        self.default = decoding
        self.max_source_len = self.engine.max_positions or 2**31
        self.decode_batch.set_max_batch_size(serve_cfg.max_batch_size)
        self.decode_batch.set_batch_wait_timeout_s(serve_cfg.batch_wait_ms / 1000)

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise RequestError("body: not valid JSON") from None
            texts, batched, cfg = parse_request(body, self.default)
            results = await asyncio.gather(*(self.decode_batch((self.encode(t), cfg)) for t in texts))
            for r in results:
                if isinstance(r, Exception):
                    raise r
        except RequestError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        answers = [{"hypotheses": [self.as_json(h) for h in hyps]} for hyps in results]
        return JSONResponse({"results": answers} if batched else answers[0])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # both reset from serve.* in __init__
    async def decode_batch(self, items: list[tuple[tuple[int, ...], DecodingConfig]]) -> list:
        return await asyncio.to_thread(decode_grouped, self.engine, items)

    def encode(self, text: str) -> tuple[int, ...]:
        """Source ids as `seqfoundry generate` builds them: tokens cut to max_positions - 1, then eos."""
        return tuple(tokenize(self.tokenizer, text)[: self.max_source_len - 1]) + (EOS_ID,)

    def as_json(self, hyp: Hypothesis) -> dict:
        return {"text": detokenize(self.tokenizer, hyp.tokens), "tokens": hyp.tokens, "score": hyp.score,
                "normalized_score": hyp.normalized_score}


def build_app(serve_cfg: ServeConfig, decoding: DecodingConfig):
    """The bound Ray Serve application: serve.replicas replicas of `Seq2SeqServer`."""
    return Seq2SeqServer.options(num_replicas=serve_cfg.replicas,
                                 ray_actor_options={"num_cpus": serve_cfg.num_cpus}).bind(serve_cfg, decoding)


__all__ = ["Seq2SeqServer", "build_app", "parse_request", "decoding_for", "decode_grouped", "RequestError"]
