"""Mixed precision and memory format for training and evaluation, on CUDA and on CPU.

Detectron2's ``AMPTrainer`` needs CUDA. This module picks the autocast dtype for a device from the
config and runs the training step or the evaluation under it:

* CUDA: ``SOLVER.AMP.PRECISION`` (``float16`` with Detectron2's gradient scaler, or ``bfloat16``).
* CPU: ``bfloat16`` (no gradient scaler: bfloat16 has float32's exponent range), but only where
  the CPU has native bfloat16 instructions (x86 AVX512-BF16 or AMX, Arm BF16). Elsewhere bfloat16
  is emulated and usually slower than float32, so the run stays in float32 and one log line says
  why, unless ``SOLVER.AMP.CPU_BFLOAT16`` is ``"always"``.

Training uses ``SOLVER.AMP.ENABLED``; evaluation uses ``TEST.AMP.ENABLED``. ``MODEL.CHANNELS_LAST``
stores the model's 4-D weights channels-last, so convolutions and their outputs use that format.
The assigner and the losses always run in float32 (the meta-architectures disable autocast there).

Setting ``MUSU_CPU_NATIVE_BF16=1`` (or ``0``) in the environment overrides the CPU detection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from detectron2.config import CfgNode
from detectron2.engine import AMPTrainer, SimpleTrainer
from torch import nn

from ..config import AMP_PRECISIONS, CPU_BFLOAT16_MODES, check_choice

__all__ = [
    "Autocast",
    "CPUAutocastTrainer",
    "build_train_loop",
    "choose_autocast",
    "train_loop",
    "cpu_has_native_bf16",
    "resolve_autocast",
    "autocast_context",
    "apply_memory_format",
]

logger = logging.getLogger(__name__)

ENV_NATIVE_BF16 = "MUSU_CPU_NATIVE_BF16"
# /proc/cpuinfo flags that mean bfloat16 arithmetic in hardware.
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU runs bfloat16 arithmetic natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16).

    Reads the CPU flags from ``cpuinfo`` (Linux's ``/proc/cpuinfo``); answers False where that
    file is missing. The environment variable ``MUSU_CPU_NATIVE_BF16`` (``1`` or ``0``) overrides
    the answer.
    """
    forced = os.environ.get(ENV_NATIVE_BF16, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"{ENV_NATIVE_BF16} must be 0 or 1, got {forced!r}")
        return forced == "1"
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return bool(_NATIVE_BF16_FLAGS & set(value.split()))
    except OSError:
        pass
    return False


@dataclass(frozen=True)
class Autocast:
    """The precision a run uses on one device: ``dtype`` None means plain float32."""

    device_type: str
    dtype: torch.dtype | None
    reason: str

    @property
    def enabled(self) -> bool:
        return self.dtype is not None


def resolve_autocast(cfg: CfgNode, *, training: bool) -> Autocast:
    """The autocast setting for training (``SOLVER.AMP.ENABLED``) or evaluation
    (``TEST.AMP.ENABLED``) on ``MODEL.DEVICE``, following the rule in the module docstring."""
    device_type = torch.device(cfg.MODEL.DEVICE).type
    key = "SOLVER.AMP.ENABLED" if training else "TEST.AMP.ENABLED"
    enabled = cfg.SOLVER.AMP.ENABLED if training else cfg.TEST.AMP.ENABLED
    if enabled and device_type == "cuda":
        check_choice(cfg.SOLVER.AMP, "SOLVER.AMP", "PRECISION", AMP_PRECISIONS)
    if enabled and device_type == "cpu":
        check_choice(cfg.SOLVER.AMP, "SOLVER.AMP", "CPU_BFLOAT16", CPU_BFLOAT16_MODES)
    return choose_autocast(
        device_type,
        enabled,
        key=key,
        precision=cfg.SOLVER.AMP.PRECISION,
        cpu_bfloat16=cfg.SOLVER.AMP.CPU_BFLOAT16,
    )


