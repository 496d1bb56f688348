"""Several training processes on any device: DDP wrapping that works for CPU models too.

Detectron2's ``create_ddp_model`` always passes ``device_ids=[local_rank]``, which
``DistributedDataParallel`` rejects for a CPU module. :func:`create_ddp_model` keeps Detectron2's
behaviour for CUDA models and wraps CPU models without ``device_ids`` (gradients are all-reduced
with gloo, the backend Detectron2's ``launch`` picks when CUDA is absent).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from detectron2.engine import defaults
from detectron2.utils import comm
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks as comm_hooks
from torch.nn.parallel import DistributedDataParallel

__all__ = ["create_ddp_model", "limit_cpu_threads_per_process"]

logger = logging.getLogger(__name__)


def create_ddp_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """``model`` itself in a 1-process run; else ``DistributedDataParallel(model, **kwargs)``,
    with ``device_ids=[local_rank]`` (Detectron2's choice) for a CUDA model and without
    ``device_ids`` for a CPU model. ``fp16_compression`` (Detectron2's keyword) registers DDP's
    float16 gradient-compression hook on either device."""
    if comm.get_world_size() == 1:
        return model
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type == "cuda":
        return defaults.create_ddp_model(model, **kwargs)
    fp16_compression = kwargs.pop("fp16_compression", False)  # Detectron2's keyword, not DDP's
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp


def limit_cpu_threads_per_process() -> int:
    """In a multi-process run without ``$OMP_NUM_THREADS``, give each of this machine's processes
    an equal share of the CPU cores (at least 1) so that they do not oversubscribe them; returns
    the number of intra-op threads now in use."""
    processes = comm.get_local_size()
    if processes > 1 and not os.environ.get("OMP_NUM_THREADS"):
        threads = max(1, (os.cpu_count() or 1) // processes)
        torch.set_num_threads(threads)
        logger.info("%d processes on this machine: %d CPU thread(s) each", processes, threads)
    return torch.get_num_threads()
