"""metrics.jsonl is strict JSON: a non-finite value is written null and named; a resume replaces the
replayed steps' rows; a skipped step reports no MFU (issue 22)."""

import json

import pytest

from tests.helpers import SHORT_TRAIN, micro_config, write_config
from titans_scale.train.metrics import MetricsLogger, read_metrics


def test_non_finite_values_are_null_and_named(tmp_path):
    m = MetricsLogger(tmp_path, tensorboard=False)
    m.log("skipped", 3, loss=float("nan"), grad_norm=float("inf"), lr=1e-3)
    m.close()

    def refuse(name):
        raise AssertionError(f"bare {name} in metrics.jsonl")

    rec = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["lr"] == 1e-3
    assert rec["nonfinite"] == ["loss", "grad_norm"]


def test_resume_replaces_the_replayed_rows_and_drops_a_torn_line(tmp_path):
    """Issue 22: a kill -9 resume from step 4 replays steps 5-7; their rows must not appear twice."""
    m = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 8):
        m.log("train", step, loss=float(step))
    m.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 8, "lo')               # the row being written at the kill
    m = MetricsLogger(tmp_path, tensorboard=False, start_step=4)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    for step in range(5, 9):
        m.log("train", step, loss=-float(step))
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                                                                       (5, -5.0), (6, -6.0), (7, -7.0), (8, -8.0)]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_skipped_step_reports_no_mfu(tmp_path, monkeypatch, caplog):
    """Issue 22: a skipped (non-finite) step is fast, so its row showed an MFU over 100%."""
    from titans_scale.cli import main as cli_main
    from titans_scale.train.engine import LocalEngine, StepResult

    real, calls = LocalEngine.train_step, []

    def third_skipped(self, *args):
        calls.append(1)
        return StepResult(float("nan"), float("nan"), False) if len(calls) == 3 else real(self, *args)

    monkeypatch.setattr(LocalEngine, "train_step", third_skipped)
    cfg = write_config(tmp_path / "run.toml", micro_config(tmp_path / "shards", tmp_path / "run",
                                                           train={**SHORT_TRAIN, "steps": 4, "ckpt_every": 4}))
    with caplog.at_level("INFO", logger="titans_scale.train"):
        assert cli_main(["train", "--config", str(cfg)]) == 0
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert rows[3]["nonfinite"] == ["loss", "grad_norm"]
    assert "mfu" not in rows[3] and "tokens_per_s" not in rows[3], rows[3]
    assert all(0 < rows[s]["mfu"] < 1 for s in (1, 2, 4))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step 3 |"))
    assert "no MFU" in line and "tok/s" not in line, line
