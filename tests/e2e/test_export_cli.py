"""`seqfoundry export` from a model package to Hugging Face and CTranslate2 folders that their own
libraries load with no seqfoundry code, and one-line refusals (the parity of the conversions
themselves is tested in tests/unit/test_export_hf.py and test_export_ct2.py)."""

from __future__ import annotations

import pytest
import torch

from orchestrator.cli import main
from tests.helpers.tiny_package import sources, tiny_model, tiny_package
from trainers.engines import pad_sources
from trainers.models import ModelConfig, build_model
from trainers.package import Lineage, write_package


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return tiny_package(tmp_path_factory.mktemp("export") / "run")


def test_export_hf_from_a_package_loads_with_transformers_alone(package, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert main(["export", f"export.package={package}", "export.format=hf", f"export.out={out}"]) == 0
    assert str(out) in capsys.readouterr().out
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2 and hf.generation_config.decoder_start_token_id == 1
    ours = tiny_model()
    src, lengths = pad_sources(sources(3))
    tgt_in = torch.cat([torch.ones(3, 1, dtype=torch.long), src[:, :4]], dim=1)
    with torch.no_grad():
        theirs = hf(input_ids=src, attention_mask=(src != 0).long(), decoder_input_ids=tgt_in).logits
        mine = ours(src, lengths, tgt_in)
    assert torch.allclose(theirs, mine, atol=1e-4)


def test_export_ctranslate2_default_out_beside_the_package(package, capsys):
    ctranslate2 = pytest.importorskip("ctranslate2")
    assert main(["export", f"export.package={package}", "export.format=ctranslate2",
                 "export.quantization=int8"]) == 0
    out = package.parent / "model-ctranslate2"
    assert str(out) in capsys.readouterr().out and (out / "tokenizer.json").is_file()
    translator = ctranslate2.Translator(str(out), compute_type="int8")
    assert translator.translate_batch([["w5", "w6", "</s>"]], max_decoding_length=4)[0].hypotheses


@pytest.mark.parametrize("args, key", [
    (["export.format=hf", "export.package={lstm}"], "model.arch"),
    (["export.format=ctranslate2", "export.package={lstm}"], "model.arch"),
    (["export.format=onnx"], "export.format"),
    (["export.package={package}"], "export.package"),  # format=package exports checkpoints, not packages
    (["export.format=hf", "export.quantization=int8", "export.package={package}"], "export.quantization"),
    (["export.format=hf", "export.package=/no/such/package"], "export.package"),
])
def test_bad_export_is_one_line_with_exit_2(args, key, package, tmp_path, capsys):
    lstm = write_package(tmp_path / "lstm", build_model(ModelConfig(arch="lstm", vocab_size=48, d_model=16,
                                                                   num_encoder_layers=1, num_decoder_layers=1)),
                         tokenizer=package / "tokenizer.json", lineage=Lineage())
    args = [a.format(lstm=lstm, package=package) for a in args]
    assert main(["export", f"export.out={tmp_path / 'out'}", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"seqfoundry export: error: {key}"), err
    assert not (tmp_path / "out").exists()
