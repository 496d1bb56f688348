"""Tests of the MuSu config: defaults (paper Sec. 4.1), validation, and every shipped YAML.

Each ``configs/**/*.yaml`` is merged and its model built on CPU with a shrunken backbone; the
MuSu keys the file (or its ``_BASE_`` chain, read here with plain YAML) sets are kept, and the
built model must reflect them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from torch import nn
from torchvision.ops import DeformConv2d

import musu
from musu import add_musu_config, validate_musu_config
from musu.modeling import MuSu
from musu.modeling.assigners import WarmupSwitch

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.rglob("*.yaml"))
CONFIG_SOURCE = REPO / "musu" / "config.py"
SYNTHETIC_CONFIG = CONFIG_DIR / "Synthetic" / "musu_paper_R_18_FPN_1200it.yaml"
COCO_R50_1X = CONFIG_DIR / "COCO-Detection" / "musu_R_50_FPN_1x.yaml"
TINY_SIZE = 64


def musu_cfg() -> CfgNode:
    """Detectron2's defaults plus ``MODEL.MUSU``."""
    cfg = get_cfg()
    add_musu_config(cfg)
    return cfg


def load_cfg(path: Path) -> CfgNode:
    """The config of ``path`` merged over the MuSu defaults, on CPU."""
    cfg = musu_cfg()
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def yaml_chain(path: Path) -> Dict[str, Any]:
    """The YAML of ``path`` merged over its ``_BASE_`` chain, as plain dicts (no Detectron2)."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    base = data.pop("_BASE_", None)
    if base is None:
        return data
    merged = yaml_chain((path.parent / base).resolve())

    def merge(into: Dict[str, Any], update: Dict[str, Any]) -> None:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(merged, data)
    return merged


def file_musu_keys(path: Path) -> Dict[str, Any]:
    """``MODEL.MUSU`` keys set by ``path`` or its bases."""
    return dict(yaml_chain(path).get("MODEL", {}).get("MUSU", {}) or {})


def shrink(cfg: CfgNode, keep_musu: Dict[str, Any]) -> None:
    """Tiny sizes for speed: no weights, small ResNet/FPN, one head conv (unless the file sets
    NUM_CONVS), 64 px inputs. Deformable backbones keep their depth (Detectron2's R-18/34 have no
    DCN) with narrow stages."""
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    if any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE):
        cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
        cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    else:
        cfg.MODEL.RESNETS.DEPTH = 18
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    # 64, not 32: with GN(32 groups) a 1 x 1 P6/P7 map needs >= 2 channels per group.
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    if "NUM_CONVS" not in keep_musu:
        cfg.MODEL.MUSU.NUM_CONVS = 1
    cfg.INPUT.MIN_SIZE_TEST = TINY_SIZE
    cfg.INPUT.MAX_SIZE_TEST = TINY_SIZE


def tiny_cfg() -> CfgNode:
    """The synthetic config, shrunk: a cheap valid starting point for validation tests."""
    cfg = load_cfg(SYNTHETIC_CONFIG)
    shrink(cfg, file_musu_keys(SYNTHETIC_CONFIG))
    return cfg


def values_equal(actual: Any, expected: Any) -> bool:
    """Config value equality: numbers approximately, sequences element-wise (list == tuple)."""
    if isinstance(expected, (list, tuple)):
        return (
            isinstance(actual, (list, tuple))
            and len(actual) == len(expected)
            and all(values_equal(a, e) for a, e in zip(actual, expected))
        )
    if isinstance(expected, bool) or isinstance(actual, bool):
        return actual == expected
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        return math.isclose(actual, expected, rel_tol=1e-12, abs_tol=1e-12)
    return actual == expected


def flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    """{"A.B.C": value} for every leaf of a config."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: Dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


# --------------------------------------------------------------------------------------------
# Every shipped config builds, and its model reflects the file's MuSu values.
# --------------------------------------------------------------------------------------------


def test_config_files_found() -> None:
    """The glob sees the shipped configs (so the parametrized test below is not vacuous)."""
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_FILES}
    for expected in (
        "Base-MuSu.yaml",
        "COCO-Detection/musu_R_50_FPN_1x.yaml",
        "COCO-Detection/musu_R_101_DCN_FPN_2x_ms_A3.yaml",
        "COCO-Detection/ablations/table1_alpha_0.yaml",
        "Synthetic/musu_paper_R_18_FPN_1200it.yaml",
    ):
        assert expected in names


