"""Running a command against a really full or really read-only folder, without root: inside a
user + mount namespace (`unshare -rm`) a small tmpfs is mounted, or a folder bind-mounted
read-only (EROFS stops root too, unlike chmod). The namespace ends with the command, so one
shell script runs every step and copies what the test inspects out of the mount.
Where user namespaces are off, `injected_enospc` is the seam instead: the program
tests/faults/enospc_run.py raises OSError(ENOSPC) on every file opened for writing under a folder."""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers import ENV, ROOT

CLI = [sys.executable, "-m", "titans_scale.cli"]


@functools.cache
def namespaces_work() -> bool:
    """Can this user mount a tmpfs in a private namespace (`unshare -rm`)?"""
    if shutil.which("unshare") is None:
        return False
    probe = tempfile.mkdtemp()
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=16k tmpfs {probe}"],
                       capture_output=True)
    os.rmdir(probe)
    return r.returncode == 0


def cli_line(args: list, out: Path, tag: str) -> str:
    """A script line running `titans-scale ARGS`, its stderr to <out>/<tag>.err, exit code to <tag>.rc."""
    cmd = shlex.join([*CLI, *map(str, args)])
    return f"{cmd} 2> {out / (tag + '.err')}; echo $? > {out / (tag + '.rc')}"


def run_script(lines: list[str], out: Path) -> None:
    """Run the script in a fresh user + mount namespace (mounts vanish with it)."""
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "\n".join(["set -u", *lines])], capture_output=True,
                       text=True, env=ENV, cwd=ROOT, timeout=900)
    assert r.returncode == 0, f"namespace script failed ({r.returncode}):\n{r.stderr[-3000:]}"


def result(out: Path, tag: str) -> subprocess.CompletedProcess:
    """What cli_line recorded for `tag`, as run_command would have returned it."""
    return subprocess.CompletedProcess(tag, int((out / f"{tag}.rc").read_text()), "",
                                       (out / f"{tag}.err").read_text())


def injected_enospc(args: list, under: Path, needle: str) -> subprocess.CompletedProcess:
    """`titans-scale ARGS` with every file opened for writing under `under` whose path holds
    `needle` failing with ENOSPC (the seam where no tmpfs can be mounted)."""
    return subprocess.run([sys.executable, str(Path(__file__).with_name("enospc_run.py")), str(under), needle,
                           *map(str, args)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)
