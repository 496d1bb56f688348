"""The small-data config files: what each pair differs in, and that the recommended files are
the runs the results page reports.

* Each MuSu config and its FCOS twin differ only in the detector and the keys that describe it.
* The cards files are the BCCD files with the cards data and class count.
* ``build_config`` of each recommended file equals ``build_config`` of the paper-settings file
  plus the overrides written in the study's commands (docs/study/small_data.md, rules 8-10;
  docs/study/paper_settings.md for the synthetic FCOS runs), except ``SHADOW_ASSIGNER`` and
  ``OUTPUT_DIR``.
* Every config file opens with a one-line comment saying what it is.
* ``SHADOW_ASSIGNER`` (logging only) and ``SCORE_THRESH_TEST`` (inference only) leave a training
  step unchanged: same losses, same gradients, same random state afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

import pytest
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import musu

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The keys in which a MuSu config and its FCOS twin may differ.
DETECTOR_KEYS = {"MODEL.META_ARCHITECTURE", "OUTPUT_DIR"}
SLOT_KEYS = {"MODEL.MUSU.NUM_ANCHORS", "MODEL.MUSU.ANCHOR_SIZES", "MODEL.MUSU.SCORE_THRESH_TEST"}

# (MuSu file, FCOS file, keys that differ between them).
PAIRS = [
    ("Synthetic/musu_R_18_FPN_1200it.yaml", "Synthetic/fcos_R_18_FPN_1200it.yaml",
     DETECTOR_KEYS | SLOT_KEYS),
    ("BCCD/musu_R_18_FPN_1800it.yaml", "BCCD/fcos_R_18_FPN_1800it.yaml",
     DETECTOR_KEYS | SLOT_KEYS),
    ("Cards/musu_R_18_FPN_1800it.yaml", "Cards/fcos_R_18_FPN_1800it.yaml",
     DETECTOR_KEYS | SLOT_KEYS),
    ("BCCD/musu_paper_R_18_FPN_300it.yaml", "BCCD/fcos_R_18_FPN_300it.yaml", DETECTOR_KEYS),
    ("Cards/musu_paper_R_18_FPN_300it.yaml", "Cards/fcos_R_18_FPN_300it.yaml", DETECTOR_KEYS),
]  # fmt: skip

# The study's training commands, as written there (rule 8: "--opts DATALOADER.NUM_WORKERS 1
# SEED 0 SOLVER.MAX_ITER 1800 SOLVER.STEPS "(1260,1620)" MODEL.MUSU.NUM_ANCHORS 2
# MODEL.MUSU.ANCHOR_SIZES "[4.0, 8.0]""; rule 9: evaluated with SCORE_THRESH_TEST 0.0025).
SCHEDULE_1800 = ["DATALOADER.NUM_WORKERS", "1", "SEED", "0",
                 "SOLVER.MAX_ITER", "1800", "SOLVER.STEPS", "(1260,1620)"]  # fmt: skip
TWO_SLOTS = ["MODEL.MUSU.NUM_ANCHORS", "2", "MODEL.MUSU.ANCHOR_SIZES", "[4.0, 8.0]",
             "MODEL.MUSU.SCORE_THRESH_TEST", "0.0025"]  # fmt: skip

# (recommended file, paper-settings file, the study's overrides, keys allowed to differ).
EQUIVALENT = [
    ("BCCD/musu_R_18_FPN_1800it.yaml", "BCCD/musu_paper_R_18_FPN_300it.yaml",
     SCHEDULE_1800 + TWO_SLOTS, {"MODEL.MUSU.SHADOW_ASSIGNER", "OUTPUT_DIR"}),
    ("BCCD/fcos_R_18_FPN_1800it.yaml", "BCCD/fcos_R_18_FPN_300it.yaml",
     SCHEDULE_1800, {"MODEL.MUSU.SHADOW_ASSIGNER", "OUTPUT_DIR"}),
    ("Cards/musu_R_18_FPN_1800it.yaml", "Cards/musu_paper_R_18_FPN_300it.yaml",
     SCHEDULE_1800 + TWO_SLOTS, {"MODEL.MUSU.SHADOW_ASSIGNER", "OUTPUT_DIR"}),
    ("Cards/fcos_R_18_FPN_1800it.yaml", "Cards/fcos_R_18_FPN_300it.yaml",
     SCHEDULE_1800, {"MODEL.MUSU.SHADOW_ASSIGNER", "OUTPUT_DIR"}),
    # The study's synthetic two-slot runs ("The two-slot configuration on the synthetic data").
    ("Synthetic/musu_R_18_FPN_1200it.yaml", "Synthetic/musu_paper_R_18_FPN_1200it.yaml",
     ["DATALOADER.NUM_WORKERS", "1", "SEED", "0"] + TWO_SLOTS, {"OUTPUT_DIR"}),
    # Its FCOS runs: the paper-settings file with the FCOS detector and 1 data worker.
    ("Synthetic/fcos_R_18_FPN_1200it.yaml", "Synthetic/musu_paper_R_18_FPN_1200it.yaml",
     ["MODEL.META_ARCHITECTURE", "D2FCOS", "DATALOADER.NUM_WORKERS", "1", "SEED", "0"],
     {"OUTPUT_DIR"}),
]  # fmt: skip


def flat(cfg: Any, prefix: str = "") -> Dict[str, Any]:
    """{"A.B.C": value} for every leaf of a config; lists and tuples compare as tuples."""
    if isinstance(cfg, dict):
        out: Dict[str, Any] = {}
        for key, value in cfg.items():
            out.update(flat(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: tuple(cfg) if isinstance(cfg, (list, tuple)) else cfg}


def built(name: str, opts: Sequence[str] = ()) -> Dict[str, Any]:
    return flat(musu.build_config(CONFIGS / name, list(opts)))


def differing(a: Dict[str, Any], b: Dict[str, Any]) -> set:
    assert a.keys() == b.keys()
    return {key for key in a if a[key] != b[key]}


@pytest.mark.parametrize("musu_file,fcos_file,keys", PAIRS, ids=[p[0] for p in PAIRS])
def test_musu_and_fcos_twins_differ_only_in_the_detector(
    musu_file: str, fcos_file: str, keys: set
) -> None:
    musu_cfg, fcos_cfg = built(musu_file), built(fcos_file)
    assert differing(musu_cfg, fcos_cfg) == keys
    assert (musu_cfg["MODEL.META_ARCHITECTURE"], fcos_cfg["MODEL.META_ARCHITECTURE"]) == (
        "MuSu",
        "D2FCOS",
    )
    # FCOS: one point per location, Detectron2's own sqrt(cls x ctr) >= 0.05.
    assert fcos_cfg["MODEL.MUSU.NUM_ANCHORS"] == 1
    assert fcos_cfg["MODEL.MUSU.ANCHOR_SIZES"] == ()
    assert fcos_cfg["MODEL.MUSU.SCORE_THRESH_TEST"] == 0.05
    if "MODEL.MUSU.NUM_ANCHORS" in keys:  # the recommended two-slot MuSu
        assert musu_cfg["MODEL.MUSU.NUM_ANCHORS"] == 2
        assert musu_cfg["MODEL.MUSU.ANCHOR_SIZES"] == (4.0, 8.0)
        assert musu_cfg["MODEL.MUSU.SCORE_THRESH_TEST"] == 0.0025  # = 0.05 ** 2


@pytest.mark.parametrize(
    "method", ["musu_R_18_FPN_1800it", "fcos_R_18_FPN_1800it", "musu_paper_R_18_FPN_300it",
               "fcos_R_18_FPN_300it"]  # fmt: skip
)
def test_cards_files_are_the_bccd_files_with_the_cards_data(method: str) -> None:
    cards, bccd = built(f"Cards/{method}.yaml"), built(f"BCCD/{method}.yaml")
    assert differing(cards, bccd) == {
        "DATASETS.TRAIN", "DATASETS.TEST", "MODEL.MUSU.NUM_CLASSES", "OUTPUT_DIR"
    }  # fmt: skip
    assert (cards["DATASETS.TRAIN"], cards["DATASETS.TEST"]) == (("cards_train",), ("cards_val",))
    assert (cards["MODEL.MUSU.NUM_CLASSES"], bccd["MODEL.MUSU.NUM_CLASSES"]) == (6, 3)


@pytest.mark.parametrize("new,old,opts,allowed", EQUIVALENT, ids=[e[0] for e in EQUIVALENT])
def test_recommended_files_are_the_study_commands(
    new: str, old: str, opts: List[str], allowed: set
) -> None:
    new_cfg, old_cfg = built(new), built(old, opts)
    assert differing(new_cfg, old_cfg) <= allowed
    # What the recommended files leave out: the logging-only shadow assigner.
    assert new_cfg["MODEL.MUSU.SHADOW_ASSIGNER"] == ""


def _batch(generator: torch.Generator, size: int = 96) -> List[Dict[str, Any]]:
    """Two images with 3 and 5 boxes of 3 classes, 8 to 48 px."""
    batch = []
    for num in (3, 5):
        wh = 8 + torch.rand(num, 2, generator=generator) * 40
        xy = torch.rand(num, 2, generator=generator) * (size - wh)
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.gt_classes = torch.randint(0, 3, (num,), generator=generator)
        image = torch.rand(3, size, size, generator=generator) * 255
        batch.append({"image": image, "instances": instances, "height": size, "width": size})
    return batch


def _training_step(opts: Sequence[str]) -> Dict[str, Any]:
    """Build the recommended BCCD model (narrow, small input) with ``opts``, run one training
    forward and backward from seed 0; return losses, gradients and the random state after."""
    cfg: CfgNode = musu.build_config(
        CONFIGS / "BCCD/musu_R_18_FPN_1800it.yaml",
        ["MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.MUSU.NUM_CONVS", "1",
         "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96", *opts],
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(_batch(torch.Generator().manual_seed(1)))
        sum(losses.values()).backward()
    return {
        "losses": {k: v.detach() for k, v in losses.items()},
        "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        "rng": torch.get_rng_state(),
        "shadow": model.shadow_assigner is not None,
    }


def test_shadow_assigner_and_score_threshold_do_not_change_training() -> None:
    """The study trained with the shadow assigner and the default threshold 0.05 and evaluated
    at 0.0025; the recommended file trains without the shadow assigner, at 0.0025. One step of
    each, from the same seed, gives the same losses, gradients and random state."""
    study = _training_step(
        [
            "MODEL.MUSU.SHADOW_ASSIGNER",
            "build_fcos_assigner",
            "MODEL.MUSU.SCORE_THRESH_TEST",
            "0.05",
        ]
    )
    shipped = _training_step([])
    assert study["shadow"] and not shipped["shadow"]
    assert study["losses"].keys() == shipped["losses"].keys()
    for key, value in study["losses"].items():
        assert torch.isfinite(value) and float(value) > 0, key
        assert torch.equal(value, shipped["losses"][key]), key
    assert len(study["grads"]) > 0 and study["grads"].keys() == shipped["grads"].keys()
    for name, grad in study["grads"].items():
        assert torch.equal(grad, shipped["grads"][name]), name
    assert torch.equal(study["rng"], shipped["rng"])


@pytest.mark.parametrize(
    "path",
    sorted(CONFIGS.rglob("*.yaml")),
    ids=[p.relative_to(CONFIGS).as_posix() for p in sorted(CONFIGS.rglob("*.yaml"))],
)
def test_every_config_file_opens_with_a_one_line_comment(path: Path) -> None:
    """The first line says what the file is: a ``# `` comment within 100 columns."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 10 and len(first) <= 100, (path, first)
