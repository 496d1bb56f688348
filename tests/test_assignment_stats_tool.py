"""tools/analysis/assignment_stats.py: the training assigner's and the FCOS rule's statistics at
initialization on a few training images, printed as one table."""

from __future__ import annotations

from pathlib import Path

import assignment_stats  # tools/analysis/assignment_stats.py (conftest.py puts it on sys.path)
import pytest

from musu.data import register_synthetic_split

CONFIG = Path(__file__).resolve().parents[1] / "configs/Synthetic/musu_R_18_FPN_synthetic.yaml"


def test_statistics_at_initialization(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    register_synthetic_split("assignment_stats_tiny", tmp_path, "train", num_images=4, seed=2)
    opts = ["DATASETS.TRAIN", "('assignment_stats_tiny',)", "SOLVER.IMS_PER_BATCH", "2",
            "MODEL.MUSU.NUM_CONVS", "1", "INPUT.MIN_SIZE_TRAIN", "(128,)",
            "INPUT.MAX_SIZE_TRAIN", "128"]  # fmt: skip
    stats = assignment_stats.main(["--config-file", str(CONFIG), "--images", "4", "--opts", *opts])
    assert set(stats) == {"musu", "musu_shadow"}
    musu, fcos = stats["musu"], stats["musu_shadow"]
    for values in (musu, fcos):
        assert values["objects"] > 0 and values["members_mean"] >= 1
        shares = sum(v for k, v in values.items() if k.startswith("level_share_s"))
        assert shares == pytest.approx(1.0)
    # The FCOS rule weighs every positive 1; MuSu's soft weights sum to less than its bag.
    assert fcos["cls_weight_per_object"] == pytest.approx(fcos["members_mean"])
    assert 1 <= musu["reg_weight_per_object"] <= musu["cls_weight_per_object"]
    assert musu["cls_weight_per_object"] <= musu["members_mean"] + 1e-6
    out = capsys.readouterr().out
    assert "| statistic | musu | musu_shadow |" in out and "| tau_cls |" in out
