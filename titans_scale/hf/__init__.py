"""Hugging Face transformers interop: TitansLM as a `PreTrainedModel` causal LM.

    import titans_scale.hf                      # registers "titans_scale" with the Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("out/tiny-hf")      # `titans-scale convert RUN OUT --to hf`
    tok = AutoTokenizer.from_pretrained("out/tiny-hf")
    ids = model.generate(**tok("def ", return_tensors="pt"), max_new_tokens=50, do_sample=False)

An exported folder also loads with `trust_remote_code=True` and no import (its config.json maps
the Auto classes to the modeling_titans_scale.py beside it, which imports this package: the
memory op and its kernels live in titans-scale, so the folder needs titans-scale installed).

`import titans_scale` does not import this module: transformers costs seconds to import and
every titans-scale command imports the package. Needs the `hf` extra (pip install titans-scale[hf]).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def _use_installed_kernels_package() -> None:
    """Python started inside a titans-scale checkout (the cwd on sys.path: pytest, `python -m`) sees
    its kernels/ folder (installed as titans_scale.kernels) as the top-level `kernels`, which hides
    the Hugging Face `kernels` package transformers imports. Load the installed one under that name."""
    found = importlib.util.find_spec("kernels") if "kernels" not in sys.modules else None
    if found is None or not found.origin:
        return
    checkout = Path(found.origin).resolve().parents[1]
    if not (checkout / "titans_scale" / "hf" / "__init__.py").is_file():
        return                                   # not our folder: nothing hides the package
    path = [p for p in sys.path if Path(p or ".").resolve() != checkout]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None:                             # not installed: transformers then does without it
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)


_use_installed_kernels_package()

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from .configuration import MODEL_FIELDS, MODEL_TYPE, TitansConfig  # noqa: E402
from .modeling import TitansCache, TitansForCausalLM, write_remote_code  # noqa: E402
from .tokenizer import save_tokenizer  # noqa: E402

AutoConfig.register(MODEL_TYPE, TitansConfig, exist_ok=True)
AutoModelForCausalLM.register(TitansConfig, TitansForCausalLM, exist_ok=True)

__all__ = ["MODEL_FIELDS", "MODEL_TYPE", "TitansCache", "TitansConfig", "TitansForCausalLM", "save_tokenizer",
           "write_remote_code"]