def _check_musu_model(model: MuSu, cfg: CfgNode, file_keys: Dict[str, Any]) -> None:
    """The built model carries the config's values (and so the file's)."""
    m = cfg.MODEL.MUSU
    for key, value in file_keys.items():
        assert values_equal(m[key], value), (key, m[key], value)
    assigner = model.assigner
    if isinstance(assigner, WarmupSwitch):  # WARMUP_ASSIGNER_ITERS > 0: the main one is MuSu's
        assigner = assigner.main
    assert assigner.alpha == pytest.approx(m.ALPHA)
    assert assigner.theta == pytest.approx(m.THETA)
    assert assigner.bag_threshold == pytest.approx(m.BAG_THRESHOLD)
    assert assigner.tau_ratio == pytest.approx(m.TAU_RATIO)
    assert assigner.criterion == m.CRITERION
    assert assigner.soft is bool(m.SOFT_WEIGHTS)
    if m.TEMPERATURE > 0:
        assert assigner.temperature == pytest.approx(m.TEMPERATURE)
    else:
        assert assigner.temperature is None  # adaptive sqrt(|C_j|)

    head = model.head
    assert head.num_anchors == model.num_anchors == m.NUM_ANCHORS
    assert head.num_classes == model.num_classes == m.NUM_CLASSES
    assert head.num_levels == len(m.IN_FEATURES)
    assert list(model.head_in_features) == list(m.IN_FEATURES)
    assert head.cls_score.out_channels == m.NUM_ANCHORS * m.NUM_CLASSES
    assert head.bbox_pred.out_channels == m.NUM_ANCHORS * 4
    assert head.objectness.out_channels == m.NUM_ANCHORS
    for tower in (head.cls_subnet, head.bbox_subnet):
        num_deform = sum(isinstance(x, DeformConv2d) for x in tower.modules())
        num_plain = sum(isinstance(x, nn.Conv2d) for x in tower.modules())
        assert num_deform == (1 if m.DEFORMABLE_LAST_CONV and m.NUM_CONVS > 0 else 0)
        # The deformable conv's offset/mask predictor is a plain conv.
        assert num_plain == m.NUM_CONVS
    prior_bias = -math.log((1 - m.PRIOR_PROB) / m.PRIOR_PROB)
    torch.testing.assert_close(
        head.cls_score.bias.detach(), torch.full_like(head.cls_score.bias, prior_bias)
    )
    assert model.beta == pytest.approx(m.BETA)
    assert model.focal_loss_alpha == pytest.approx(m.FOCAL_LOSS_ALPHA)
    assert model.focal_loss_gamma == pytest.approx(m.FOCAL_LOSS_GAMMA)
    assert model.reg_loss_weight == pytest.approx(m.REG_LOSS_WEIGHT)
    assert model.test_score_thresh == pytest.approx(m.SCORE_THRESH_TEST)
    assert model.test_topk_candidates == m.TOPK_CANDIDATES_TEST
    assert model.test_nms_thresh == pytest.approx(m.NMS_THRESH_TEST)
    assert model.max_detections_per_image == cfg.TEST.DETECTIONS_PER_IMAGE


