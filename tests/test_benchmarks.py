"""The benchmark scripts run end to end on tiny inputs and report what they claim to measure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from musu.engine.amp import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "tools" / "benchmarks"
SYNTHETIC = "configs/Synthetic/musu_paper_R_18_FPN_1200it.yaml"


def run(script: str, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_assigner_benchmark_rows_cover_every_size_object_count_and_anchor_number(tmp_path):
    out = tmp_path / "rows.json"
    stdout = run(
        "assigner.py",
        *("--sizes", "64", "96", "--objects", "1", "3", "--num-anchors", "1", "2"),
        *("--repeats", "1", "--warmup", "0", "--json", str(out)),
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["image"], r["M"], r["A"]) for r in rows] == [
        (f"{h}x{w}", m, a) for h, w in ((64, 107), (96, 160)) for m in (1, 3) for a in (1, 2)
    ]
    for row in rows:
        # R = A x locations of the padded image (64 x 128 or 96 x 160) over strides 8-128.
        locations = {
            "64x107": 8 * 16 + 4 * 8 + 2 * 4 + 1 * 2 + 1 * 1,
            "96x160": 12 * 20 + 6 * 10 + 3 * 5 + 2 * 3 + 1 * 2,
        }
        assert row["R"] == row["A"] * locations[row["image"]]
        assert row["musu_ms"] > 0 and row["fcos_ms"] > 0 and row["fcos_peak_mib"] > 0
    assert "Command: `" in stdout and "| image | A | M | R |" in stdout
    assert_environment_line(stdout)


def test_flops_benchmark_increment_per_anchor_is_one_output_conv(tmp_path):
    out = tmp_path / "flops.json"
    run(
        "flops.py",
        *("--config-file", SYNTHETIC, "--num-anchors", "1", "2", "--height", "64", "--width", "64"),
        *("--json", str(out)),
    )
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["MuSu A=1"]["gflops"] == rows["FCOS"]["gflops"]
    channels, classes = 64, 5  # the synthetic config's FPN width and classes
    per_anchor = (classes + 4 + 1) * (9 * channels + 1)
    increment = (rows["MuSu A=2"]["params_m"] - rows["MuSu A=1"]["params_m"]) * 1e6
    assert round(increment) == per_anchor
    # FLOPs of the extra output channels: (C + 4 + 1) x 9 x channels per location of 5 levels.
    locations = 8 * 8 + 4 * 4 + 2 * 2 + 1 + 1
    flops = (rows["MuSu A=2"]["gflops"] - rows["MuSu A=1"]["gflops"]) * 1e9
    assert round(flops) == (classes + 4 + 1) * 9 * channels * locations


def test_train_iter_benchmark_has_a_row_per_model_and_precision():
    precisions = ("fp32", "fp32+cl", "bf16", "amp")
    stdout = run(
        "train_iter.py",
        *("--config-file", SYNTHETIC, "--num-anchors", "1", "--precisions", *precisions),
        *("--batch", "1", "--size", "64", "--max-objects", "2", "--iters", "1", "--warmup", "0"),
    )
    rows = [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in stdout.splitlines()
        if line.startswith("|") and set(line) - set("|-: ")
    ]
    header, body = rows[0], rows[1:]
    assert header[:2] == ["model", "precision"] and "train ratio to fp32" in header
    assert [(r[0], r[1]) for r in body] == [
        (model, precision) for precision in precisions for model in ("FCOS", "MuSu A=1")
    ]
    ratio_to_fp32 = header.index("train ratio to fp32")
    for row in body:
        assert float(row[header.index("train s/iter")]) > 0
        if row[1] == "fp32":
            assert row[ratio_to_fp32] == "1.00"
    assert "Command: `" in stdout
    # what SOLVER.AMP.ENABLED True resolved to on this CPU, as the training log line says it
    native = cpu_has_native_bf16()
    for phase in ("train", "inference"):
        line = next(x for x in stdout.splitlines() if x.startswith(f"`amp` {phase}: "))
        assert line.startswith(f"`amp` {phase}: {'bfloat16' if native else 'float32'} (")
    assert_environment_line(stdout)


def assert_environment_line(stdout: str) -> None:
    """The environment line names each CPU feature with + or - as /proc/cpuinfo says."""
    line = next(x for x in stdout.splitlines() if x.startswith("Environment: "))
    flags = set()
    with open("/proc/cpuinfo") as f:
        for row in f:
            if row.startswith("flags"):
                flags = set(row.split(":", 1)[1].split())
                break
    expected = {
        "AVX2": "avx2" in flags,
        "AVX512F": "avx512f" in flags,
        "AVX512-BF16": "avx512_bf16" in flags,
        "AMX": bool({"amx_bf16", "amx_int8", "amx_tile"} & flags),
        "VNNI": bool({"avx512_vnni", "avx_vnni"} & flags),
    }
    for name, present in expected.items():
        assert (
            f" {name}{'+' if present else '-'}" in line
            or f"; {name}{'+' if present else '-'}" in line
        ), (name, line)
