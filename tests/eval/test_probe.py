"""needle_signal: what an untrained model's memory carries from a needle to its answer.

The needle sits ~510 tokens before its question, beyond every segment and window of these
2-layer models (d_model 128, 2 heads, segment / window 128, the memory in layer 2), so only the
memory can carry it. A signal is necessary for the outer loss to learn recall, not sufficient:
full attention (signal 1.5e-2) learns the task in ~200 steps, the memories (up to 6e-2) had not
after 400-500 (docs/long_context.md, "What the memory defaults needed")."""

import pytest
import torch

from titans_scale.eval.probe import needle_signal
from titans_scale.model import TitansLM
from titans_scale.model.config import ModelConfig

SIZES = dict(d_model=128, n_heads=2, window=128, segment_len=128)


def signal(layers, **overrides) -> float:
    torch.manual_seed(0)
    return needle_signal(TitansLM(ModelConfig(layers=layers, **SIZES, **overrides)), 640, range(2))


@pytest.mark.parametrize("layers", [["seg", "seg"], ["swa", "swa"]])
def test_memory_off_carries_nothing(layers):
    assert signal(layers) == 0.0


@pytest.mark.parametrize("layers", [["seg", "mac"], ["swa", "mag"], ["swa", "mal"]])
def test_default_memory_carries_the_needle(layers):
    """Measured: MAC 1.1e-2, MAG 1.8e-2, MAL 2.2e-2 with the defaults (the normalised memory);
    2.3e-3, 2.9e-3, 3.3e-3 with the old default mem_norm = false, which this bound rejects."""
    assert signal(layers) > 6e-3
