"""Training-loop pieces for musu: atomic checkpoints, fail-fast data checks, metrics reading.

* :class:`AtomicCheckpointer`: a ``DetectionCheckpointer`` whose checkpoint files and
  ``last_checkpoint`` tag are written atomically (:func:`atomic_write`: temporary file, fsync,
  ``os.replace``); every file musu writes in place goes through :func:`atomic_write`.
* :func:`check_dataset_classes`: raises before training when a dataset holds a class index that
  the model's ``NUM_CLASSES`` cannot represent, naming the file and the annotation.
* :func:`read_metrics_json` / :func:`train_seconds_per_iter`: a run's Detectron2 ``metrics.json``.
"""

from .checkpoint import AtomicCheckpointer, atomic_write
from .data_checks import check_dataset_classes
from .metrics import read_metrics_json, train_seconds_per_iter

__all__ = [
    "AtomicCheckpointer",
    "atomic_write",
    "check_dataset_classes",
    "read_metrics_json",
    "train_seconds_per_iter",
]