@pytest.mark.parametrize(
    "path", CONFIG_FILES, ids=[p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_FILES]
)
def test_every_config_builds(path: Path) -> None:
    """Merge, shrink, build on CPU; MuSu models reflect the file and run a 64 px inference."""
    cfg = load_cfg(path)
    file_keys = file_musu_keys(path)
    shrink(cfg, file_keys)
    torch.manual_seed(0)
    model = build_model(cfg)
    if cfg.MODEL.META_ARCHITECTURE != "MuSu":
        return  # other projects' configs only have to build
    assert isinstance(model, MuSu)
    _check_musu_model(model, cfg, file_keys)

    model.eval()
    if any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE):
        # Detectron2's modulated deformable backbone convs have no CPU kernel: run the head only.
        channels = cfg.MODEL.FPN.OUT_CHANNELS
        sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]  # P3-P7 of a 64 px image
        features = [torch.randn(1, channels, h, w) for h, w in sizes]
        with torch.no_grad():
            outputs = model.head(features[: model.head.num_levels])
        assert all(bool(torch.isfinite(x).all()) for level in outputs for x in level)
        return
    image = torch.rand(3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        result = model([{"image": image}])[0]["instances"]
    assert result.image_size == (TINY_SIZE, TINY_SIZE)
    assert len(result) <= cfg.TEST.DETECTIONS_PER_IMAGE


def test_num_anchor_configs_cover_table_5() -> None:
    """Table 5: the A = 1..5 configs (alpha = 1/3) set exactly NUM_ANCHORS 1..5."""
    for num_anchors in range(1, 6):
        suffix = "" if num_anchors == 1 else f"_A{num_anchors}"
        path = CONFIG_DIR / "COCO-Detection" / f"musu_R_50_FPN_1x{suffix}.yaml"
        cfg = load_cfg(path)
        assert cfg.MODEL.MUSU.NUM_ANCHORS == num_anchors
        assert cfg.MODEL.MUSU.ALPHA == pytest.approx(1 / 3)


# --------------------------------------------------------------------------------------------
# Defaults.
# --------------------------------------------------------------------------------------------


def test_paper_defaults() -> None:
    """A fresh ``add_musu_config`` holds the paper's Sec. 4.1 settings."""
    m = musu_cfg().MODEL.MUSU
    expected = {
        "THETA": 4.0,
        "BAG_THRESHOLD": 0.1,
        "ALPHA": 1 / 3,
        "CRITERION": "mutual",
        "CLS_LOSS_NORMALIZER": "weights",  # Eq. 5
        "TEMPERATURE": 0.0,
        "TAU_RATIO": 2.0,
        "SOFT_WEIGHTS": True,
        "BETA": 4.0,
        "FOCAL_LOSS_ALPHA": 0.25,
        "FOCAL_LOSS_GAMMA": 2.0,
        "SCORE_THRESH_TEST": 0.05,
        "TOPK_CANDIDATES_TEST": 1000,
        "NMS_THRESH_TEST": 0.6,
        "NUM_ANCHORS": 1,
        "NUM_CLASSES": 80,
        "NUM_CONVS": 4,
        "NORM": "GN",
        "PRIOR_PROB": 0.01,
        "REG_LOSS_WEIGHT": 1.0,
        "DEFORMABLE_LAST_CONV": False,
        "IN_FEATURES": ["p3", "p4", "p5", "p6", "p7"],
    }
    for key, value in expected.items():
        assert values_equal(m[key], value), (key, m[key], value)
    validate_musu_config(musu_cfg())


def test_coco_r50_1x_schedule() -> None:
    """The R-50 1x config: lr 0.01, 16 images, 90k iterations, steps 60k/80k, warm-up 500,
    shorter side 800 and longer side at most 1333 (train and test)."""
    cfg = load_cfg(COCO_R50_1X)
    assert cfg.MODEL.META_ARCHITECTURE == "MuSu"
    assert cfg.MODEL.RESNETS.DEPTH == 50
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.01)
    assert cfg.SOLVER.IMS_PER_BATCH == 16
    assert cfg.SOLVER.MAX_ITER == 90000
    assert tuple(cfg.SOLVER.STEPS) == (60000, 80000)
    assert cfg.SOLVER.WARMUP_ITERS == 500
    assert cfg.SOLVER.MOMENTUM == pytest.approx(0.9)
    assert cfg.SOLVER.WEIGHT_DECAY == pytest.approx(1e-4)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (800,)
    assert cfg.INPUT.MAX_SIZE_TRAIN == 1333
    assert cfg.INPUT.MIN_SIZE_TEST == 800
    assert cfg.INPUT.MAX_SIZE_TEST == 1333
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 100
    assert cfg.MODEL.MUSU.NUM_ANCHORS == 1
    fresh = musu_cfg().MODEL.MUSU
    assert flatten(cfg.MODEL.MUSU) == flatten(fresh)  # the 1x row is the defaults


# Keys add_musu_config adds outside MODEL.MUSU (musu.engine.amp), with their defaults.
PRECISION_KEYS = {
    "SOLVER.AMP.PRECISION": "float16",
    "SOLVER.AMP.CPU_BFLOAT16": "native",
    "TEST.AMP.ENABLED": False,
    "MODEL.CHANNELS_LAST": False,
}


