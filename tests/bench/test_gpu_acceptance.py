"""bench/gpu_acceptance.py --cpu runs every section that can run on the CPU and writes one JSON
report: every section present, each passed or skipped with a reason, failures recorded with their
traceback (a section that raises does not lose the others' results). CI runs the whole --cpu run
(about 100 s on 2 cores: the runtime section's megatron and DeepSpeed ranks are most of it;
DeepSpeed's JIT-built op is shared with tests/parallel through build/torch_extensions)."""

from __future__ import annotations

import importlib.util
import json
import sys

import torch

from tests.helpers import ENV, ROOT, run_command

SCRIPT = ROOT / "bench" / "gpu_acceptance.py"
SECTIONS = {"environment", "memory_op", "training", "fp8_te", "runtime", "throughput"}


def acceptance(tmp_path, *args) -> tuple[dict, int]:
    out = tmp_path / "report.json"
    r = run_command([sys.executable, SCRIPT, "--cpu", "--out", out, *args], env={**ENV, "TRITON_INTERPRET": "1"},
                    check=False, timeout=900)
    return json.loads(out.read_text()), r.returncode


def check_sections(report: dict, names: set[str]) -> dict:
    sections = report["sections"]
    assert report["mode"] == "cpu" and set(sections) == names
    for name, s in sections.items():
        assert "error" not in s, f"{name}: {s.get('traceback', s['error'])}"
        assert s.get("pass") is True or s.get("skipped"), f"{name}: {s}"
    assert sections["fp8_te"]["skipped"].startswith("Transformer Engine FP8 cannot run here: no CUDA device")
    assert {c["impl"] for c in sections["memory_op"]["cases"]} == {"fused", "triton"}
    assert sections["environment"]["versions"]["torch"] == torch.__version__
    return sections


def test_cpu_mode_passes_every_section_or_skips_it_with_a_reason(tmp_path):
    report, rc = acceptance(tmp_path)
    sections = check_sections(report, SECTIONS)
    for name in ("tiny", "small"):
        t = sections["training"][name]
        assert t["losses"][-1] < t["losses"][0] and t["first_rel_err"] <= t["tol"]
    assert {sections["runtime"][e]["backend"] for e in ("megatron", "deepspeed")} == {"gloo"}
    assert all(r["tokens_per_s"] > 0 for r in sections["throughput"]["rows"])
    assert report["pass"] is True and rc == 0


def _script():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    mod = _script()

    def boom():
        raise KeyError("no such kernel")

    out = tmp_path / "r.json"

    def warns():
        import warnings
        warnings.warn("memory_scan(impl='auto') on CUDA runs the PyTorch path", stacklevel=1)
        # a run killed at its time limit keeps the sections before: the report is written after each
        return {"pass": True, "on_disk": list(json.loads(out.read_text())["sections"])}

    monkeypatch.setattr(mod, "SECTIONS", {"first": lambda: {"pass": True, "x": 1}, "boom": boom,
                                          "absent": lambda: {"skipped": "needs a GPU"}, "last": warns})
    monkeypatch.setattr(sys, "argv", ["gpu_acceptance.py", "--out", str(out)])
    assert mod.main() == 1
    report = json.loads(out.read_text())
    s = report["sections"]
    assert list(s) == ["first", "boom", "absent", "last"] and report["pass"] is False
    assert s["first"]["pass"] and s["first"]["x"] == 1 and s["last"]["pass"]
    assert set(s["absent"]) == {"skipped", "seconds", "started_s"} and s["absent"]["skipped"] == "needs a GPU"
    assert s["last"]["on_disk"] == ["first", "boom", "absent"]
    assert s["last"]["warnings"] == ["UserWarning: memory_scan(impl='auto') on CUDA runs the PyTorch path"]
    assert report["wall_s"] >= s["last"]["started_s"] >= s["first"]["started_s"] >= 0
    assert s["boom"]["pass"] is False and s["boom"]["error"] == "KeyError: 'no such kernel'"
    assert "Traceback" in s["boom"]["traceback"] and "raise KeyError" in s["boom"]["traceback"]


def test_memory_op_cases_past_the_budget_fail_the_section_and_say_so(monkeypatch):
    mod = _script()
    monkeypatch.setattr(mod, "CPU_MODE", True)
    monkeypatch.setattr(mod, "OP_BUDGET_S", -1.0)      # every case starts past the budget
    out = mod.memory_op()
    assert out["pass"] is False and out["cases"]
    assert all(c["error"].startswith("not run: past the section's") for c in out["cases"])
    monkeypatch.setattr(mod, "OPTIONS", {"op_dtypes": set(), "lengths": None})
    assert mod.memory_op() == {"pass": False, "cases": []}     # nothing measured is not a pass
