"""lm-evaluation-harness's `hf` model type on an exported folder, offline: the README's command
on a local task (a jsonl of context/continuation pairs and its task yaml, written here), and
the loglikelihoods it reports are the model's own. lm_eval is in no extra (it brings datasets,
accelerate, evaluate, ...): where it is not installed the test skips and says so."""

from __future__ import annotations

import json
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from tests.helpers import ENV, make_run, run_command
from titans_scale import convert
from titans_scale.convert.hf import export_hf
from titans_scale.data.tokenizer import ByteTokenizer

LM_EVAL = Path(sys.executable).with_name("lm_eval")
pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.skipif(not LM_EVAL.is_file() or find_spec("accelerate") is None,
                                 reason="lm_eval (with accelerate) is not installed: pip install lm_eval")]

DOCS = [{"context": "The cat sat on the", "continuation": " mat."},
        {"context": "def f(x):\n    return", "continuation": " x"},
        {"context": "One, two, three, four,", "continuation": " five"}]
TASK = """task: titans_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


def _loglikelihood(model, context: str, continuation: str) -> float:
    ctx, cont = ByteTokenizer().encode(context), ByteTokenizer().encode(continuation)
    tokens = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens[:, :-1])[0].float(), -1)[0, len(ctx) - 1:]
    return logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()


def test_lm_eval_hf_model_type_on_a_local_task(tmp_path):
    run, _, model, _ = make_run(tmp_path)
    hf = export_hf(convert.open_checkpoint(run), tmp_path / "hf")
    task = tmp_path / "task"
    task.mkdir()
    (task / "titans_tiny.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (task / "titans_tiny.yaml").write_text(TASK.format(data=task / "titans_tiny.jsonl"))
    env = {**ENV, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run_command([LM_EVAL, "--model", "hf", "--model_args", f"pretrained={hf},trust_remote_code=True,dtype=float32",
                 "--tasks", "titans_tiny", "--include_path", task, "--batch_size", "1", "--device", "cpu",
                 "--output_path", tmp_path / "results", "--log_samples"], env=env, cwd=tmp_path, timeout=1200)
    samples = [json.loads(line) for f in (tmp_path / "results").rglob("samples_titans_tiny_*.jsonl")
               for line in f.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(DOCS)))
    for s in samples:
        got = float(s["resps"][0][0][0])
        want = _loglikelihood(model, s["doc"]["context"], s["doc"]["continuation"])
        assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), (s["doc"], got, want)
