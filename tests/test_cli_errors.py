"""The CLI's error contract: a user error (TitansError, a bad argument) is one line and exit
status 2; any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import parser_running, raising
from titans_scale import cli
from titans_scale.errors import CheckpointError, ConfigError, DataError


@pytest.mark.parametrize("error", [ConfigError("train.steps: must be >= 1"), DataError("data source 'x' not found"),
                                   CheckpointError("checkpoint 'c' is damaged; delete it")])
def test_user_error_is_one_line(monkeypatch, capsys, error):
    monkeypatch.setattr(cli, "build_parser", parser_running(raising(error)))
    assert cli.main(["boom"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"titans-scale boom: error: {error}"


def test_real_command_user_error_is_one_line(capsys, tmp_path):
    assert cli.main(["train", "--config", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.toml" in err[0] and err[0].startswith("titans-scale train: error:")


def test_bad_argument_is_argparse_usage_and_one_error_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train"])                        # --config missing
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if "error:" in ln] == \
        ["titans-scale train: error: the following arguments are required: --config"]


@pytest.mark.parametrize("bug", [ValueError("an internal invariant broke"), KeyError("missing"),
                                 TypeError("bad call")])
def test_genuine_bug_is_not_swallowed(monkeypatch, capsys, bug):
    monkeypatch.setattr(cli, "build_parser", parser_running(raising(bug)))
    with pytest.raises(type(bug)):
        cli.main(["boom"])
    assert "error:" not in capsys.readouterr().err


def test_genuine_bug_prints_its_traceback():
    script = textwrap.dedent("""
        import sys
        from titans_scale import cli
        from tests.helpers import parser_running, raising

        cli.build_parser = parser_running(raising(ValueError("an internal invariant broke")))
        sys.exit(cli.main(["boom"]))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 1, r.stderr
    assert "Traceback (most recent call last)" in r.stderr and "in fn" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "ValueError: an internal invariant broke"
