"""Every subpackage ships: the wheel's explicit package list names each folder with an
__init__.py (editable installs would hide a missing one until a user pip-installs), and the
folders mapped into the package (kernels/, slurm/) too."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "titans_scale").rglob("__init__.py")}
    found |= {"titans_scale.kernels", "titans_scale.slurm"}
    assert found - listed == set(), f"add these to [tool.setuptools] packages: {sorted(found - listed)}"


def test_torch_is_pinned_to_the_local_cpu_build():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps


def test_a_checkout_runs_without_installing():
    """`python bench/...` from a clone with no install (a GPU box without pip access): the folders the
    build maps into the package (kernels/, slurm/) resolve from the checkout. -S drops site's .pth
    files, so an editable install's mapping cannot stand in for the checkout's own."""
    site = [p for p in sys.path if p.endswith("site-packages")]
    code = ("import titans_scale.kernels.plan as p, titans_scale.ops.triton_scan\n"
            "from importlib import resources\n"
            "print(p.__file__); print(resources.files('titans_scale.slurm').joinpath('train.sbatch').is_file())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *site])}
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd="/", capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(ROOT / "kernels" / "plan.py"), "True"]