def test_add_musu_config_adds_only_musu() -> None:
    """Every Detectron2 key keeps its default; the only new keys are ``MODEL.MUSU`` and the
    precision / memory-format keys, whose defaults change nothing (float32, contiguous)."""
    before = flatten(get_cfg())
    after = flatten(musu_cfg())
    assert not any(k.startswith("MODEL.MUSU") for k in before)
    assert not set(PRECISION_KEYS) & set(before)
    outside = {k: v for k, v in after.items() if not k.startswith("MODEL.MUSU.")}
    assert outside == {**before, **PRECISION_KEYS}
    assert any(k.startswith("MODEL.MUSU.") for k in after)


def test_every_musu_key_has_a_comment_line_above() -> None:
    """In musu/config.py, the line right above each ``MODEL.MUSU.<KEY> =`` is a comment."""
    lines = CONFIG_SOURCE.read_text().splitlines()
    pattern = re.compile(r"^\s*\w+\.MODEL\.MUSU\.([A-Z0-9_]+)\s*=")
    assigned: Dict[str, int] = {}
    for index, line in enumerate(lines):
        match = pattern.match(line)
        if match:
            assigned[match.group(1)] = index
    keys = set(musu_cfg().MODEL.MUSU.keys())
    assert set(assigned) == keys
    uncommented = [
        key for key, index in assigned.items() if not lines[index - 1].strip().startswith("#")
    ]
    assert not uncommented, f"MODEL.MUSU keys without a comment line right above: {uncommented}"


# --------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------

INVALID: List[Tuple[str, Any]] = [
    ("ALPHA", -0.1),
    ("ALPHA", 1.5),
    ("BAG_THRESHOLD", 0.0),
    ("BAG_THRESHOLD", 1.0),
    ("NUM_ANCHORS", 0),
    ("CRITERION", "foo"),
    ("CLS_LOSS_NORMALIZER", "positives"),
    ("THETA", 0.0),
    ("TAU_RATIO", 0.0),
    ("TEMPERATURE", -1.0),
    ("NUM_CLASSES", 0),
    ("ANCHOR_SIZES", [4.0, 8.0]),  # two sizes for NUM_ANCHORS 1
    ("ANCHOR_SIZES", [0.0]),
    ("ANCHOR_SIZES", ["4"]),
]


@pytest.mark.parametrize("key,value", INVALID, ids=[f"{k}={v}" for k, v in INVALID])
def test_invalid_value_rejected(key: str, value: Any) -> None:
    """``validate_musu_config`` and ``build_model`` raise ValueError naming the key."""
    cfg = tiny_cfg()
    cfg.merge_from_list([f"MODEL.MUSU.{key}", value])  # merges fine: the type is right
    with pytest.raises(ValueError, match=re.escape(key)):
        validate_musu_config(cfg)
    with pytest.raises(ValueError, match=re.escape(key)):
        build_model(cfg)


def test_in_features_missing_from_backbone_rejected() -> None:
    """IN_FEATURES naming a feature the backbone lacks fails at build time, naming the key."""
    cfg = tiny_cfg()
    cfg.MODEL.MUSU.IN_FEATURES = ["p3", "p4", "p5", "p6", "p8"]
    with pytest.raises(ValueError, match="IN_FEATURES") as error:
        build_model(cfg)
    assert "p8" in str(error.value)


def test_valid_edge_values_accepted() -> None:
    """The closed ends of ALPHA ([0, 1]) are valid (Table 1 uses alpha 0 and 1)."""
    for alpha in (0.0, 1.0):
        cfg = tiny_cfg()
        cfg.MODEL.MUSU.ALPHA = alpha
        validate_musu_config(cfg)


def test_unknown_key_fails_at_merge_from_list() -> None:
    """An unknown ``MODEL.MUSU`` key is rejected when merged, naming it (yacs raises an
    AssertionError from ``merge_from_list``, a KeyError from ``merge_from_file``)."""
    cfg = musu_cfg()
    with pytest.raises((KeyError, AssertionError), match=re.escape("MODEL.MUSU.FOO")):
        cfg.merge_from_list(["MODEL.MUSU.FOO", 1])


def test_unknown_key_fails_at_merge_from_file(tmp_path: Path) -> None:
    """Same for a YAML file."""
    path = tmp_path / "bad.yaml"
    path.write_text(f'_BASE_: "{SYNTHETIC_CONFIG}"\nMODEL:\n  MUSU:\n    FOO: 1\n')
    cfg = musu_cfg()
    with pytest.raises(KeyError, match=re.escape("MODEL.MUSU.FOO")):
        cfg.merge_from_file(str(path))


