"""Helpers for tests that stop a training subprocess with a signal.

The subprocess must be started with ``start_new_session=True``: its pid is then the id of a
process group that holds it and everything it starts (training workers, data loader workers).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator


def wait_for_checkpoint(output_dir: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Return once ``output_dir/last_checkpoint`` exists; fail with the process's output if it
    exits first, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-4000:]
        if (output_dir / "last_checkpoint").is_file():
            return
        time.sleep(0.02)
    raise AssertionError("no checkpoint written in time")


def wait_for_group_exit(process: subprocess.Popen, timeout: float = 60) -> None:
    """Return once no process of ``process``'s group is alive; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError("processes of the stopped run are still alive")


@contextlib.contextmanager
def group_killed_on_exit(process: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Yield ``process``; on leaving, SIGKILL whatever is left of its group (a failed test must
    not leave a training behind)."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
