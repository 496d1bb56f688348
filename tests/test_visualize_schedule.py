"""tools/analysis/visualize.py schedule: the schedule-curve PNG and table from a CSV of runs, and
clear errors for a CSV it cannot read."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pytest
import visualize  # tools/analysis/visualize.py (conftest.py puts it on sys.path)

ROWS = """dataset,method,iterations,seed,AP,AP75,command
cards,MuSu,300,0,4.0,2.0,x
cards,MuSu,300,1,6.0,3.0,x
cards,FCOS,300,0,9.0,8.0,x
cards,MuSu,900,0,30.0,35.0,x
cards,FCOS,900,0,40.0,42.0,x
bccd,FCOS,300,0,50.0,56.0,x
"""


def test_plot_and_table_average_the_seeds(tmp_path: Path, capsys) -> None:
    (tmp_path / "runs.csv").write_text(ROWS)
    out = tmp_path / "schedule.png"
    visualize.main(["schedule", "--out", str(out), "--csv", str(tmp_path / "runs.csv")])
    printed = capsys.readouterr().out
    assert "| cards | MuSu | 300 | 2 | 5.0 | 2.5 |" in printed  # mean of the two seeds
    assert "| cards | FCOS | 900 | 1 | 40.0 | 42.0 |" in printed
    assert "| bccd | FCOS | 300 | 1 | 50.0 | 56.0 |" in printed
    image = matplotlib.image.imread(out)
    height, width = image.shape[:2]
    assert width > 1.5 * height and image.std() > 0  # two dataset panels side by side


@pytest.mark.parametrize(
    "text, message",
    [
        ("dataset,method,iterations,AP,AP75\n", r"missing column\(s\) \['seed'\]"),
        ("dataset,method,iterations,seed,AP,AP75\ncards,MuSu,300,0,n/a,2\n", r":2: not a number"),
        (ROWS + "cards,FCOS,900,0,41.0,43.0,y\n", r":8: .*'cards', 'FCOS', 900.* seed 0 appears"),
        ("dataset,method,iterations,seed,AP,AP75\n", "no rows"),
    ],
)
def test_bad_csv_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "runs.csv"
    path.write_text(text)
    with pytest.raises(SystemExit, match=message):
        visualize.main(["schedule", "--out", str(tmp_path / "x.png"), "--csv", str(path)])