def test_musu_importable_registers_meta_arch() -> None:
    """``import musu`` registers the META_ARCH and backbone used by the configs."""
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    assert META_ARCH_REGISTRY.get("MuSu") is MuSu
    assert BACKBONE_REGISTRY.get("build_musu_resnet_fpn_backbone") is not None
    assert musu.add_musu_config is add_musu_config


# --------------------------------------------------------------------------------------------
# The one config builder and the validator helpers.
# --------------------------------------------------------------------------------------------


def test_build_config_merges_file_and_opts_validates_and_freezes() -> None:
    cfg = musu.build_config(SYNTHETIC_CONFIG, ["MODEL.MUSU.ALPHA", "0.5"])
    assert cfg.is_frozen() and cfg.MODEL.MUSU.ALPHA == 0.5
    assert cfg.MODEL.MUSU.NUM_CLASSES == file_musu_keys(SYNTHETIC_CONFIG)["NUM_CLASSES"]
    assert not musu.build_config(SYNTHETIC_CONFIG, freeze=False).is_frozen()
    assert musu.build_config(None).MODEL.MUSU.NUM_CLASSES == 80  # defaults only


def test_build_config_adds_installed_projects_keys() -> None:
    """Every installed project's nodes (e.g. MODEL.MG of musu_mg) are in the built config."""
    with_projects = musu_cfg()
    names = musu.add_project_configs(with_projects)
    added = set(with_projects.MODEL.keys()) - set(musu_cfg().MODEL.keys())
    assert ("musu_mg" in names) == ("MG" in added)
    assert added <= set(musu.build_config(SYNTHETIC_CONFIG).MODEL.keys())


def test_build_config_errors_name_the_key_and_the_source(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{SYNTHETIC_CONFIG}"\nMODEL:\n  MUSU:\n    FOO: 1\n')
    with pytest.raises(KeyError, match=re.escape(f"config file {bad}")) as error:
        musu.build_config(bad)
    assert "MODEL.MUSU.FOO" in str(error.value)
    with pytest.raises(KeyError, match="command-line options.*SOLVER.BASE_LRR"):
        musu.build_config(SYNTHETIC_CONFIG, ["SOLVER.BASE_LRR", "0.1"])
    with pytest.raises(KeyError, match="command-line options"):
        musu.build_config(SYNTHETIC_CONFIG, ["MODEL.MUSU.ALPHA"])  # odd-length list
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        musu.build_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="MODEL.MUSU.ALPHA"):
        musu.build_config(SYNTHETIC_CONFIG, ["MODEL.MUSU.ALPHA", "1.5"])


def test_build_config_falls_back_to_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert musu.build_config(SYNTHETIC_CONFIG, ["MODEL.DEVICE", "cuda:0"]).MODEL.DEVICE == "cpu"


def test_check_number_messages_name_the_key_and_the_interval() -> None:
    node = CfgNode({"A": 0.0, "B": 2, "C": True, "D": float("nan"), "E": "x"})
    cases = [
        (dict(key="A", low=0.0, high=1.0, low_open=True), r"X\.A must be a finite number in "
         r"\(0\.0, 1\.0\], got 0\.0"),
        (dict(key="B", low=3, integer=True), r"X\.B must be an integer >= 3, got 2"),
        (dict(key="C", low=0), r"X\.C must be a finite number >= 0, got True"),
        (dict(key="D"), r"X\.D must be a finite number, got nan"),
        (dict(key="A", high=-1, hint="below B"), r"X\.A must be a finite number <= -1 \(below B\)"),
    ]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            musu.config.check_number(node, "X", **kwargs)
    musu.config.check_number(node, "X", "A", low=0.0, high=1.0)  # closed ends accept 0
    musu.config.check_number(node, "X", "B", low=2, high=2, integer=True)
    with pytest.raises(ValueError, match=r"X\.E must be one of \('y', 'z'\), got 'x'"):
        musu.config.check_choice(node, "X", "E", ["y", "z"])
    with pytest.raises(ValueError, match=r"X\.B must be True or False, got 2"):
        musu.config.check_bool(node, "X", "B")
    musu.config.check_bool(node, "X", "C")
