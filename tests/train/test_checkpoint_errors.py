"""Which checkpoint failures are failed writes (stop in one line, naming the folder) and which
are bugs (keep their traceback): titans_scale.train.trainer._os_error."""

from __future__ import annotations

import errno

from torch.distributed.checkpoint.api import CheckpointException

from titans_scale.train.trainer import _os_error

# What torch's zip writer raised in CI when a tmpfs filled up inside the step-8 checkpoint.
SHORT_WRITE = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def test_os_errors_and_short_writes_are_failed_writes():
    full = OSError(errno.ENOSPC, "No space left on device")
    assert _os_error(full) is full
    got = _os_error(SHORT_WRITE)
    assert isinstance(got, OSError) and "came up short" in str(got) and "\n" not in str(got)


def test_a_short_write_on_a_full_file_system_is_enospc(tmp_path, monkeypatch):
    import titans_scale.train.trainer as trainer

    monkeypatch.setattr(trainer, "_free_bytes", lambda folder: 4096)
    got = _os_error(CheckpointException("save", {0: (SHORT_WRITE, None)}), tmp_path / "checkpoints")
    assert got.errno == errno.ENOSPC and "No space left on device" in str(got)
    monkeypatch.setattr(trainer, "_free_bytes", lambda folder: 1 << 30)
    assert _os_error(SHORT_WRITE, tmp_path).errno is None


def test_failures_inside_distributed_checkpoint_are_unwrapped():
    full = OSError(errno.ENOSPC, "No space left on device")
    assert _os_error(CheckpointException("save", {0: (full, None)})) is full
    assert isinstance(_os_error(CheckpointException("save", {0: (SHORT_WRITE, None)})), OSError)


def test_other_errors_are_bugs():
    assert _os_error(RuntimeError("shape mismatch in state_dict")) is None
    assert _os_error(CheckpointException("save", {0: (KeyError("model"), None)})) is None