def choose_autocast(
    device_type: str,
    enabled: bool,
    *,
    key: str,
    precision: str = "float16",
    cpu_bfloat16: str = "native",
) -> Autocast:
    """The rule of the module docstring for a device type (``"cuda"``, ``"cpu"``, ...), without a
    YAML config: ``precision`` is the CUDA dtype, ``cpu_bfloat16`` ``"native"`` or ``"always"``;
    ``key`` names the switch in the reason and in errors (e.g. ``train.amp.enabled``)."""
    if not enabled:
        return Autocast(device_type, None, f"{key} is False")
    if device_type == "cuda":
        if precision not in AMP_PRECISIONS:
            raise ValueError(
                f"{key}: the precision must be one of {AMP_PRECISIONS}, got {precision!r}"
            )
        return Autocast(device_type, getattr(torch, precision), f"{key} on CUDA")
    if device_type != "cpu":
        return Autocast(device_type, None, f"no mixed precision on device {device_type!r}")
    if cpu_bfloat16 not in CPU_BFLOAT16_MODES:
        raise ValueError(
            f"{key}: the CPU bfloat16 mode must be one of {CPU_BFLOAT16_MODES}, "
            f"got {cpu_bfloat16!r}"
        )
    if cpu_has_native_bf16():
        return Autocast("cpu", torch.bfloat16, f"{key}; the CPU has native bfloat16")
    if cpu_bfloat16 == "always":
        return Autocast(
            "cpu", torch.bfloat16, f"{key} and CPU bfloat16 'always' (emulated bfloat16)"
        )
    return Autocast(
        "cpu",
        None,
        f"{key}, but this CPU ({platform.processor() or platform.machine()}) has no native "
        "bfloat16 instructions (AVX512-BF16, AMX or Arm BF16), where bfloat16 is usually slower "
        "than float32: running in float32 (SOLVER.AMP.CPU_BFLOAT16 'always' forces bfloat16)",
    )


@contextlib.contextmanager
def autocast_context(setting: Autocast) -> Iterator[None]:
    """``torch.autocast`` for ``setting``; a no-op context when it is float32."""
    if setting.enabled:
        with torch.autocast(device_type=setting.device_type, dtype=setting.dtype):
            yield
    else:
        yield


class CPUAutocastTrainer(SimpleTrainer):
    """Detectron2's ``SimpleTrainer`` with the forward pass under ``torch.autocast`` (on CPU:
    bfloat16, which needs no gradient scaler). Backward and the optimizer step run outside it."""

    def __init__(self, model: nn.Module, data_loader, optimizer, *, setting: Autocast, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.setting = setting

    def run_step(self) -> None:
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with autocast_context(self.setting):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            losses = loss_dict
            loss_dict = {"total_loss": loss_dict}
        else:
            losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        if self.async_write_metrics:
            self.concurrent_executor.submit(
                self._write_metrics, loss_dict, data_time, iter=self.iter
            )
        else:
            self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def build_train_loop(cfg: CfgNode, model: nn.Module, data_loader, optimizer) -> SimpleTrainer:
    """The training loop for ``cfg``'s precision: :func:`train_loop` of
    :func:`resolve_autocast`."""
    return train_loop(resolve_autocast(cfg, training=True), model, data_loader, optimizer)


def train_loop(setting: Autocast, model: nn.Module, data_loader, optimizer) -> SimpleTrainer:
    """The training loop for ``setting``: ``SimpleTrainer`` (float32), Detectron2's
    ``AMPTrainer`` (CUDA, with a gradient scaler for float16) or :class:`CPUAutocastTrainer`.
    Logs the precision chosen and why."""
    logger.info("Training precision: %s (%s).", setting.dtype or torch.float32, setting.reason)
    if not setting.enabled:
        return SimpleTrainer(model, data_loader, optimizer)
    if setting.device_type == "cuda":
        return AMPTrainer(model, data_loader, optimizer, precision=setting.dtype)
    return CPUAutocastTrainer(model, data_loader, optimizer, setting=setting)


def apply_memory_format(model: nn.Module, cfg: CfgNode) -> nn.Module:
    """Store the model's 4-D parameters and buffers channels-last when ``MODEL.CHANNELS_LAST``;
    returns the model (changed in place)."""
    if cfg.MODEL.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    return model
