"""Training-loop robustness for musu: atomic checkpoints and fail-fast checks on the data.

* :class:`AtomicCheckpointer`: a ``DetectionCheckpointer`` whose checkpoint files and
  ``last_checkpoint`` tag are written atomically (temporary file, fsync, ``os.replace``).
* :func:`check_dataset_classes`: raises before training when a dataset holds a class index that
  the model's ``NUM_CLASSES`` cannot represent, naming the file and the annotation.
"""

from .checkpoint import AtomicCheckpointer, atomic_write
from .data_checks import check_dataset_classes

__all__ = ["AtomicCheckpointer", "atomic_write", "check_dataset_classes"]
