"""`convert --to hf` / `--from hf`: HF -> training run -> HF is bitwise for the weights and the
run folder loads where eval/generate load runs; a tokenizer.json run exports its own file byte
for byte and AutoTokenizer encodes as the run does; corrupt or foreign folders are refused in
one line naming the file, and nothing is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import titans_scale.hf  # noqa: F401  (registers the Auto classes)
from tests.helpers import bpe_tokenizer, fixed_batch, leftovers, logits_of, make_run
from titans_scale import convert
from titans_scale.cli import main as cli_main
from titans_scale.convert.hf import HfReader, export_hf
from titans_scale.data.tokenizer import HFTokenizer
from titans_scale.errors import CheckpointError
from titans_scale.train.load import load_trained
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(the run's model, its model config, the --to hf folder of its checkpoint)."""
    root = tmp_path_factory.mktemp("hf_convert")
    run, cfg, model, _ = make_run(root)
    return model, cfg.model, export_hf(convert.open_checkpoint(run), root / "hf")


def _tensors(folder):
    return load_file(folder / "model.safetensors")          # safetensors' own reader


def test_hf_to_training_run_to_hf_is_bitwise(exported, tmp_path):
    model, cfg, hf = exported
    assert cli_main(["convert", str(hf), str(tmp_path / "run"), "--from", "hf"]) == 0
    run_cfg, loaded = load_trained(str(tmp_path / "run"))       # as eval and generate load a run
    assert run_cfg.model == cfg
    tokens = fixed_batch(cfg)
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))
    assert cli_main(["convert", str(tmp_path / "run"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    a, b = _tensors(hf), _tensors(tmp_path / "hf2")
    assert sorted(a) == sorted(b) == sorted("model." + k for k in model.state_dict())
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32 and torch.equal(a[name], b[name]), name
    assert (hf / "model.safetensors").read_bytes() == (tmp_path / "hf2" / "model.safetensors").read_bytes()
    first, second = (json.loads((p / "config.json").read_text()) for p in (hf, tmp_path / "hf2"))
    assert second["titans_step"] == first["titans_step"] == 2
    for config in (first, second):                   # the run folder it went through is its own
        del config["titans_run_config"]["train"]["run_dir"]
    assert second["titans_run_config"] == first["titans_run_config"]


def test_exported_folder_reads_as_a_checkpoint(exported, tmp_path):
    """HfReader is a CheckpointReader: any other target takes it (here consolidated)."""
    model, cfg, hf = exported
    out = convert.write_consolidated(HfReader(hf), tmp_path / "c")
    assert torch.equal(logits_of(convert.load_model(out), fixed_batch(cfg)), logits_of(model, fixed_batch(cfg)))


def test_tokenizer_json_run_exports_its_file(tmp_path):
    tok_path = bpe_tokenizer(tmp_path / "tokenizer.json", "The pass key is 12345. def f(x): return x + 1\n")
    ours = HFTokenizer(tok_path)
    run, cfg, model, _ = make_run(tmp_path, vocab_size=ours.vocab_size)
    hf = tmp_path / "hf"
    assert cli_main(["convert", str(run), str(hf), "--to", "hf", "--tokenizer", str(tok_path)]) == 0
    assert (hf / "tokenizer.json").read_bytes() == tok_path.read_bytes()
    tok = AutoTokenizer.from_pretrained(hf)
    for text in ("The pass key is 12345.", "def f(x): return x + 1\n", "unseen wörds <|endoftext|> here"):
        assert tok(text)["input_ids"] == ours.encode(text), text
    config = json.loads((hf / "config.json").read_text())
    assert config["titans_tokenizer"] == "tokenizer.json"
    assert (config["eos_token_id"], config["pad_token_id"]) == (ours.eos_id, ours.pad_id)
    # a folder without the run config converts back to a default run reading the folder's tokenizer
    del config["titans_run_config"]
    (hf / "config.json").write_text(json.dumps(config))
    run_cfg = HfReader(hf).run_config()
    assert run_cfg.data.tokenizer == str((hf / "tokenizer.json").resolve()) and run_cfg.model == cfg.model


# -- refusals -----------------------------------------------------------------------------------

def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _rewrite_weights(folder, edit):
    tensors = _tensors(folder)
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _truncate(folder):
    f = folder / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def _pickled(folder):
    torch.save(_tensors(folder), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


CASES = {
    "foreign model_type": (lambda f: _edit_config(f, model_type="llama"), "config.json", "'llama' model"),
    "corrupt config": (lambda f: (f / "config.json").write_text("{not json"), "config.json", "corrupt"),
    "bad model field": (lambda f: _edit_config(f, n_heads=3), "config.json", "n_heads"),
    "missing weight": (lambda f: _rewrite_weights(f, lambda t: t.pop("model.norm.weight")), "model.safetensors",
                       "lacks tensor 'model.norm.weight'"),
    "extra weight": (lambda f: _rewrite_weights(f, lambda t: t.update({"model.extra": torch.zeros(2)})),
                     "model.safetensors", "has tensor 'model.extra'"),
    "misshapen weight": (lambda f: _edit_config(f, vocab_size=300), "model.safetensors", "has shape"),
    "truncated weights": (_truncate, "model.safetensors", "truncated"),
    "pickled weights": (_pickled, "pytorch_model.bin", "pickled weights"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors", "missing"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_or_foreign_folder_is_refused_in_one_line(exported, tmp_path, capsys, case):
    damage, file, match = CASES[case]
    bad = tmp_path / "bad"
    shutil.copytree(exported[2], bad)
    damage(bad)
    dst = tmp_path / "out" / "run"
    capsys.readouterr()
    assert cli_main(["convert", str(bad), str(dst), "--from", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert f"{bad / file}" in err and match in err, err
    assert not dst.exists() and not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_from_pretrained_refuses_missing_weights(exported, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(exported[2], bad)
    _rewrite_weights(bad, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="lacks weight 'model.norm.weight'"):
        AutoModelForCausalLM.from_pretrained(bad)
