"""A program: `python enospc_run.py FOLDER NEEDLE ARGS...` runs `titans-scale ARGS` with every
file opened for writing under FOLDER whose path contains NEEDLE failing with OSError(ENOSPC), as
on a full disk (the fault suite's seam where a small tmpfs cannot be mounted)."""

import errno
import io
import os
import sys
from pathlib import Path

folder, needle = str(Path(sys.argv[1]).resolve()), sys.argv[2]
real_open = io.open


def full_open(file, mode="r", *args, **kwargs):
    path = os.path.abspath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
    if any(c in mode for c in "wax+") and path.startswith(folder) and needle in path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return real_open(file, mode, *args, **kwargs)


io.open = full_open
import builtins  # noqa: E402

builtins.open = full_open

from titans_scale.cli import main  # noqa: E402

sys.exit(main(sys.argv[3:]))
