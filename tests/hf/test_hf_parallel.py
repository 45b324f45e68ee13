"""The parallel trainer's checkpoint (megatron TP=2 x PP=2, 4 gloo ranks under torchrun) exported
with `convert --to hf` loads in AutoModelForCausalLM and gives the trained parallel model's own
logits on a fixed batch (fp32, 1e-6). Slow (torchrun + training on the CPU): CI runs the
single-process export (test_hf_model.py), which goes through the same reader and writer."""

from __future__ import annotations

import pytest
import torch

import titans_scale.hf  # noqa: F401  (registers the Auto classes)
from tests.helpers import cli, parallel_micro_run
from transformers import AutoModelForCausalLM

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo run")]


def test_tp2_pp2_run_exports_to_hf_with_its_logits(tmp_path):
    run, ref = parallel_micro_run(tmp_path, tmp_path / "shards", tie_embeddings=True)
    cli("convert", run, tmp_path / "hf", "--to", "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        got = model(ref["tokens"]).logits
    assert got.shape == ref["logits"].shape and got.dtype == torch.float32
    err = (got - ref["logits"]).abs().max().item()
    assert err <= 1e-6, f"HF logits differ from the TP=2xPP=2 model's by {err:.3e}"
