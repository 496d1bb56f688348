"""Export (musu.export, tools/export_model.py): the exported TorchScript and ONNX Runtime models
give the eager model's detections and AP.

A checkpoint is trained in the test (20 iterations on a tiny synthetic split of 128 px images,
through train_net.py) and exported from the saved file by tools/export_model.py, traced on its
built-in 128 px sample image. Parity is checked on images of other sizes. Tolerances: boxes
within 1e-3 px, scores within 1e-5 (TorchScript runs the same kernels and is compared exactly;
ONNX Runtime's convolutions differ from PyTorch's by float32 rounding: up to ~3e-7 in scores and
~1.5e-4 px in boxes as measured here). Models: MuSu A=1 (trained), MuSu A=3, D2FCOS and the
Mutual Guidance project's MGRetinaNet (seeded random init).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import export_model as export_tool  # tools/export_model.py (conftest.py puts tools/ on sys.path)
import numpy as np
import onnx
import pytest
import torch
from detectron2.engine import DefaultPredictor, default_argument_parser
from detectron2.structures import Instances

import musu
from musu.data import register_synthetic_split
from musu.data.synthetic import ensure_split, render_image
from musu.export import ExportedModel, export_model, sample_image
from musu.export.quantization import QUANTIZATION_KEY

import train_net  # the root script

REPO_ROOT = Path(__file__).resolve().parents[1]
MUSU_CONFIG = REPO_ROOT / "configs" / "Synthetic" / "musu_paper_R_18_FPN_1200it.yaml"
FCOS_CONFIG = REPO_ROOT / "configs" / "Synthetic" / "fcos_R_18_FPN_1200it.yaml"
MG_CONFIG = (
    REPO_ROOT / "projects/MutualGuidance/configs/Synthetic/retinanet_mg_R_18_FPN_synthetic.yaml"
)
TRAIN_NAME, VAL_NAME = "export_synthetic_train", "export_synthetic_val"
BOX_TOL, SCORE_TOL = 1e-3, 1e-5
SCORE_KEY = "MODEL.MUSU.SCORE_THRESH_TEST"

TINY = [
    "DATASETS.TRAIN", f"('{TRAIN_NAME}',)",
    "DATASETS.TEST", f"('{VAL_NAME}',)",
    "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "128",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, object]:
    """A MuSu checkpoint trained for 20 iterations, and its eager AP on the val split."""
    root = tmp_path_factory.mktemp("export")
    for name, split, count, seed in [(TRAIN_NAME, "train", 16, 21), (VAL_NAME, "val", 8, 22)]:
        register_synthetic_split(
            name, root / "data", split, num_images=count, seed=seed, image_size=128
        )
    output_dir = root / "run"
    argv = ["--config-file", str(MUSU_CONFIG), "OUTPUT_DIR", str(output_dir), *TINY]
    argv += [
        "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.MAX_ITER", "20",
        "SOLVER.STEPS", "(15,)",
        "SOLVER.WARMUP_ITERS", "5",
        "SOLVER.CHECKPOINT_PERIOD", "100",
    ]  # fmt: skip
    results = train_net.main(default_argument_parser().parse_args(argv))
    return {"weights": str(output_dir / "model_final.pth"), "ap": results["bbox"]["AP"]}


def _cfg(config: Path, weights: str, *opts: str):
    return musu.build_config(config, [*TINY, "MODEL.WEIGHTS", weights, *opts])


def _images() -> Dict[str, np.ndarray]:
    """Three synthetic images at sizes other than the 128x128 sample."""
    images = {}
    for index, (height, width) in enumerate([(150, 100), (96, 200), (211, 173)]):
        image, _ = render_image(seed=22, index=index, image_size=128)
        images[f"{height}x{width}"] = cv2.resize(image, (width, height))
    return images


PLAIN_IMAGES = {f"plain_{v}": np.full((90, 120, 3), v, dtype=np.uint8) for v in (0, 128, 255)}


def _threshold(
    cfg, key: str, images: Dict[str, np.ndarray], one_empty: bool
) -> Tuple[Dict[str, np.ndarray], str, float]:
    """The images to compare, the one of them that must come out empty ("" if none) and a score
    threshold that leaves every other image with detections.

    Without ``one_empty``: ``images`` and 0.9 x their lowest top score. With it: the plain image
    of PLAIN_IMAGES with the lowest top score joins them, the image with the lowest top score of
    all is the empty one, and the threshold lies halfway between the lowest and the second lowest
    top score (the tiny models here score all images alike, so which image that is, and where the
    threshold lies, is read off the model rather than fixed)."""
    predictor = DefaultPredictor(_with(cfg, key, "0.0"))

    def top_scores(named: Dict[str, np.ndarray]) -> Dict[str, float]:
        return {n: float(predictor(x)["instances"].scores.max()) for n, x in named.items()}

    top = top_scores(images)
    if not one_empty:
        return images, "", min(top.values()) * 0.9
    plain = top_scores(PLAIN_IMAGES)
    quietest = min(plain, key=plain.get)
    images = {**images, quietest: PLAIN_IMAGES[quietest]}
    top[quietest] = plain[quietest]
    (empty, lowest), (_, second) = sorted(top.items(), key=lambda item: item[1])[:2]
    # exported scores differ from eager ones by < SCORE_TOL: the threshold must sit well clear
    assert second - lowest > 10 * SCORE_TOL, f"top scores too close to split: {top}"
    return images, empty, (lowest + second) / 2


def _with(cfg, *opts: str):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg


def assert_same_detections(eager: Instances, exported: Instances, name: str) -> None:
    """Same count; each eager detection has an exported one of the same class, box within
    BOX_TOL and score within SCORE_TOL (matched one to one; order may differ between equal
    scores)."""
    assert exported.image_size == eager.image_size, name
    assert len(exported) == len(eager), f"{name}: {len(exported)} exported vs {len(eager)} eager"
    unmatched = list(range(len(exported)))
    for i in range(len(eager)):
        match = [
            j
            for j in unmatched
            if exported.pred_classes[j] == eager.pred_classes[i]
            and abs(float(exported.scores[j] - eager.scores[i])) <= SCORE_TOL
            and float((exported.pred_boxes.tensor[j] - eager.pred_boxes.tensor[i]).abs().max())
            <= BOX_TOL
        ]
        assert match, f"{name}: eager detection {i} has no exported counterpart"
        unmatched.remove(match[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, opts, trained_weights",
    [
        (MUSU_CONFIG, (), True),  # with an image without detections
        (MUSU_CONFIG, ("MODEL.MUSU.NUM_ANCHORS", "3"), False),  # seeded random init
        (FCOS_CONFIG, (), False),  # seeded random init
        (MG_CONFIG, (), False),  # seeded random init (projects/MutualGuidance: MGRetinaNet)
    ],
    ids=["musu_A1", "musu_A3", "d2fcos", "mg_retinanet"],
)
def test_exported_models_give_the_eager_detections(
    trained, tmp_path: Path, config, opts, trained_weights
) -> None:
    key = "MODEL.RETINANET.SCORE_THRESH_TEST" if config == MG_CONFIG else SCORE_KEY
    cfg = _cfg(config, trained["weights"] if trained_weights else "", *opts)
    images = _images()
    torch.manual_seed(0)
    images, empty, threshold = _threshold(cfg, key, images, one_empty=trained_weights)
    cfg = _with(cfg, key, str(threshold))
    torch.manual_seed(0)
    predictor = DefaultPredictor(cfg)
    assert tuple(sample_image(cfg).shape) == (3, 128, 128)
    eager = {name: predictor(image)["instances"] for name, image in images.items()}
    counts = {name: len(x) for name, x in eager.items()}
    assert all(counts[name] > 0 for name in images if name != empty), counts
    assert not empty or counts[empty] == 0, counts

    for export_format in ("torchscript", "onnx"):
        path = export_model(predictor.model, cfg, export_format, tmp_path / export_format)
        exported = ExportedModel(path, cfg)
        for name, image in images.items():
            result = exported(image)
            assert result.image_size == image.shape[:2]
            assert result.pred_classes.dtype == torch.int64
            assert_same_detections(eager[name], result, f"{export_format} {name}")


@pytest.mark.slow
@pytest.mark.parametrize("export_format", ["torchscript", "onnx"])
def test_export_tool_run_eval_gives_the_eager_ap(trained, tmp_path: Path, export_format) -> None:
    argv = ["--config-file", str(MUSU_CONFIG), "--format", export_format]
    argv += ["--output", str(tmp_path), "--run-eval", *TINY, "MODEL.WEIGHTS", trained["weights"]]
    results = export_tool.main(argv)
    name = {"torchscript": "model.ts", "onnx": "model.onnx"}[export_format]
    assert (tmp_path / name).is_file() and list(results) == [name]
    assert trained["ap"] > 0.0  # train_net.py's evaluation of the checkpoint (eager)
    assert abs(results[name][VAL_NAME]["bbox"]["AP"] - trained["ap"]) <= 0.1, (results, trained)


@pytest.mark.slow
def test_export_tool_quantize_int8_writes_and_evaluates_both_files(trained, tmp_path: Path) -> None:
    argv = ["--config-file", str(MUSU_CONFIG), "--output", str(tmp_path), "--run-eval"]
    argv += ["--quantize", "int8", "--calibration-dataset", TRAIN_NAME, "--calibration-images", "4"]
    argv += ["--float-layers", "head.bbox_pred", *TINY, "MODEL.WEIGHTS", trained["weights"]]
    results = export_tool.main(argv)
    assert list(results) == ["model.onnx", "model_int8.onnx"]
    assert abs(results["model.onnx"][VAL_NAME]["bbox"]["AP"] - trained["ap"]) <= 0.1
    stored = {p.key: p.value for p in onnx.load(str(tmp_path / "model_int8.onnx")).metadata_props}
    assert "4 images" in stored[QUANTIZATION_KEY]
    assert "float layers: head.bbox_pred, head.objectness" in stored[QUANTIZATION_KEY]
    int8_ap = results["model_int8.onnx"][VAL_NAME]["bbox"]["AP"]
    assert 0.0 <= int8_ap <= 100.0  # a 20-iteration model: its AP says nothing about int8 loss


def test_exported_model_rejects_a_config_it_was_not_exported_for(trained, tmp_path: Path) -> None:
    cfg = _cfg(MUSU_CONFIG, trained["weights"])
    torch.manual_seed(0)
    path = export_model(DefaultPredictor(cfg).model, cfg, "onnx", tmp_path)
    with pytest.raises(ValueError, match="INPUT.MIN_SIZE_TEST=128.*INPUT.MIN_SIZE_TEST=160"):
        ExportedModel(path, _with(cfg, "INPUT.MIN_SIZE_TEST", "160"))
    (tmp_path / "model.txt").write_text("not a model")
    with pytest.raises(ValueError, match="unknown suffix"):
        ExportedModel(tmp_path / "model.txt", cfg)
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\)"):
        ExportedModel(path, cfg)(np.zeros((32, 32), dtype=np.uint8))


@pytest.mark.slow
def test_latency_benchmark_times_all_three_runtimes(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "benchmarks" / "export_latency.py")]
        + ["--images", "1", "--iters", "1", "--warmup", "0", "--threads", "1"]
        + ["--calibration-dataset", "export_latency_calibration", "--calibration-images", "2"]
        + ["--register-coco", "export_latency_calibration", *_tiny_split(tmp_path)]
        + ["--json", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["threads"] == 1 and row["same_detection_counts"]
    assert row["eager_ms"] > 0 and row["torchscript_ms"] > 0 and row["onnxruntime_ms"] > 0
    assert row["onnxruntime_int8_ms"] > 0 and row["int8_detections_per_image"] > 0
    assert row["detections_per_image"] > 0  # random init, threshold 0.005: NMS has work to do
    assert "| threads | eager ms |" in completed.stdout and "Command: `" in completed.stdout
    assert "ORT int8 ms" in completed.stdout and "VNNI" in completed.stdout


def _tiny_split(root: Path) -> List[str]:
    """JSON file and image folder of a 2-image synthetic split (for --register-coco)."""
    paths = ensure_split("train", root=root / "calibration", num_images=2, seed=3, image_size=64)
    return [str(paths.json_file), str(paths.image_root)]


def test_demo_runs_the_exported_model_like_the_eager_one(trained, tmp_path: Path) -> None:
    """tools/demo.py --exported FILE writes the same COCO results as the eager model."""
    import demo  # tools/demo.py

    cfg = _cfg(MUSU_CONFIG, trained["weights"])
    path = export_model(DefaultPredictor(cfg).model, cfg, "onnx", tmp_path / "onnx")
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for name, image in _images().items():
        cv2.imwrite(str(image_dir / f"{name}.png"), image)
    base = ["--config-file", str(MUSU_CONFIG), "--input", str(image_dir)]
    base += ["--confidence-threshold", "0.0"]
    opts = ["--opts", *TINY, "MODEL.WEIGHTS", trained["weights"]]
    assert (
        demo.main(
            base + ["--output", str(tmp_path / "e"), "--json-out", str(tmp_path / "e.json")] + opts
        )
        == 0
    )
    exported = [
        "--exported",
        str(path),
        "--output",
        str(tmp_path / "x"),
        "--json-out",
        str(tmp_path / "x.json"),
    ]
    assert demo.main(base + exported + ["--opts", *TINY]) == 0
    eager = json.loads((tmp_path / "e.json").read_text())
    onnx = json.loads((tmp_path / "x.json").read_text())
    assert eager and len(onnx) == len(eager)
    key = lambda r: (r["image_id"], r["category_id"], round(r["score"], 4))  # noqa: E731
    for a, b in zip(sorted(eager, key=key), sorted(onnx, key=key)):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=SCORE_TOL)
        assert np.allclose(a["bbox"], b["bbox"], atol=BOX_TOL * 2)  # XYWH: w, h differ by two
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == sorted(
        p.name for p in (tmp_path / "e").iterdir()
    )
