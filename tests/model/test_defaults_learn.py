"""The defaults learn (issue 19): a user who picks only the layer pattern and sizes gets a memory
that recalls a value stored several segments back within a few hundred steps of plain AdamW.

The issue's model: layers ["seg", "mac"], d_model 128, 2 heads, segment 128, every memory setting
at its default. The task: the bare-token needle (data.synthetic.token_needle_batch), its value 511
tokens before the question in a 640-token row: four segments back, beyond every attention span.
AdamW 1e-3, batch 4, clip 1, one thread. Measured (bench/recall_needle.py --task token --depth 0.2,
docs/long_context.md): seeds 1 / 2 / 3 reach >= 90% of 64 held-out samples at step 300 / 175 / 250;
the paper's forms (mem_residual = false, MAC storing y with the gated output) stay at chance
(12.5%) through 375 steps. The test stops at 90% and allows 400 steps (about 90 s on one core).
What the model learns here is the value's presence (no other byte 0-7 is in the row), written at
every later token of its segment (docs/long_context.md, "What the default MAC learns").
"""

import torch
import torch.nn.functional as F

from titans_scale.data.synthetic import token_needle_batch
from titans_scale.model import TitansLM
from titans_scale.model.config import ModelConfig

SEQ, DEPTH, BATCH, HELD_OUT_SEED = 640, 0.2, 4, 1_000_003


def recall(model, held) -> float:
    x, y, m = held
    with torch.no_grad():
        logits, _ = model(x)
    return (logits[m].argmax(-1) == y[m]).float().mean().item()


def test_needle_is_beyond_every_segment():
    x, y, m = token_needle_batch(2, SEQ, 0, depth=DEPTH)
    q = int(m[0].nonzero())
    needle = int((x[0, :q] == x[0, q]).nonzero()[0])            # the first MARK
    assert q == SEQ - 1 and y[0, q] == x[0, needle + 1] and (q - needle - 1) == 511
    assert q // 128 - (needle + 1) // 128 >= 3                  # the value lies 3+ segments back


def test_the_default_mac_learns_recall_beyond_its_segments():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(1)
        model = TitansLM(ModelConfig(layers=["seg", "mac"], d_model=128, n_heads=2, window=128, segment_len=128))
        held = token_needle_batch(64, SEQ, HELD_OUT_SEED, depth=DEPTH)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        best, curve = 0.0, []
        for step in range(1, 401):
            x, y, m = token_needle_batch(BATCH, SEQ, 1, step=step, depth=DEPTH)
            logits, _ = model(x)
            loss = F.cross_entropy(logits[m], y[m])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 25 == 0:
                best = max(best, recall(model, held))
                curve.append((step, round(best, 3)))
                if best >= 0.9:
                    break
    finally:
        torch.set_num_threads(threads)
    assert best >= 0.9, f"recall beyond the segments stayed at {curve} (chance 0.125)"
