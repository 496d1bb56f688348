"""Shared helpers of the benchmarks: the models compared, random boxes, interleaved timing, peak
tensor memory, tables.

Peak memory (see README.md): on CUDA, ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``; on CPU, the allocation / free events that PyTorch's CPU allocator
reports to ``torch.profiler`` (``profile_memory=True``), sorted by time and summed: the maximum of
that running sum is the peak of tensor memory allocated during the call (live inputs excluded,
outputs included). It counts tensor storage only, not Python objects or allocator caching.
"""

from __future__ import annotations

import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from types import FrameType
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.fcos import FCOS
from torch import Tensor, nn

import musu

__all__ = [
    "MIB",
    "LineProfile",
    "command_line",
    "cpu_features",
    "environment_summary",
    "inspect_unwrap",
    "quiet_warnings",
    "interleaved_timings",
    "line_profile",
    "markdown_table",
    "paired_ratio",
    "peak_memory_bytes",
    "random_boxes",
    "synchronize",
]

# Kineto prints an error line when it finds no GPU; it reads this variable lazily (at profiling).
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

MIB = 2.0**20

# COCO-like object size: sqrt(area) is log-normal with P(< 32 px) = 0.41 and P(< 96 px) = 0.75
# (COCO train2017 small / medium / large fractions 41% / 34% / 24%), clipped to [min, max] size.
_LOG_SIZE_MEAN = 3.743
_LOG_SIZE_STD = 1.217
# log(h / w) ~ N(0, 0.5), clipped to [1/4, 4].
_LOG_ASPECT_STD = 0.5


