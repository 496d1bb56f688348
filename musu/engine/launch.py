"""Starting a training script's processes so that a signal stops them cleanly.

:func:`launch` is Detectron2's ``launch`` with the preemption glue of ``train_net.py``: with
several processes, SIGTERM / SIGINT sent to the launcher are passed on to the workers, which stop
after a checkpoint (:class:`musu.engine.PreemptionHook`); the launcher then prints the command
that resumes and exits with ``128 + signal``. :func:`exit_when_preempted` does the same inside a
worker (one process, or each of several). :func:`resume_command` is that command.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

from detectron2.engine import launch as d2_launch
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException

from .preemption import (
    PREEMPTION_SIGNALS,
    Preempted,
    forward_signals_to_children,
    preemption_exit_code,
)

__all__ = ["exit_when_preempted", "launch", "resume_command"]

logger = logging.getLogger(__name__)

PREEMPTION_EXIT_CODES = {preemption_exit_code(signum) for signum in PREEMPTION_SIGNALS}


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues the run of ``argv`` (``sys.argv``): ``--resume`` added
    before the ``KEY VALUE`` options (argparse gives everything after them to ``opts``)."""
    if "--resume" in argv:
        return shlex.join(["python", *argv])
    return shlex.join(["python", argv[0], "--resume", *argv[1:]])


@contextlib.contextmanager
def exit_when_preempted() -> Iterator[None]:
    """Turn :class:`musu.engine.Preempted` out of the block into ``SystemExit(128 + signal)``
    after logging how to resume, once every process got there."""
    try:
        yield
    except Preempted as stopped:
        logger.warning(stopped.message)
        # The launcher terminates every worker as soon as one exits: wait until all have logged.
        comm.synchronize()
        raise SystemExit(stopped.exit_code) from None


def launch(
    main_func: Callable[[argparse.Namespace], Any],
    args: argparse.Namespace,
    argv: Optional[Sequence[str]] = None,
) -> None:
    """Run ``main_func(args)`` in ``args.num_gpus`` processes on each of ``args.num_machines``
    machines (Detectron2's ``launch``, with ``args.dist_url`` and ``args.machine_rank``).

    Sets ``args.resume_command`` (from ``argv``, default ``sys.argv``) for the trainer's
    message. A run stopped by SIGTERM / SIGINT exits with ``128 + signal`` after printing it.
    """
    args.resume_command = resume_command(sys.argv if argv is None else argv)
    several = args.num_gpus * args.num_machines > 1
    # With several processes the launcher waits for its workers: a signal sent to it is passed
    # on to them. With one, main_func runs in this process and the hook handles the signals.
    with forward_signals_to_children() if several else contextlib.nullcontext():
        try:
            d2_launch(
                main_func,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args,),
            )
        except ProcessExitedException as stopped:
            if stopped.exit_code not in PREEMPTION_EXIT_CODES:
                raise
            print(f"Training stopped by a signal; continue with: {args.resume_command}")
            sys.exit(stopped.exit_code)
