"""tools/analysis/slot_consistency.py: AP and pre-NMS consistency with each anchor slot alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import slot_consistency  # tools/analysis/slot_consistency.py (conftest.py puts it on sys.path)
import torch

import musu
from musu.data import register_synthetic_split
from musu.model_zoo import load_model

CONFIG = Path(__file__).resolve().parents[1] / "configs/Synthetic/musu_R_18_FPN_synthetic.yaml"
SMALL = ["MODEL.MUSU.NUM_ANCHORS", "2", "MODEL.MUSU.NUM_CONVS", "1",
         "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96"]  # fmt: skip


def test_only_slots_silences_the_other_slots_and_restores_the_head() -> None:
    model = load_model(musu.build_config(str(CONFIG), SMALL), "")
    torch.manual_seed(0)
    features = [torch.randn(1, model.head.cls_score.in_channels, 8, 8) for i in range(5)]
    with torch.no_grad():
        before = model.head(features)
        with slot_consistency.only_slots(model, [1]):
            logits, box_reg, objectness = model.head(features)
        after = model.head(features)
    for level, obj in enumerate(objectness):  # (N, A, H, W)
        assert torch.isneginf(obj[:, 0]).all()
        torch.testing.assert_close(obj[:, 1], before[2][level][:, 1], rtol=0, atol=0)
        torch.testing.assert_close(logits[level], before[0][level], rtol=0, atol=0)
        torch.testing.assert_close(box_reg[level], before[1][level], rtol=0, atol=0)
    for output, reference in zip(after, before):
        for x, y in zip(output, reference):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="slots must be"):
        with slot_consistency.only_slots(model, [2]):
            pass


def test_each_slot_alone_keeps_part_of_the_candidates(tmp_path: Path) -> None:
    register_synthetic_split("slot_tool_tiny", tmp_path, "val", num_images=2, seed=3)
    # Score threshold 0: an untrained model's candidates all pass, so every pass has some.
    opts = SMALL + ["MODEL.MUSU.SCORE_THRESH_TEST", "0.0", "MODEL.MUSU.TOPK_CANDIDATES_TEST", "50"]
    output = tmp_path / "slots.md"
    argv = ["--config-file", str(CONFIG), "--weights", "", "--dataset", "slot_tool_tiny"]
    rows = slot_consistency.main(argv + ["--output", str(output), "--opts", *opts])
    assert list(rows) == ["all slots", "slot 0", "slot 1"]
    both, first, second = (rows[k]["mean_overlap"] for k in rows)
    assert first > 0 and second > 0
    # All slots' top-k per level lies within the union of each slot's own top-k.
    assert both <= first + second + 1e-9
    assert 0 <= rows["all slots"]["AP"] <= 100
    table = output.read_text()
    assert "| slots | AP |" in table and "| slot 1 |" in table
