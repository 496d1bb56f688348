"""The assigner registry and the builders of the detector's (training) assigner."""

from __future__ import annotations

import pytest
from detectron2.config import get_cfg

import musu
from musu.modeling.assigners import (
    ASSIGNER_REGISTRY,
    FCOSAssigner,
    MuSuAssigner,
    WarmupSwitch,
    build_assigner,
    build_training_assigner,
)


def _cfg(**musu_keys):
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    for key, value in musu_keys.items():
        cfg.MODEL.MUSU[key] = value
    return cfg


def test_built_in_assigners_are_registered() -> None:
    names = {name for name, _ in ASSIGNER_REGISTRY}
    assert {"build_musu_assigner", "build_fcos_assigner"} <= names


def test_musu_assigner_reads_its_keys() -> None:
    assigner = build_assigner(_cfg(THETA=2.0, TEMPERATURE=0.0, CRITERION="iou"))
    assert isinstance(assigner, MuSuAssigner)
    assert (assigner.theta, assigner.temperature, assigner.criterion) == (2.0, None, "iou")
    assert build_assigner(_cfg(TEMPERATURE=3.0)).temperature == 3.0


def test_training_assigner_switches_only_with_warmup_iterations() -> None:
    assert isinstance(build_training_assigner(_cfg()), MuSuAssigner)
    switch = build_training_assigner(_cfg(WARMUP_ASSIGNER_ITERS=7))
    assert isinstance(switch, WarmupSwitch) and switch.iters == 7
    assert isinstance(switch.warmup, FCOSAssigner) and isinstance(switch.main, MuSuAssigner)


def test_unknown_warmup_assigner_names_the_key() -> None:
    with pytest.raises(ValueError, match="MODEL.MUSU.WARMUP_ASSIGNER 'nope'"):
        build_training_assigner(_cfg(WARMUP_ASSIGNER_ITERS=1, WARMUP_ASSIGNER="nope"))
