"""`seqfoundry serve`: Ray Serve endpoints on a local Ray cluster, over loopback
(127.0.0.1 only): concurrent requests get what an in-process decode gives, a
bad request gets its 400 and the server keeps answering."""

from __future__ import annotations

import dataclasses
import functools
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers.tiny_package import tiny_package
from trainers.decoding import DecodingConfig
from trainers.engines import load_engine

pytest.importorskip("ray.serve")
pytest.importorskip("ctranslate2")

TEXTS = ["w5 w9 w11", "w40 w41", "w7 w7 w8 w30 w22", "w13", "w4 w44 w21 w9", "w17 w18 w19 w20 w21 w22"]
CONFIGS = [{}, {"strategy": "beam", "beam_size": 3, "n_best": 2}, {"strategy": "greedy", "max_len": 5}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(local_ray, tmp_path_factory):
    """The same package served twice on one port: /torch (2 replicas) and /ct2 (CTranslate2 float32)."""
    from orchestrator.config import ClusterConfig
    from orchestrator.serve import ServeConfig
    from orchestrator.serve.command import run, stop

    package = tiny_package(tmp_path_factory.mktemp("serve"), seed=3)
    port = free_port()
    default = DecodingConfig(strategy="greedy", max_len=12)
    cfgs = {name: ServeConfig(package=str(package), engine=engine, replicas=replicas, num_cpus=0.25,
                              threads=1, port=port, route_prefix=f"/{name}", name=name, blocking=False,
                              max_batch_size=8, batch_wait_ms=20)
            for name, engine, replicas in (("torch", "torch", 2), ("ct2", "ctranslate2", 1))}
    urls = {name: run(cfg, ClusterConfig(), default) for name, cfg in cfgs.items()}
    yield package, urls, default
    for cfg in cfgs.values():
        stop(cfg)


@functools.lru_cache(maxsize=None)
def in_process(package, engine: str):
    return load_engine(package, engine=engine, threads=1)


def expected(package, engine: str, text: str, overrides: dict, default: DecodingConfig) -> list[tuple]:
    """The in-process decode of one text with the same engine and settings."""
    from data_pipeline.tokenizer import load_tokenizer, tokenize

    ids = tokenize(load_tokenizer(package / "tokenizer.json"), text) + [2]
    cfg = DecodingConfig(**{**dataclasses.asdict(default), **overrides})
    return [(h.tokens, h.score) for h in in_process(package, engine).decode([ids], cfg)[0]]


@pytest.mark.parametrize("name,engine", [("torch", "torch"), ("ct2", "ctranslate2")])
def test_concurrent_requests_equal_in_process_decode(served, name, engine):
    package, urls, default = served
    jobs = [(t, c) for t in TEXTS for c in CONFIGS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: requests.post(urls[name], json={"text": job[0], "decoding": job[1]},
                                                          timeout=120), jobs))
    for (text, overrides), answer in zip(jobs, answers):
        assert answer.status_code == 200, answer.text
        got = [(h["tokens"], h["score"]) for h in answer.json()["hypotheses"]]
        want = expected(package, engine, text, overrides, default)
        assert [g[0] for g in got] == [w[0] for w in want]
        assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-4)
    listed = requests.post(urls[name], json={"text": TEXTS[:2]}, timeout=60).json()["results"]
    assert [r["hypotheses"][0]["tokens"] for r in listed] == [expected(package, engine, t, {}, default)[0][0]
                                                             for t in TEXTS[:2]]
    assert listed[0]["hypotheses"][0]["text"] == " ".join(f"w{i}" for i in listed[0]["hypotheses"][0]["tokens"][:-1])


@pytest.mark.parametrize("body,reason", [
    (b"{not json", "body: not valid JSON"),
    ({"txt": "w5"}, 'body: must be a JSON object with "text"'),
    ({"text": 5}, "text: must be a string or a non-empty list of strings"),
    ({"text": "w5", "decoding": {"beam_sise": 3}}, "decoding.beam_sise: unknown key"),
    ({"text": "w5", "decoding": {"beam_size": "3"}}, "decoding.beam_size: expected int"),
    ({"text": "w5", "decoding": {"strategy": "beam", "beam_size": 2, "n_best": 3}}, "decoding.n_best: must be <="),
    ({"text": "w5", "decoding": {"min_len": 100, "max_len": 200}}, "decoding.min_len: 100 exceeds"),
])
def test_bad_request_gets_400_and_the_server_keeps_answering(served, body, reason):
    _, urls, _ = served
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
    answer = requests.post(urls["torch"], timeout=60, **kwargs)
    assert answer.status_code == 400
    assert answer.json()["error"].startswith(reason) and "\n" not in answer.json()["error"]
    assert requests.post(urls["torch"], json={"text": "w5 w6"}, timeout=60).status_code == 200


def test_config_refuses_bad_values_before_any_cluster_work(tmp_path):
    from orchestrator.serve import ServeConfig
    from orchestrator.serve.command import check

    with pytest.raises(ValueError, match=r"^serve\.package: is required"):
        check(ServeConfig())
    with pytest.raises(ValueError, match=r"^serve\.compute_type: the torch engine decodes in float32 only"):
        ServeConfig(package="p", compute_type="int8")
    with pytest.raises(ValueError, match=r"^serve\.replicas: must be >= 1"):
        ServeConfig(package="p", replicas=0)
    with pytest.raises(ValueError, match=r"^serve\.package: .*not found"):
        check(ServeConfig(package=str(tmp_path / "nothing")))


def test_serve_command_refuses_a_bad_config_in_one_line_with_exit_2(tmp_path, capsys):
    from orchestrator.cli import main

    assert main(["serve"]) == 2
    assert capsys.readouterr().err.strip() == ("seqfoundry serve: error: serve.package: is required "
                                               "(seqfoundry serve package=<model package folder>)")
    assert main(["serve", f"package={tmp_path / 'nothing'}"]) == 2
    assert "serve.package:" in capsys.readouterr().err
