"""Every subpackage ships: the wheel's explicit package list names each folder with an
__init__.py (editable installs would hide a missing one until a user pip-installs), and the
folders mapped into the package (kernels/, slurm/) too."""

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
