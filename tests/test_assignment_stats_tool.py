"""tools/analysis/assignment_stats.py: the training assigner's and the FCOS rule's statistics at
initialization on a few training images, printed as two tables (whole batch, per size band)."""

from __future__ import annotations

from pathlib import Path

import assignment_stats  # tools/analysis/assignment_stats.py (conftest.py puts it on sys.path)
import pytest

from musu.data import register_synthetic_split
from musu.size_bands import SIZE_BANDS

CONFIG = Path(__file__).resolve().parents[1] / "configs/Synthetic/musu_paper_R_18_FPN_1200it.yaml"


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
    # Per size band: the FCOS rule's weights are its positives; shares sum to 1 per band; the
    # rank-0 regression sample exists for MuSu only.
    bands = [b for b, _, _ in SIZE_BANDS if f"objects_{b}" in musu and f"objects_{b}" in fcos]
    assert bands
    for band in bands:
        assert fcos[f"cls_weight_per_object_{band}"] == pytest.approx(fcos[f"members_mean_{band}"])
        for values in (musu, fcos):
            shares = [v for k, v in values.items() if k.startswith("members_share_s")
                      and k.endswith(f"_{band}")]  # fmt: skip
            assert sum(shares) == pytest.approx(1.0)
            assert 0 <= values[f"member_iou_{band}"] <= 1
        assert 0 <= musu[f"reg_top_centre_{band}"] <= 1 and musu[f"reg_top_offset_{band}"] >= 0
        assert f"reg_top_iou_{band}" not in fcos
    out = capsys.readouterr().out
    assert "| statistic | musu | musu_shadow |" in out and "| tau_cls |" in out
    whole_batch = out.split("per size band")[0]
    assert "| members_mean |" in whole_batch and "_small |" not in whole_batch
    header = "| statistic | " + " | ".join(f"{b} {p}" for b, _, _ in SIZE_BANDS for p in stats)
    assert header + " |" in out
    band_rows = [line for line in out.splitlines() if line.startswith("| reg_top_centre |")]
    assert len(band_rows) == 1 and band_rows[0].count("|") == 2 + 2 * len(SIZE_BANDS)
