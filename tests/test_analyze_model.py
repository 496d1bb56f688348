"""tools/analyze_model.py on musu and project configs: parameters, FLOPs, activations and
structure, with FLOPs of one head layer counted by hand."""

from __future__ import annotations

from pathlib import Path

import analyze_model  # tools/analyze_model.py (conftest.py puts tools/ on sys.path)
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = REPO_ROOT / "configs" / "Synthetic" / "musu_R_18_FPN_synthetic.yaml"


def test_counts_of_the_quick_start_model(capsys) -> None:
    argv = ["--config-file", str(SYNTHETIC), "--input-size", "64", "64", "--tasks"]
    results = analyze_model.main(argv + ["parameter", "flop", "activation", "structure"])
    # head.cls_score: 3x3 conv, 64 -> 5 channels (NUM_CLASSES 5 x 1 anchor), on P3-P7 of a 64x64
    # image: 8x8 + 4x4 + 2x2 + 1x1 + 1x1 = 86 locations; fvcore counts one multiply-add a flop.
    assert results["flops_by_module"]["head.cls_score"] == 86 * 64 * 9 * 5
    assert results["flops"] > results["flops_by_module"]["head"] > 0
    # The same 3x3 64 -> 5 conv holds 64 * 9 * 5 weights and 5 biases.
    assert "head.cls_score" in capsys.readouterr().out
    assert results["parameters"] > 64 * 9 * 5 + 5
    assert results["activations"]["conv"] > 0
    assert "MuSuHead" in results["structure"]


def test_overrides_reach_the_model() -> None:
    argv = ["--config-file", str(SYNTHETIC), "--tasks", "flop", "--input-size", "64", "64"]
    results = analyze_model.main(argv + ["MODEL.MUSU.NUM_CLASSES", "7"])
    assert results["flops_by_module"]["head.cls_score"] == 86 * 64 * 9 * 7


@pytest.mark.parametrize(
    "config",
    [
        "projects/MutualGuidance/configs/Synthetic/retinanet_mg_R_18_FPN_synthetic.yaml",
        "projects/RankSort/configs/Synthetic/fcos_rs_R_18_FPN_synthetic.yaml",
    ],
)
def test_project_configs(config: str) -> None:
    argv = ["--config-file", str(REPO_ROOT / config), "--input-size", "64", "96"]
    results = analyze_model.main(argv + ["--tasks", "flop", "parameter"])
    assert results["flops"] > 0 and results["parameters"] > 0


def test_images_of_a_registered_dataset(tmp_path: Path) -> None:
    from musu.data.synthetic import ensure_split

    split = ensure_split("val", tmp_path / "data", num_images=2, seed=3, image_size=64)
    argv = ["--config-file", str(SYNTHETIC), "--tasks", "flop", "--dataset", "am_tiny"]
    argv += ["--register-coco", "am_tiny", str(split.json_file), str(split.image_root)]
    argv += ["--num-inputs", "2", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]
    results = analyze_model.main(argv)
    assert results["flops_by_module"]["head.cls_score"] == 86 * 64 * 9 * 5


def test_a_model_without_a_cpu_kernel_is_named() -> None:
    """Detectron2's deformable convolution runs on CUDA only: parameters still count, FLOPs
    stop with a message naming the config and the device to use."""
    config = str(REPO_ROOT / "configs" / "COCO-Detection" / "musu_R_101_DCN_FPN_2x_ms_A3.yaml")
    results = analyze_model.main(["--config-file", config, "--tasks", "parameter"])
    assert results["parameters"] > 0
    argv = ["--config-file", config, "--input-size", "64", "64", "--tasks", "flop"]
    with pytest.raises(SystemExit, match="musu_R_101_DCN.*MODEL.DEVICE cuda"):
        analyze_model.main(argv)
