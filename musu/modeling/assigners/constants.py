"""Constants of the assigners that the config validation needs; a leaf: imports nothing."""

__all__ = ["CRITERIA"]

# Ranking criteria of MuSuAssigner (``MODEL.MUSU.CRITERION``).
CRITERIA = ("mutual", "cls", "iou")
