"""The process's memory allocator (train.allocator): tcmalloc on CPU runs where it is installed.

A CPU training step frees and re-allocates the same large activations every step; glibc's heap
fragments under that (benchmark model, 16k tokens: 4.5-6 GiB peak RSS for 3.1 GiB of live
tensors), tcmalloc does not (3.45 GiB, and faster steps). An allocator can only be chosen before
the process starts, so `ensure_allocator` re-executes the same command once with tcmalloc in
LD_PRELOAD (what `python -m torch.backends.xeon.run_cpu --enable-tcmalloc` does). exec keeps
the PID, so torchrun, Slurm and signals see the same process.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
import typing
from pathlib import Path

from titans_scale.config import Allocator
from titans_scale.errors import ConfigError

ENV_LIB = "TITANS_TCMALLOC"                     # a path to the library: the user's choice, used alone
ENV_REEXEC = "TITANS_ALLOCATOR_REEXEC"          # set across our one re-exec: the preloaded path, or "-"
CHOICES = typing.get_args(Allocator)            # train.allocator's values (checked by the config loader)
_KNOWN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",     # Debian, Ubuntu
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",                     # RHEL, Fedora (gperftools-libs)
    "/usr/lib64/libtcmalloc.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",                       # Arch, Alpine
    "/usr/lib/libtcmalloc.so.4",
    "/usr/local/lib/libtcmalloc_minimal.so.4",
    "/usr/local/lib/libtcmalloc.so.4",
)
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
             "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/lib64", "/usr/local/lib")

__all__ = ["find_tcmalloc", "loaded_allocator", "preload_env", "ensure_allocator"]


def find_tcmalloc() -> str | None:
    """Path of a tcmalloc shared library, or None. TITANS_TCMALLOC, when set, is the only place
    looked at (set means the user chose); else the linker's search, else the usual paths."""
    chosen = os.environ.get(ENV_LIB)
    if chosen is not None:
        return chosen if chosen and Path(chosen).is_file() else None
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)          # a soname ("libtcmalloc_minimal.so.4") or a path
        if not found:
            continue
        if os.path.isabs(found) and Path(found).is_file():
            return str(Path(found).resolve())
        for d in _LIB_DIRS:
            p = Path(d) / found
            if p.is_file():
                return str(p.resolve())
    return next((p for p in _KNOWN_PATHS if Path(p).is_file()), None)


def loaded_allocator() -> str:
    """"tcmalloc" when a tcmalloc library is mapped into this process, else "glibc" on Linux,
    "unknown" elsewhere."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc" if sys.platform.startswith("linux") else "unknown"
    return "tcmalloc" if "libtcmalloc" in maps else "glibc"


def _preloaded(env) -> list[str]:
    """The entries of env's LD_PRELOAD (the loader splits it on colons and spaces)."""
    return [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]


def preload_env(env: dict, lib: str) -> dict:
    """A copy of env with lib first in LD_PRELOAD (once)."""
    return {**env, "LD_PRELOAD": ":".join([lib, *(p for p in _preloaded(env) if p != lib)])}


def _drop_preload(lib: str) -> None:
    """Take lib out of this process's LD_PRELOAD (it stays loaded; children do not inherit it)."""
    rest = [p for p in _preloaded(os.environ) if p != lib]
    if rest:
        os.environ["LD_PRELOAD"] = ":".join(rest)
    else:
        os.environ.pop("LD_PRELOAD", None)


def _reexec_argv(argv: list[str]) -> list[str]:
    """The interpreter command that runs this invocation again: `-m <module> argv`, the module
    being the one run as __main__ (`python -m titans_scale.cli`, the torchrun worker
    `-m titans_scale.launcher.worker`), titans_scale.cli for the console script `titans-scale`.
    Interpreter flags before -m (torchrun's -u) are kept."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = getattr(spec, "name", None) or "titans_scale.cli"
    if module.endswith(".__main__"):
        module = module[: -len(".__main__")]
    orig = list(getattr(sys, "orig_argv", []))
    flags: list[str] = []
    for i in range(1, len(orig)):
        if (orig[i] == "-m" and i + 1 < len(orig) and orig[i + 1] == module) or orig[i] == f"-m{module}":
            flags = orig[1:i]
            break
    return [sys.executable, *flags, "-m", module, *argv]


def ensure_allocator(choice: Allocator, argv: list[str] | None) -> None:
    """Make this CPU process run on tcmalloc as train.allocator (one of CHOICES, checked by the
    config) asks, re-executing the command
    (argv: its arguments after the program, sys.argv[1:]) once with LD_PRELOAD when needed.
    argv None: the command cannot be re-run (called in-process): "auto" stays on glibc."""
    added = os.environ.pop(ENV_REEXEC, None)
    if added is not None:                           # we are the re-executed process
        if added != "-":
            _drop_preload(added)
        if choice != "glibc" and loaded_allocator() != "tcmalloc":
            print(f"titans-scale: warning: tcmalloc ({added}) did not load; training on glibc malloc "
                  "(train.allocator)", file=sys.stderr, flush=True)
            return
    if choice == "glibc" or loaded_allocator() == "tcmalloc" or added is not None:
        return
    import torch

    if torch.cuda.is_available():                   # GPU runs: host memory is not the bottleneck
        return
    lib = find_tcmalloc()
    if lib is None:
        if choice == "auto":
            return                                  # glibc, with train.retain_memory
        where = f"TITANS_TCMALLOC={os.environ[ENV_LIB]!r} is not a file; " if os.environ.get(ENV_LIB) else ""
        raise ConfigError(f"train.allocator: tcmalloc not found; {where}apt-get install libtcmalloc-minimal4, "
                          "set TITANS_TCMALLOC=/path/to/libtcmalloc_minimal.so.4, or train.allocator=\"glibc\"")
    if argv is None:
        if choice == "tcmalloc":
            raise ConfigError(f"train.allocator: tcmalloc is not loaded in this process; run it with "
                              f"LD_PRELOAD={lib} or from the command line, or train.allocator=\"glibc\"")
        return
    user_has = lib in _preloaded(os.environ)
    env = preload_env(dict(os.environ), lib)
    env[ENV_REEXEC] = "-" if user_has else lib
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, _reexec_argv(argv), env)
