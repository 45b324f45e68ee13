"""metrics.jsonl is strict JSON: a non-finite value is written null and named (issue 22)."""

import json

from titans_scale.train.metrics import MetricsLogger


def test_non_finite_values_are_null_and_named(tmp_path):
    m = MetricsLogger(tmp_path, tensorboard=False)
    m.log("skipped", 3, loss=float("nan"), grad_norm=float("inf"), lr=1e-3)
    m.close()

    def refuse(name):
        raise AssertionError(f"bare {name} in metrics.jsonl")

    rec = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["lr"] == 1e-3
    assert rec["nonfinite"] == ["loss", "grad_norm"]