def random_boxes(
    num_boxes: int,
    image_size: Tuple[int, int],
    generator: torch.Generator,
    min_size: float = 8.0,
    max_size: float = 800.0,
) -> Tensor:
    """(M, 4) XYXY float32 boxes inside an (H, W) image with a COCO-like size distribution.

    sqrt(area) is log-normal (41% < 32 px, 75% < 96 px), clipped to [min_size, max_size]; the
    aspect ratio h / w is log-normal in [1/4, 4]; sides are clipped to the image; the position is
    uniform over the positions where the box fits.
    """
    height, width = image_size
    log_size = torch.randn(num_boxes, generator=generator, dtype=torch.float64)
    size = (_LOG_SIZE_MEAN + _LOG_SIZE_STD * log_size).exp().clamp(min_size, max_size)
    log_aspect = torch.randn(num_boxes, generator=generator, dtype=torch.float64)
    aspect = (_LOG_ASPECT_STD * log_aspect).clamp(-math.log(4), math.log(4)).exp()  # h / w
    box_w = (size / aspect.sqrt()).clamp(2.0, width)
    box_h = (size * aspect.sqrt()).clamp(2.0, height)
    x1 = torch.rand(num_boxes, generator=generator, dtype=torch.float64) * (width - box_w)
    y1 = torch.rand(num_boxes, generator=generator, dtype=torch.float64) * (height - box_h)
    return torch.stack([x1, y1, x1 + box_w, y1 + box_h], dim=1).float()


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (CUDA); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_timings(
    fns: Dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    device: torch.device,
) -> Dict[str, List[float]]:
    """Seconds per call of each function, measured interleaved: every repeat runs all functions
    once, in an order rotated by one each repeat, so that load drift hits all of them alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over repeats of numerator[i] / denominator[i] (both measured in the same repeat)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def _is_cpu_memory_event(event: object) -> bool:
    """True for the profiler's CPU allocator events (``nbytes`` > 0: allocation, < 0: free)."""
    return event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Maximum of the running sum of CPU allocation / free events while ``fn()`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if _is_cpu_memory_event(e)
    ]
    events.sort(key=lambda item: item[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak tensor memory allocated while ``fn()`` runs, above what was live before the call."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak_bytes(fn)


@dataclass
class LineProfile:
    """Per source line of the traced functions: inclusive seconds, calls, allocated bytes; and the
    line that was running when the tensor memory of the call peaked."""

    seconds: Dict[Tuple[str, int], float] = field(default_factory=dict)
    calls: Dict[Tuple[str, int], int] = field(default_factory=dict)
    allocated: Dict[Tuple[str, int], int] = field(default_factory=dict)
    peak_bytes: int = 0
    peak_line: Optional[Tuple[str, int]] = None
    total_seconds: float = 0.0


_LineKey = Tuple[str, int]  # (function name, line number)
_Range = Tuple[int, int, _LineKey]  # (start ns, end ns, line)


def _traced_call(
    fn: Callable[[], object], targets: Sequence[Callable]
) -> Tuple[torch.profiler.profile, float]:
    """Run ``fn()`` once under ``torch.profiler`` (CPU, memory events on) while a
    ``sys.settrace`` hook opens one ``record_function`` range ``line:<func>:<line>`` per executed
    source line of each target. Returns the finished profiler and the wall seconds of the call."""
    from torch.profiler import ProfilerActivity, profile

    codes = {inspect_unwrap(t).__code__: inspect_unwrap(t).__name__ for t in targets}
    open_ranges: Dict[int, torch.autograd.profiler.record_function] = {}

    def local_trace(frame: FrameType, event: str, arg: object) -> Callable:
        key = id(frame)
        if key in open_ranges:
            open_ranges.pop(key).__exit__(None, None, None)
        if event == "line":
            marker = torch.autograd.profiler.record_function(
                f"line:{codes[frame.f_code]}:{frame.f_lineno}"
            )
            marker.__enter__()
            open_ranges[key] = marker
        return local_trace

    def global_trace(frame: FrameType, event: str, arg: object) -> Optional[Callable]:
        return local_trace if frame.f_code in codes else None

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        sys.settrace(global_trace)
        try:
            result = fn()
        finally:
            sys.settrace(None)
        del result
        total = time.perf_counter() - start
    return prof, total


def _line_ranges(
    prof: torch.profiler.profile, out: LineProfile
) -> Tuple[List[_Range], List[Tuple[int, int]]]:
    """Sum the seconds and calls of each line range into ``out``; return the line ranges and the
    CPU memory events ``(time_ns, nbytes)``, both sorted by time."""
    ranges: List[_Range] = []
    memory: List[Tuple[int, int]] = []
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        if name.startswith("line:"):
            _, func, line = name.split(":")
            key = (func, int(line))
            ranges.append((e.start_ns(), e.start_ns() + e.duration_ns(), key))
            out.seconds[key] = out.seconds.get(key, 0.0) + e.duration_ns() * 1e-9
            out.calls[key] = out.calls.get(key, 0) + 1
        elif _is_cpu_memory_event(e):
            memory.append((e.start_ns(), e.nbytes()))
    ranges.sort()
    memory.sort()
    return ranges, memory


def _innermost(ranges: Sequence[_Range], t_ns: int) -> Optional[_LineKey]:
    """The line of the shortest range (sorted by start) that contains ``t_ns``, if any."""
    best = None
    for begin, end, key in ranges:  # small: one range per executed line
        if begin > t_ns:
            break
        if t_ns <= end and (best is None or end - begin < best[1] - best[0]):
            best = (begin, end, key)
    return None if best is None else best[2]


def _attribute_memory(
    out: LineProfile, ranges: Sequence[_Range], memory: Sequence[Tuple[int, int]]
) -> None:
    """Add each allocation to its innermost line in ``out``, and record the peak of the running
    sum of live tensor bytes with the line running at that moment."""
    live = 0
    for t_ns, nbytes in memory:
        live += nbytes
        key = _innermost(ranges, t_ns)
        if nbytes > 0 and key is not None:
            out.allocated[key] = out.allocated.get(key, 0) + nbytes
        if live > out.peak_bytes:
            out.peak_bytes, out.peak_line = live, key


def line_profile(fn: Callable[[], object], targets: Sequence[Callable]) -> LineProfile:
    """Run ``fn()`` once under ``torch.profiler`` (CPU) while a ``sys.settrace`` hook opens one
    ``record_function`` range per executed source line of each target function.

    Returns, for each (function name, line number), the summed wall time of the range (inclusive
    of callees that are not targets), the tensor bytes allocated inside it (innermost range only),
    and the line running at the peak of live tensor memory. Source is traced as is: no copy.
    """
    prof, total = _traced_call(fn, targets)
    out = LineProfile(total_seconds=total)
    ranges, memory = _line_ranges(prof, out)
    _attribute_memory(out, ranges, memory)
    return out


def inspect_unwrap(fn: Callable) -> Callable:
    """The undecorated function (e.g. under ``torch.no_grad()``), for its code object."""
    fn = getattr(fn, "__func__", fn)
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def quiet_warnings() -> None:
    """Silence two known, harmless library warnings that would clutter the printed tables."""
    warnings.filterwarnings(
        "ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning
    )
    warnings.filterwarnings(
        "ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The command that ran this script, as typed from the repository root."""
    return " ".join(["python"] + [shlex.quote(arg) for arg in sys.argv])


# What decides CPU speed per number format: name shown -> /proc/cpuinfo flags (any of them).
CPU_FEATURES = {
    "AVX2": ("avx2",),
    "AVX512F": ("avx512f",),
    "AVX512-BF16": ("avx512_bf16",),
    "AMX": ("amx_bf16", "amx_int8", "amx_tile"),
    "VNNI": ("avx512_vnni", "avx_vnni"),
}


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> Optional[Dict[str, bool]]:
    """``{feature: present}`` for :data:`CPU_FEATURES` from the first ``flags`` line of
    ``cpuinfo``; ``None`` where that file does not exist or has no flags (not Linux x86)."""
    try:
        with open(cpuinfo) as f:
            line = next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if line is None:
        return None
    flags = set(line.split(":", 1)[1].split())
    return {name: any(flag in flags for flag in names) for name, names in CPU_FEATURES.items()}


def _cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_summary(device: torch.device) -> str:
    """One line: device, CPU model and features (AVX2, AVX512F, AVX512-BF16, AMX, VNNI), torch
    version, threads, CPU count and load (the machine may be shared)."""
    features = cpu_features()
    shown = (
        "features unknown"
        if features is None
        else " ".join(f"{name}{'+' if present else '-'}" for name, present in features.items())
    )
    cpu = f"CPU ({_cpu_model()}; {shown})"
    where = f"CUDA ({torch.cuda.get_device_name(device)}), {cpu}" if device.type == "cuda" else cpu
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average %.2f" % os.getloadavg()[0]
    return (
        f"{where}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs{load}"
    )


def load_config(path: str, device: str, opts: List[str]) -> CfgNode:
    """:func:`musu.build_config` of the file and overrides on ``device``, not frozen (the
    benchmark sets A and the score threshold per model)."""
    return musu.build_config(path, list(opts) + ["MODEL.DEVICE", device], freeze=False)


def build_musu(cfg: CfgNode, num_anchors: int, score_thresh: float, seed: int) -> nn.Module:
    """MuSu from the config with A anchor slots and the given test score threshold."""
    cfg = cfg.clone()
    cfg.MODEL.MUSU.NUM_ANCHORS = num_anchors
    cfg.MODEL.MUSU.SCORE_THRESH_TEST = score_thresh
    torch.manual_seed(seed)
    return build_model(cfg)


def build_fcos(cfg: CfgNode, score_thresh: float, seed: int) -> FCOS:
    """Detectron2's FCOS (META_ARCH "D2FCOS") from the same config: MuSu's backbone, tower width /
    depth / norm and test settings."""
    cfg = cfg.clone()
    cfg.MODEL.META_ARCHITECTURE = "D2FCOS"
    cfg.MODEL.MUSU.NUM_ANCHORS = 1
    cfg.MODEL.MUSU.SCORE_THRESH_TEST = score_thresh
    torch.manual_seed(seed)
    return build_model(cfg)


def num_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not."""
    return sum(p.numel() for p in model.parameters())
