"""A trained run exported with `convert --to hf` through transformers: AutoModelForCausalLM gives
the run's logits (fp32, 1e-6; in fact bitwise), generate() with the streaming cache gives
`titans-scale generate`'s greedy tokens and the same as without a cache (every mixer kind
carries a state), beam search reorders the cache rows, trust_remote_code loads the folder
without importing titans_scale.hf, and the exported byte tokenizer is ByteTokenizer."""

from __future__ import annotations

import random
import sys

import pytest
import torch
import torch.nn.functional as F

import titans_scale.hf  # noqa: F401  (registers the Auto classes)
from tests.helpers import ENV, ROOT, cli, fixed_batch, logits_of, make_run, run_command
from titans_scale.data.tokenizer import ByteTokenizer
from titans_scale.hf import TitansCache, TitansForCausalLM
from titans_scale.train.generate import generate as titans_generate
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

LAYERS = ["swa", "mag", "mac", "mal", "lmm", "seg", "attn"]     # every mixer: each has its own state
PROMPT = "def f(x):"
TOL = 1e-6
BYTE = ByteTokenizer()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(run folder, the run's model, its model config, the --to hf folder)."""
    root = tmp_path_factory.mktemp("hf_run")
    run, cfg, model, _ = make_run(root, step=3, layers=LAYERS)
    cli("convert", run, root / "hf", "--to", "hf")
    return run, model, cfg.model, root / "hf"


@pytest.fixture(scope="module")
def hf_model(exported):
    model = AutoModelForCausalLM.from_pretrained(exported[3])
    model.generation_config.eos_token_id = None        # 200 tokens, as `titans-scale generate` makes
    return model


def test_auto_model_gives_the_runs_logits(exported, hf_model):
    _, model, cfg, _ = exported
    assert isinstance(hf_model, TitansForCausalLM) and hf_model.config.model_config() == cfg
    tokens = fixed_batch(cfg)
    with torch.no_grad():
        out = hf_model(tokens, labels=tokens)
    want = logits_of(model, tokens)
    assert out.logits.dtype == torch.float32
    assert (out.logits - want).abs().max().item() <= TOL
    assert torch.equal(out.logits, want)              # the same weights and kernels: bitwise
    shifted = F.cross_entropy(want[:, :-1].reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, shifted, rtol=1e-6)


# a token costs ~0.1 s (every memory layer's one-token update), so 200 of them four times is slow
@pytest.mark.parametrize("new", [16, pytest.param(200, marks=pytest.mark.slow)])
def test_generate_with_cache_equals_titans_generate_and_no_cache(exported, hf_model, new):
    run, model, _, _ = exported
    prompt = torch.tensor([BYTE.encode(PROMPT)])
    cached = hf_model.generate(prompt, max_new_tokens=new, do_sample=False)[:, prompt.shape[1]:]
    assert cached.shape == (1, new)
    ours, _ = titans_generate(model, prompt, new)
    assert torch.equal(cached, ours)
    uncached = hf_model.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=False)[:, prompt.shape[1]:]
    assert torch.equal(uncached, cached)
    r = cli("generate", "--run-dir", run, "--prompt", PROMPT, "--max-new-tokens", new, "--temperature", 0)
    assert r.stdout.rstrip("\n") == PROMPT + BYTE.decode(cached[0].tolist())


def test_cache_is_the_streaming_state_and_stays_bounded(exported, hf_model):
    """One prompt call then one token per call: the cache's tensors stop growing once the window
    and segment are full (the dense 'attn' layer alone keeps every token, by design)."""
    cfg = exported[2]
    cache, tokens = None, fixed_batch(cfg)[:1]
    sizes = []
    with torch.no_grad():
        out = hf_model(tokens[:, :5])
        cache = out.cache
        for t in range(5, 5 + 30):
            nxt = torch.tensor([[t % cfg.vocab_size]])
            out = hf_model(nxt, cache=cache)
            assert out.cache is cache and isinstance(cache, TitansCache)
            bounded = [st for kind, st in zip(cfg.layers, cache.state.layers) if kind != "attn"]
            sizes.append(sum(t.numel() for t in torch.utils._pytree.tree_leaves(bounded) if torch.is_tensor(t)))
    assert cache.get_seq_length() == 35
    assert max(sizes[-10:]) <= max(sizes[:20])


def test_batched_and_beam_search_generation_match_without_cache(hf_model):
    prompts = torch.tensor([BYTE.encode("abc"), BYTE.encode("xyz")])
    for kw in ({}, {"num_beams": 3}, {"num_return_sequences": 2, "num_beams": 2}):
        a = hf_model.generate(prompts, max_new_tokens=6, do_sample=False, **kw)
        b = hf_model.generate(prompts, max_new_tokens=6, do_sample=False, use_cache=False, **kw)
        assert torch.equal(a, b), kw


def test_padding_and_foreign_caches_are_refused(hf_model):
    x = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="takes no padding"):
        hf_model(x, attention_mask=torch.tensor([[0, 1, 1]]))
    from transformers import DynamicCache
    with pytest.raises(ValueError, match="must be a TitansCache"):
        hf_model(x, cache=DynamicCache())


def test_trust_remote_code_loads_without_importing_titans_scale(exported, tmp_path):
    """A fresh process outside the checkout, transformers only: config.json's auto_map names
    modeling_titans_scale.py in the folder."""
    _, model, cfg, folder = exported
    tokens = fixed_batch(cfg)
    torch.save(tokens, tmp_path / "tokens.pt")
    script = tmp_path / "load.py"
    script.write_text(
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert 'titans_scale.hf' not in sys.modules\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "with torch.no_grad():\n"
        "    torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])\n")
    env = {**ENV, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    run_command([sys.executable, script, folder, tmp_path / "tokens.pt", tmp_path / "logits.pt"], env=env,
                cwd=tmp_path)
    got = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert (got - logits_of(model, tokens)).abs().max().item() <= TOL
    # and without trust_remote_code nor the import, transformers says what is missing
    script.write_text("import sys\nfrom transformers import AutoModelForCausalLM\n"
                      "AutoModelForCausalLM.from_pretrained(sys.argv[1])\n")
    r = run_command([sys.executable, script, folder], env=env, cwd=tmp_path, check=False)
    assert r.returncode != 0 and "trust_remote_code" in r.stderr


def test_exported_byte_tokenizer_is_byte_tokenizer(exported):
    tok = AutoTokenizer.from_pretrained(exported[3])
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BYTE.bos_id, BYTE.eos_id, BYTE.pad_id)
    rng = random.Random(0)
    texts = ["", "hello world", "  two  spaces\n\ttab", "héllo wörld 日本語 🙂", "<eos> and <pad> as text",
             "".join(chr(rng.randrange(1, 0x3000)) for _ in range(200))]
    for text in texts:
        assert tok(text)["input_ids"] == BYTE.encode(text), text
    for _ in range(200):                               # any ids, specials and broken UTF-8 included
        ids = [rng.randrange(BYTE.vocab_size) for _ in range(rng.randrange(40))]
        assert tok.decode(ids, skip_special_tokens=True) == BYTE.decode(ids), ids


def test_no_titans_scale_import_pulls_in_transformers():
    """The extra is optional: the package and its CLI import without transformers."""
    code = ("import sys, titans_scale, titans_scale.convert, titans_scale.cli, titans_scale.model\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'\n")
    run_command([sys.executable, "-c", code], cwd=ROOT)
