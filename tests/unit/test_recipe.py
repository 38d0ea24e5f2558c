"""The training-recipe knobs of issue 10, each against a reference: label smoothing (F.cross_entropy),
the linear and polynomial schedules (hand-computed), contiguous text chunks (`data.sample_tokens`) and
checkpoint averaging (a hand-averaged state dict)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline import DataConfig, ShardStream, load_tokenizer, prepare
from data_pipeline.chunks import chunk_bounds, token_chunks
from data_pipeline.prepare import output_settings, plan as prepare_plan
from trainers.config import TrainerConfig
from trainers.engine import lr_lambda
from trainers.export import average_state_dicts, export_package
from trainers.models import PAD_ID, ModelConfig, build_model
from trainers.models.losses import linear_cross_entropy
from trainers.package import Lineage, PackageError, load_package, read_lineage, state_dict_for

# --- label smoothing ------------------------------------------------------------------------


def _loss_case(seed: int = 0, n: int = 37, d: int = 16, v: int = 50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float32)
    weight = torch.randn(v, d, generator=g, dtype=torch.float32)
    labels = torch.randint(1, v, (n,), generator=g)
    labels[::5] = PAD_ID  # padding rows are ignored
    return hidden, weight, labels


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.9])
def test_label_smoothing_matches_f_cross_entropy_in_value_and_gradient(eps):
    hidden, weight, labels = _loss_case()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = linear_cross_entropy(h1, w1, labels, chunk_size=8, label_smoothing=eps)  # several chunks
    ours.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = F.cross_entropy(F.linear(h2, w2), labels, ignore_index=PAD_ID, label_smoothing=eps)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)  # float32, as training
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the evaluation path (no autograd function) agrees too
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, chunk_size=8,
                                                        label_smoothing=eps), ref.detach(),
                                   rtol=1e-5, atol=1e-6)


def test_label_smoothing_through_a_model_matches_its_logits():
    model = build_model(ModelConfig(vocab_size=40, d_model=16, num_encoder_layers=1, num_decoder_layers=1,
                                    num_heads=2, ffn_dim=32, dropout=0.0))
    src, tgt = torch.randint(4, 40, (3, 7)), torch.randint(4, 40, (3, 6))
    tgt[2, 4:] = PAD_ID
    hidden = model.hidden_states(src, torch.tensor([7, 7, 7]), tgt)  # (B, T, D)
    fused = linear_cross_entropy(hidden.flatten(0, 1), model.output_weight, tgt.flatten(), label_smoothing=0.1)
    logits = model(src, torch.tensor([7, 7, 7]), tgt)  # (B, T, V)
    ref = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=PAD_ID, label_smoothing=0.1)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, key", [
    (dict(label_smoothing=1.0), "trainer.label_smoothing"),
    (dict(label_smoothing=-0.1), "trainer.label_smoothing"),
    (dict(schedule="step"), "trainer.schedule"),
    (dict(schedule="polynomial", power=0.0), "trainer.power"),
])
def test_recipe_keys_are_validated_by_name(kwargs, key):
    with pytest.raises(ValueError, match=key):
        TrainerConfig(**kwargs)


def test_the_loss_refuses_a_smoothing_outside_0_1():
    hidden, weight, labels = _loss_case()
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, labels, label_smoothing=1.0)


# --- schedules ------------------------------------------------------------------------------


def test_linear_schedule_by_hand():
    f = lr_lambda(TrainerConfig(max_steps=110, warmup_steps=10, schedule="linear", min_lr_ratio=0.0))
    # warm-up (step + 1) / 10, then 1 - (step - 10) / 100
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 35: 0.75, 60: 0.5, 100: 0.1, 110: 0.0, 200: 0.0}
    assert {s: f(s) for s in expected} == pytest.approx(expected)
    floor = lr_lambda(TrainerConfig(max_steps=110, warmup_steps=10, schedule="linear", min_lr_ratio=0.2))
    assert floor(60) == pytest.approx(0.2 + 0.8 * 0.5) and floor(110) == pytest.approx(0.2)


def test_polynomial_schedule_by_hand():
    f = lr_lambda(TrainerConfig(max_steps=104, warmup_steps=4, schedule="polynomial", power=2.0,
                                min_lr_ratio=0.1))
    # lr_end + (1 - lr_end) * (1 - progress) ** 2, progress = (step - 4) / 100
    expected = {0: 0.25, 3: 1.0, 4: 1.0, 29: 0.1 + 0.9 * 0.75 ** 2, 54: 0.1 + 0.9 * 0.25, 104: 0.1}
    assert {s: f(s) for s in expected} == pytest.approx(expected)
    linear = lr_lambda(TrainerConfig(max_steps=104, warmup_steps=4, schedule="linear", min_lr_ratio=0.1))
    power1 = lr_lambda(TrainerConfig(max_steps=104, warmup_steps=4, schedule="polynomial", power=1.0,
                                     min_lr_ratio=0.1))
    assert [linear(s) for s in range(110)] == pytest.approx([power1(s) for s in range(110)])


def test_schedule_drives_the_optimizer_lr():
    """The factor is what LambdaLR applies to trainer.lr, step by step (as build_engine wires it)."""
    cfg = TrainerConfig(lr=2e-3, max_steps=20, warmup_steps=5, schedule="linear", min_lr_ratio=0.0)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    hand = [2e-3 * (s + 1) / 5 if s < 5 else 2e-3 * (1 - (s - 5) / 15) for s in range(20)]
    assert seen == pytest.approx(hand)


# --- contiguous chunks ------------------------------------------------------------------------

END = 99  # a sentence-end token id


def _doc(sentence_lengths: list[int]) -> np.ndarray:
    """Token ids: sentences of the given lengths, each ending with END."""
    parts = [np.r_[np.arange(10, 10 + n - 1) % 90 + 4, END] for n in sentence_lengths]
    return np.concatenate(parts).astype(np.int64)


def test_chunks_keep_every_token_in_order_within_bounds():
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = _doc(list(rng.integers(1, 40, size=rng.integers(1, 30))))
        target = int(rng.integers(8, 64))
        chunks = token_chunks(ids, target, [END])
        assert np.array_equal(np.concatenate(chunks), ids)
        assert all(len(c) <= target for c in chunks)
        assert all(len(c) > target // 2 for c in chunks[:-1])


def test_chunks_end_at_sentence_ends_when_one_is_in_the_window():
    ids = _doc([7, 9, 5, 12, 6, 8, 30, 4])
    target = 20
    bounds = chunk_bounds(ids, target, [END])
    ends = set((np.flatnonzero(ids == END) + 1).tolist())
    for start, end in bounds[:-1]:
        window = [e for e in ends if start + target // 2 < e <= start + target]
        if window:
            assert end == max(window)  # the fullest chunk that ends a sentence
        else:
            assert end == start + target  # a sentence too long for the window is cut
    assert bounds == chunk_bounds(ids, target, [END])  # a pure function
    assert chunk_bounds(ids[:0], target, [END]) == []
    assert chunk_bounds(ids, 1000, [END]) == [(0, len(ids))]


def test_chunks_without_sentence_ends_are_full():
    ids = np.arange(4, 54)
    assert [len(c) for c in token_chunks(ids, 16, [END])] == [16, 16, 16, 2]


def text_data(folder: Path, **overrides) -> DataConfig:
    settings = dict(task="text", max_documents=6, vocab_size=320, num_sentinels=8, shard_samples=16,
                    sample_tokens=48)
    return DataConfig(dir=str(folder), **{**settings, **overrides})


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepare_with_sample_tokens_cuts_documents_deterministically(tmp_path):
    cfg = text_data(tmp_path / "a")
    manifest = prepare(cfg, progress=False, use_ray=False)
    assert manifest.data["config"]["sample_tokens"] == 48
    tok = load_tokenizer(manifest.tokenizer_path)
    end_ids = set(manifest.specials.sentence_end_ids)
    plan = prepare_plan(cfg)  # the same documents, in the same order and splits
    docs = {f"{i:06d}": doc for i, doc in enumerate(d for s in ("train", "valid", "test") for d in plan.splits[s])}
    samples: dict[str, list[tuple[str, np.ndarray]]] = {}
    for split in ("train", "valid", "test"):
        stream = ShardStream(manifest.path, rank=0, world_size=1, seed=0, shuffle=False, split=split)
        for s in stream:
            doc, _ = s["__key__"].split("-")
            samples.setdefault(doc, []).append((s["__key__"], np.asarray(s["tgt"])))
    assert set(samples) == set(docs)
    n_cut_at_end = n_chunks = 0
    for doc_key, chunks in samples.items():
        chunks.sort()
        ids = np.concatenate([c for _, c in chunks])
        joined = " ".join(r.tgt for r in docs[doc_key].records)
        assert ids.tolist() == tok.encode(joined, add_special_tokens=False).ids  # every token, in order
        assert all(len(c) <= 48 for _, c in chunks) and all(len(c) > 24 for _, c in chunks[:-1])
        for _, c in chunks[:-1]:  # a cut ends a sentence, or no sentence ended in the window (24, 48]
            at_end = int(c[-1]) in end_ids
            assert at_end or (len(c) == 48 and not end_ids & set(c[24:].tolist()))
            n_chunks, n_cut_at_end = n_chunks + 1, n_cut_at_end + at_end
    assert n_chunks and n_cut_at_end  # a 320-token vocabulary makes long sentences: some are cut inside
    again = prepare(text_data(tmp_path / "b"), progress=False, use_ray=False)
    assert _digests(manifest.folder) == _digests(again.folder)  # same output twice


def test_a_changed_sample_tokens_is_a_different_dataset(tmp_path):
    prepare(text_data(tmp_path / "d"), progress=False, use_ray=False)
    with pytest.raises(ValueError, match="data.dir"):
        prepare(text_data(tmp_path / "d", sample_tokens=32), progress=False, use_ray=False)
    # 0 (the default) leaves the settings, hence the fingerprint, of datasets prepared before the key existed
    assert "sample_tokens" not in output_settings(text_data(tmp_path / "off", sample_tokens=0))


@pytest.mark.parametrize("overrides, match", [
    (dict(sample_tokens=-1), "data.sample_tokens"),
    (dict(sample_tokens=64, task="restore"), "data.sample_tokens"),
    (dict(sample_tokens=4096), "data.sample_tokens"),
])
def test_sample_tokens_is_validated_by_name(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        text_data(tmp_path, **overrides)


# --- checkpoint averaging ---------------------------------------------------------------------

TINY_MODEL = ModelConfig(vocab_size=40, d_model=16, num_encoder_layers=1, num_decoder_layers=1, num_heads=2,
                         ffn_dim=32, dropout=0.0)


def test_average_state_dicts_is_the_hand_average():
    states = [{"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5]), "n": torch.tensor(7)},
              {"w": torch.tensor([[3.0, 2.0], [1.0, 0.0]]), "b": torch.tensor([1.5]), "n": torch.tensor(7)},
              {"w": torch.tensor([[2.0, 5.0], [2.0, 2.0]]), "b": torch.tensor([-2.0]), "n": torch.tensor(7)}]
    avg = average_state_dicts(states)
    torch.testing.assert_close(avg["w"], torch.tensor([[2.0, 3.0], [2.0, 2.0]]))
    torch.testing.assert_close(avg["b"], torch.tensor([0.0]))
    assert avg["n"].item() == 7 and avg["w"].dtype == torch.float32
    assert average_state_dicts(states[:1])["w"].equal(states[0]["w"])


@pytest.mark.parametrize("bad", [{"w": torch.zeros(2, 2)}, {"w": torch.zeros(3, 2), "b": torch.zeros(1),
                                                            "n": torch.tensor(7)},
                                 {"w": torch.zeros(2, 2), "b": torch.zeros(1), "n": torch.tensor(8)}])
def test_average_refuses_mismatched_checkpoints(bad):
    good = {"w": torch.zeros(2, 2), "b": torch.zeros(1), "n": torch.tensor(7)}
    with pytest.raises(PackageError, match="export.average_last"):
        average_state_dicts([good, bad])


def _fake_zero0_checkpoint(folder: Path, state: dict) -> Path:
    """A ZeRO-0 DeepSpeed checkpoint folder as `consolidated_state_dict` reads it."""
    (folder / "step_1").mkdir(parents=True)
    (folder / "latest").write_text("step_1")
    torch.save({"module": state}, folder / "step_1" / "mp_rank_00_model_states.pt")
    return folder


def test_export_package_averages_the_given_checkpoints(tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    folders, states = [], []
    for i in range(3):
        torch.manual_seed(i)
        state = state_dict_for(build_model(TINY_MODEL))
        states.append(state)
        folders.append(_fake_zero0_checkpoint(tmp_path / f"ckpt{i}", state))
    out = export_package(folders[-1], tmp_path / "model", model_cfg=TINY_MODEL, tokenizer=tokenizer,
                         lineage=Lineage(step=3), average=folders[:-1])
    packaged = state_dict_for(load_package(out))
    for key, value in packaged.items():
        torch.testing.assert_close(value, (states[0][key] + states[1][key] + states[2][key]) / 3)
    assert read_lineage(out).extra["averaged_checkpoints"] == ["ckpt2", "ckpt0", "ckpt1"]


# --- model selection: trainer.best_metric and trainer.patience ----------------------------------

from trainers.checkpoint import TrainState  # noqa: E402
from trainers.selection import RANK_KEY, UNVALIDATED, best_of, checkpoint_rank, observe  # noqa: E402


def _replay(values: list[float], cfg: TrainerConfig) -> tuple[TrainState, list[bool]]:
    state, improved = TrainState(), []
    for i, value in enumerate(values, start=1):
        if state.stopped_early:
            break
        state.step = i * cfg.val_every
        improved.append(observe(state, cfg, {cfg.best_metric: value, "val_other": 0.0}))
    return state, improved


def test_best_metric_follows_its_direction_and_ignores_non_finite_values():
    loss = TrainerConfig(val_every=10, best_metric="val_loss")
    state, improved = _replay([3.0, 2.5, 2.7, float("nan"), 2.4, 2.4], loss)
    assert improved == [True, True, False, False, True, False]
    assert (state.best_value, state.best_step, state.since_best) == (2.4, 50, 1)
    chrf = TrainerConfig(val_every=10, best_metric="val_chrf", val_metric_samples=4)
    state, improved = _replay([30.0, 35.0, 34.0, float("inf")], chrf)
    assert improved == [True, True, False, False] and state.best_step == 20


def test_patience_stops_after_that_many_validations_without_improvement():
    cfg = TrainerConfig(val_every=5, patience=2)
    state, improved = _replay([3.0, 2.0, 2.1, 1.9, 2.0, 2.0, 1.0], cfg)
    # 2.1 (1 without), 1.9 resets, 2.0 (1), 2.0 (2) -> stop; 1.0 is never seen
    assert improved == [True, True, False, True, False, False]
    assert state.stopped_early and state.step == 30 and state.best_step == 20
    state, _ = _replay([3.0, 2.0, 2.1], TrainerConfig(val_every=5, patience=0))
    assert not state.stopped_early


def test_checkpoints_rank_validated_by_metric_above_unvalidated_by_step():
    loss = TrainerConfig(best_metric="val_loss")
    ranks = {"step_00000010": checkpoint_rank(loss, {"val_loss": 2.0}, 10),
             "step_00000020": checkpoint_rank(loss, {"val_loss": 1.5}, 20),
             "step_00000030": checkpoint_rank(loss, None, 30), "step_00000040": checkpoint_rank(loss, None, 40),
             "step_00000050": checkpoint_rank(loss, {"val_loss": 1.5}, 50)}  # equal: no improvement
    assert sorted(ranks, key=ranks.get)[:4] == ["step_00000030", "step_00000040", "step_00000010", "step_00000020"]
    records = [{"checkpoint_dir_name": name, "metrics": {RANK_KEY: r}} for name, r in ranks.items()]
    assert best_of(records) == "step_00000020"  # of equal ranks the earliest, as observe() keeps it
    unvalidated = [r for r in records if r["checkpoint_dir_name"] in ("step_00000030", "step_00000040")]
    assert best_of(unvalidated) is None
    assert best_of([{"checkpoint_dir_name": "step_00000003", "metrics": {"step": 3}}]) is None  # best_metric=none
    assert checkpoint_rank(TrainerConfig(best_metric="val_bleu", val_metric_samples=2), {"val_bleu": 30.0}, 5) == 30.0
    assert UNVALIDATED + 40 < -1e6


@pytest.mark.parametrize("override, key", [
    ({"best_metric": "bleu"}, "trainer.best_metric"),
    ({"best_metric": "val_bleu"}, "trainer.best_metric"),  # needs val_metric_samples
    ({"patience": 3}, "trainer.patience"),  # needs val_every
    ({"patience": 3, "val_every": 5, "best_metric": "none"}, "trainer.patience"),
    ({"patience": -1}, "trainer.patience"),
    ({"peak_flops": -1.0}, "trainer.patience/peak_flops"),
])
def test_bad_selection_keys_are_refused_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        TrainerConfig(**override)
