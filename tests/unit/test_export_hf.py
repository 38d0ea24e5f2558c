"""`export.format=hf`: the exported folder loads with `transformers`' Auto classes
alone and computes what our model computes (CPU, tiny random models)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.tiny_package import padded, sources, tiny_package, trained_tiny_model
from trainers.decoding import DecodingConfig, decode
from trainers.export_hf import export_hf, hf_model_type, to_hf_model
from trainers.models import ModelConfig

transformers = pytest.importorskip("transformers")

VARIANTS = {"pegasus": dict(norm_first=True, positions="sinusoidal"),  # the same tiny models as test_export_ct2
            "blenderbot": dict(norm_first=True, positions="learned", activation="relu"),
            "marian": dict(norm_first=False, positions="sinusoidal")}
MAX_LEN = 12


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    """(our model, the HF model loaded back from the exported folder, the folder), per architecture."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(request.param)
    seed = list(VARIANTS).index(request.param)
    package = tiny_package(root, trained_tiny_model(seed=seed, **VARIANTS[request.param]))
    out = export_hf(package, root / "hf")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert hf.config.model_type == request.param
    from trainers.package import load_package

    return load_package(package), hf, out


def _hf_generate(hf, rows, **kwargs) -> list[list[int]]:
    """Generated tokens after the decoder start, cut after the first eos."""
    src, lengths = padded(rows)
    with torch.no_grad():
        out = hf.generate(input_ids=src, attention_mask=src != 0, max_new_tokens=MAX_LEN, do_sample=False, **kwargs)
    result = []
    for row in out[:, 1:].tolist():
        result.append(row[: row.index(2) + 1] if 2 in row else row)
    return result


def test_refuses_what_transformers_lacks():
    with pytest.raises(ValueError, match=r"^model\.positions: .*norm_first=false") as err:
        hf_model_type(ModelConfig(norm_first=False, positions="learned"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^model\.arch: 'lstm'"):
        hf_model_type(ModelConfig(arch="lstm"))
    with pytest.raises(ValueError, match=r"^model\.arch: 'gru'"):
        to_hf_model(_rnn())


def _rnn():
    from trainers.models import build_model

    return build_model(ModelConfig(arch="gru", vocab_size=20, d_model=8, num_encoder_layers=1, num_decoder_layers=1))


def test_folder_loads_with_auto_classes_alone(exported):
    _, hf, out = exported
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok("w5 w7 nope")["input_ids"] == [5, 7, 3, 2]  # eos appended to a source, as seqfoundry generate does
    assert tok.decode([5, 7, 2], skip_special_tokens=True) == "w5 w7"
    gen = hf.generation_config
    assert (gen.decoder_start_token_id, gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 1, 2, 0)
    assert gen.forced_eos_token_id == 2 and list(gen.suppress_tokens) == [0, 1] and gen.max_length == 1 + 64
    assert "seqfoundry" not in json.dumps(json.loads((out / "config.json").read_text()))


def test_teacher_forced_logits_match(exported):
    ours, hf, _ = exported
    src, lengths = padded(sources(5))
    tgt_in = torch.randint(4, 48, (5, 9), generator=torch.Generator().manual_seed(2))
    tgt_in[:, 0] = 1
    with torch.no_grad():
        expected = ours(src, lengths, tgt_in)
        got = hf(input_ids=src, attention_mask=src != 0, decoder_input_ids=tgt_in).logits
    assert expected.std() > 0.5  # non-trivial weights: logits far from uniform
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_greedy_tokens_equal(exported):
    """generate(num_beams=1) with the exported generation config (forced eos at the
    limit, pad/bos suppressed) gives exactly our greedy tokens, early eos or forced."""
    ours, hf, _ = exported
    rows = sources(8)
    expected = [h[0].tokens for h in decode(ours, *padded(rows), DecodingConfig(strategy="greedy", max_len=MAX_LEN))]
    assert _hf_generate(hf, rows, num_beams=1) == expected


class EosAtLimit:
    """Forced eos at the last step the way ours does it: every other token -inf, eos keeps the
    model's log-prob (HF's ForcedEOSTokenLogitsProcessor sets it to 0 instead)."""

    def __init__(self, max_new_tokens: int):
        self.last_input_len = max_new_tokens  # decoder start + max_new_tokens - 1 tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.size(1) < self.last_input_len:
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, 2] = scores[:, 2]
        return forced


@pytest.mark.parametrize("length_penalty, early_stopping", [(0.0, False), (1.0, False), (1.0, True)])
def test_beam_hypotheses_equal(exported, length_penalty, early_stopping):
    """Beam 4, n_best 4: HF returns our 4 hypotheses, in our order, with our normalized scores.

    Settings where both searches are exact:
    * Both keep the 2k best candidates per step, finish the eos ones ranked
      within the first k and continue the first k others.
    * Both rank a finished hypothesis by score / len ** length_penalty with len
      counting generated tokens, eos included (HF 5.x: cur_len + 1 -
      decoder_prompt_len).
    * HF runs with early_stopping="never": it stops when its k-th finished
      hypothesis beats the best running score / L ** lp, L = max_length for
      lp > 0, else the current length -- for lp >= 0 the same exact bound as our
      stopping rule, which with n_best = k = num_beams stops at the same step.
      With our early_stopping, HF runs with early_stopping=True: both stop once
      k hypotheses have finished.
    * At the length limit both allow only eos, but HF's forced_eos_token_id
      renormalises (eos log-prob 0) while ours adds the model's eos log-prob;
      so HF runs here with forced eos replaced by `EosAtLimit`, which keeps
      the model's log-prob.  (With the exported default, forced hypotheses
      rank higher in HF than in ours; greedy tokens are the same either way.)
    With these models, hypotheses cut at the limit occur for pegasus (lp 1) and
    blenderbot (lp 0 and 1), early eos everywhere.
    """
    ours, hf, _ = exported
    rows = sources(16, seed=3)
    cfg = DecodingConfig(strategy="beam", beam_size=4, n_best=4, max_len=8, length_penalty=length_penalty,
                         early_stopping=early_stopping)
    hyps = decode(ours, *padded(rows), cfg)
    assert any(len(hs[0].tokens) < cfg.max_len for hs in hyps)  # and so is an early eos
    src, _ = padded(rows)
    with torch.no_grad():
        out = hf.generate(input_ids=src, attention_mask=src != 0, max_new_tokens=cfg.max_len, num_beams=4,
                          num_return_sequences=4, length_penalty=length_penalty,
                          early_stopping=True if early_stopping else "never",
                          do_sample=False, output_scores=True, return_dict_in_generate=True,
                          forced_eos_token_id=None,
                          logits_processor=transformers.LogitsProcessorList([EosAtLimit(cfg.max_len)]))
    got = [row[: row.index(2) + 1] for row in out.sequences[:, 1:].tolist()]
    assert got == [h.tokens for hs in hyps for h in hs]
    torch.testing.assert_close(out.sequences_scores, torch.tensor([h.normalized_score for hs in hyps for h in hs]),
                               atol=1e-4, rtol=0)
