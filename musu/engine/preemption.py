"""Preemption-safe training: SIGTERM / SIGINT stop training after the current iteration with a
complete checkpoint, so that ``--resume`` loses no finished iteration.

:class:`PreemptionHook` (a Detectron2 hook) replaces the default action of the signals while the
training loop runs: a signal only sets a flag, the iteration in progress (including a checkpoint
being written) completes, then the hook writes ``model_<iter>.pth`` through the trainer's
checkpointer (atomic with :class:`musu.engine.AtomicCheckpointer`), waits for every process, and
raises :class:`Preempted`. In a multi-process run the processes agree on the stop (an all-reduce
of one integer per iteration), so every process stops after the same iteration, even when only
one of them got the signal. A second signal while stopping is logged and otherwise ignored
(``SIGKILL`` stops at once; atomic checkpoint writes keep the files loadable).

:func:`forward_signals_to_children` is for a launcher process (``launch``'s, or a tool running
``train_net.py`` in a subprocess): it passes SIGTERM and SIGINT on to the children and lets them
finish. :class:`SignalShieldedMapper` makes data loader workers ignore the signals (PyTorch's
workers die on SIGTERM, which would crash the training process at its next batch when a cluster
signals the whole process group).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from types import FrameType
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm
from fvcore.common.checkpoint import Checkpointer
from torch.utils.data import get_worker_info

__all__ = [
    "PREEMPTION_SIGNALS",
    "Preempted",
    "PreemptionHook",
    "SignalShieldedMapper",
    "forward_signals_to_children",
    "preemption_exit_code",
]

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


def preemption_exit_code(signum: int) -> int:
    """The exit status of a process stopped by signal ``signum`` after saving: ``128 + signum``
    (143 for SIGTERM, 130 for SIGINT), the shells' convention for "terminated by a signal"."""
    return 128 + int(signum)


class Preempted(BaseException):
    """Raised out of the training loop once the preemption checkpoint is written (on every
    process). A ``BaseException``, like ``KeyboardInterrupt``, so that it is not reported as a
    training error; the hooks' ``after_train`` still run."""

    def __init__(self, signum: int, iteration: int, checkpoint: str, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.iteration = iteration
        self.checkpoint = checkpoint
        self.message = message

    @property
    def exit_code(self) -> int:
        return preemption_exit_code(self.signum)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class PreemptionHook(HookBase):
    """Stop training cleanly on ``signals``: finish the iteration, save, raise :class:`Preempted`.

    Register it after the hooks that checkpoint, evaluate and write metrics, so that they run for
    the last iteration first. ``resume_hint`` (e.g. the command line to rerun) ends the message.
    A signal during the last iteration does not stop the run: the final checkpoint is already
    written by then and the run finishes (final evaluation included).
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        signals: Sequence[int] = PREEMPTION_SIGNALS,
        file_prefix: str = "model",
        resume_hint: str = "",
    ) -> None:
        self.checkpointer = checkpointer
        self.signals = tuple(signals)
        self.file_prefix = file_prefix
        self.resume_hint = resume_hint
        self.received: int = 0
        self._previous: dict[int, Any] = {}

    # -- signal handling ---------------------------------------------------------------------

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received:
            logger.warning(
                "%s received again: still finishing the iteration and writing the checkpoint "
                "(send SIGKILL to stop at once)",
                _signal_name(signum),
            )
            return
        self.received = signum

    def before_train(self) -> None:
        self.received = 0
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training outside the main thread: preemption signals are not handled")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def after_train(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    # -- stopping ----------------------------------------------------------------------------

    def _agreed_signal(self) -> int:
        """The signal any process received (0 if none), the same value on every process."""
        if comm.get_world_size() == 1:
            return self.received
        device = torch.device("cpu")
        if dist.get_backend() == dist.Backend.NCCL:
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def after_step(self) -> None:
        signum = self._agreed_signal()
        if not signum:
            return
        iteration = self.trainer.iter
        name = _signal_name(signum)
        if iteration + 1 >= self.trainer.max_iter:
            logger.warning(
                "%s received during the last iteration (%d): the final checkpoint is written; "
                "finishing the run",
                name,
                iteration,
            )
            return
        basename = f"{self.file_prefix}_{iteration:07d}"
        checkpoint = os.path.join(self.checkpointer.save_dir, f"{basename}.pth")
        if comm.is_main_process():
            last = (
                self.checkpointer.get_checkpoint_file()
                if self.checkpointer.has_checkpoint()
                else ""
            )
            if os.path.basename(last) != f"{basename}.pth":  # not just written periodically
                self.checkpointer.save(basename, iteration=iteration)
        comm.synchronize()  # nobody exits before the checkpoint is complete
        message = (
            f"Training stopped by {name} after iteration {iteration}: checkpoint {checkpoint} "
            f"(iteration, weights, optimizer and LR schedule). Continue from iteration "
            f"{iteration + 1} with --resume"
        )
        if self.resume_hint:
            message += f": {self.resume_hint}"
        raise Preempted(signum, iteration, checkpoint, message)


@contextlib.contextmanager
def forward_signals_to_children(
    signals: Sequence[int] = PREEMPTION_SIGNALS,
    pids: Callable[[], Iterable[int]] | None = None,
) -> Iterator[list[int]]:
    """While the block runs (in the main thread), a signal in ``signals`` sent to this process is
    passed on to its children instead of stopping it, so that a launcher waits for its workers to
    save and exit. The children are ``pids()`` when given (e.g. a ``subprocess.Popen``'s pid),
    else the live ``multiprocessing`` children (``launch``'s workers). Yields the list of signals
    received."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def children() -> Iterable[int]:
        if pids is not None:
            return pids()
        return [child.pid for child in multiprocessing.active_children()]

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        for pid in children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in signals}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class SignalShieldedMapper:
    """``mapper(record)``; in a data loader worker process, ``signals`` are ignored from the first
    record on, so that a signal sent to the whole process group (a cluster stopping the job,
    Ctrl-C) leaves the workers alive for the training process to finish its iteration; they exit
    when it shuts its loader down (or when it dies). In the training process itself
    (``NUM_WORKERS`` 0) nothing changes. Picklable."""

    def __init__(
        self, mapper: Callable[[Any], Any], signals: Sequence[int] = PREEMPTION_SIGNALS
    ) -> None:
        self.mapper = mapper
        self.signals = tuple(signals)
        self._shielded_pid = 0

    def __call__(self, record: Any) -> Any:
        if self._shielded_pid != os.getpid() and get_worker_info() is not None:
            for signum in self.signals:
                signal.signal(signum, signal.SIG_IGN)
            self._shielded_pid = os.getpid()
        return self.mapper(record)
