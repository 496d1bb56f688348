"""tools/analysis/visualize.py assignment-stats: a PNG from the musu/* and musu_shadow/* scalars
of two runs' metrics.json, and a clear error for a run that logged none."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
import visualize  # tools/analysis/visualize.py (conftest.py puts it on sys.path)


def _write_run(run_dir: Path, with_stats: bool) -> None:
    run_dir.mkdir()
    lines = []
    for iteration in (19, 39, 59):
        entry = {"iteration": iteration, "total_loss": 1.0 / (iteration + 1)}
        if with_stats:
            for prefix, members in (("musu", 3.0 + iteration / 20), ("musu_shadow", 9.0)):
                entry.update({
                    f"{prefix}/members_mean": members, f"{prefix}/members_p10": members - 1,
                    f"{prefix}/members_p90": members + 2,
                    f"{prefix}/cls_weight_per_object": members / 2,
                    f"{prefix}/reg_weight_per_object": members / 3,
                    f"{prefix}/level_share_s8": 0.25, f"{prefix}/level_share_s32": 0.75,
                })  # fmt: skip
            entry.update({"musu/tau_cls": 1.7, "musu/cls_top_is_best_iou": 0.4,
                          "musu/reg_top_is_best_iou": 0.2})  # fmt: skip
        lines.append(json.dumps(entry))
    (run_dir / "metrics.json").write_text("\n".join(lines) + "\n")


def test_two_runs_side_by_side(tmp_path: Path) -> None:
    _write_run(tmp_path / "a", with_stats=True)
    _write_run(tmp_path / "b", with_stats=True)
    out = tmp_path / "stats.png"
    visualize.main(["assignment-stats", "--out", str(out),
                    "--run", "A", str(tmp_path / "a"), "--run", "B", str(tmp_path / "b")])  # fmt: skip
    image = matplotlib.image.imread(out)
    height, width = image.shape[:2]
    assert width > height / 2 and image.std() > 0  # two columns of panels, not a blank page


def test_run_without_statistics_is_named(tmp_path: Path) -> None:
    _write_run(tmp_path / "fcos", with_stats=False)
    with pytest.raises(SystemExit, match="fcos/metrics.json has no musu/members_mean"):
        visualize.main(["assignment-stats", "--out", str(tmp_path / "x.png"),
                        "--run", "FCOS", str(tmp_path / "fcos")])  # fmt: skip


def test_size_bands_figure(tmp_path: Path) -> None:
    """The band scalars of assignment_diagnostics (two bands logged) give a PNG; a run without
    them is named."""
    run = tmp_path / "musu"
    run.mkdir()
    lines = []
    for iteration in (19, 39):
        entry = {"iteration": iteration}
        for band in ("small", "medium"):
            for prefix in ("musu", "musu_shadow"):
                entry.update({f"{prefix}/objects_{band}": 4.0, f"{prefix}/members_mean_{band}": 9.0,
                              f"{prefix}/reg_weight_per_object_{band}": 2.0,
                              f"{prefix}/member_iou_{band}": 0.5})  # fmt: skip
            entry.update({f"musu/reg_top_iou_{band}": 0.7, f"musu/reg_top_centre_{band}": 0.9,
                          f"musu/reg_top_offset_{band}": 0.2,
                          f"musu/members_share_s8_{band}": 0.6,
                          f"musu/members_share_s16_{band}": 0.4})  # fmt: skip
        lines.append(json.dumps(entry))
    (run / "metrics.json").write_text("\n".join(lines) + "\n")
    out = tmp_path / "bands.png"
    visualize.main(["size-bands", "--out", str(out), "--run", "MuSu", str(run)])
    image = matplotlib.image.imread(out)
    assert image.shape[1] > image.shape[0] / 2 and image.std() > 0
    _write_run(tmp_path / "old", with_stats=True)
    with pytest.raises(SystemExit, match="old/metrics.json has no musu/objects_<band>"):
        visualize.main(["size-bands", "--out", str(tmp_path / "x.png"),
                        "--run", "old", str(tmp_path / "old")])  # fmt: skip
