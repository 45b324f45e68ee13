"""A conversion never writes into, over or inside its own source, and --overwrite replaces only an
earlier conversion's output, never a training run: each refusal is one line, exit 2, and the
source tree is bitwise unchanged (issue 22, data loss 1)."""

from __future__ import annotations

import pytest

from tests.helpers import leftovers, make_run, tree_sha
from titans_scale.cli import main as cli_main
MARKER = ".titans-convert-output"

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture()
def run(tmp_path):
    return make_run(tmp_path, step=1, layers=["lmm"])[0]


def _refused(capsys, *argv, needle):
    assert cli_main(["convert", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err


@pytest.mark.parametrize("dst", [".", "checkpoints", "checkpoints/step_00000001", "export"])
def test_destination_overlapping_the_source_is_refused(run, tmp_path, capsys, dst):
    before = tree_sha(tmp_path)
    _refused(capsys, run, run / dst, "--overwrite", needle="overlaps the source")
    _refused(capsys, run / "checkpoints" / "step_00000001", run, "--overwrite", needle="overlaps the source")
    assert tree_sha(tmp_path) == before


def test_overwrite_replaces_only_a_conversion_output(run, tmp_path, capsys):
    other = tmp_path / "other"
    make_run(other, step=1, layers=["lmm"])
    before = tree_sha(tmp_path)
    _refused(capsys, run, other / "run", "--overwrite", needle=f"not written by convert (no {MARKER})")
    assert tree_sha(tmp_path) == before and not leftovers(other)
    out = tmp_path / "c"
    assert cli_main(["convert", str(run), str(out)]) == 0 and (out / MARKER).is_file()
    assert cli_main(["convert", str(run), str(out), "--to", "inference", "--overwrite"]) == 0
    assert (out / MARKER).is_file() and not leftovers(tmp_path)
