"""titans-scale: train Titans models at scale."""

import importlib.util
import sys
from pathlib import Path


def _map_checkout_folders() -> None:
    """The build maps the repository's kernels/ and slurm/ into the package (pyproject's package-dir).
    A checkout used without installing (PYTHONPATH=., `python bench/...` on a machine with no pip
    access) has no such mapping: load those folders under the same names, so nothing else differs."""
    root = Path(__file__).resolve().parent.parent
    for name in ("kernels", "slurm"):
        full, init = f"{__name__}.{name}", root / name / "__init__.py"
        if full in sys.modules or not init.is_file() or importlib.util.find_spec(full) is not None:
            continue
        spec = importlib.util.spec_from_file_location(full, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)


_map_checkout_folders()
