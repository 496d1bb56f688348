"""musu's trainer and its pieces: atomic checkpoints, fail-fast data checks, metrics reading.

* :class:`Trainer`: Detectron2's ``DefaultTrainer`` with all of the below (``train_net.py``'s
  trainer; import it to train from a script of your own); :func:`check_data` decodes every image
  of a config's datasets.
* :func:`launch`: Detectron2's ``launch`` that stops cleanly on SIGTERM / SIGINT and prints the
  command that resumes; :func:`exit_when_preempted` for the training call in each process.

* :class:`AtomicCheckpointer`: a ``DetectionCheckpointer`` whose checkpoint files and
  ``last_checkpoint`` tag are written atomically (:func:`atomic_write`: temporary file, fsync,
  ``os.replace``); every file musu writes in place goes through :func:`atomic_write`. It reads
  weights through :func:`load_weights_file` and ``--resume`` continues from the newest
  checkpoint that loads (:class:`NoResumableCheckpointError` when none does).
* :func:`load_weights_file`: a weights file (``.pth``, Detectron2 model-zoo ``.pkl``) read
  without running code from it; :class:`WeightsFileError` / :class:`UnsafeWeightsError` name it.
* :class:`BestCheckpointer`: keeps ``model_best.pth`` (``TEST.EVAL_PERIOD > 0``) with a record
  that survives ``--resume``.
* :func:`check_dataset_classes`: raises before training when a dataset holds a class index that
  the model's ``NUM_CLASSES`` cannot represent, naming the file and the annotation; warns when
  the model has more classes than the datasets name.
* :func:`create_ddp_model`: DDP for CUDA models as Detectron2 does and for CPU models (gloo).
* :class:`PreemptionHook`: SIGTERM / SIGINT stop training after the current iteration with a
  checkpoint (:class:`Preempted`); :func:`forward_signals_to_children` for ``launch``'s parent.
* :func:`read_metrics_json` / :func:`train_seconds_per_iter`: a run's Detectron2 ``metrics.json``.
"""

from .best_checkpoint import BEST_METRIC, BestCheckpointer
from .checkpoint import AtomicCheckpointer, NoResumableCheckpointError, atomic_write
from .data_checks import check_dataset_classes
from .distributed import create_ddp_model, limit_cpu_threads_per_process
from .launch import exit_when_preempted, launch, resume_command
from .metrics import read_metrics_json, train_seconds_per_iter
from .preemption import (
    PREEMPTION_SIGNALS,
    Preempted,
    PreemptionHook,
    SignalShieldedMapper,
    forward_signals_to_children,
    preemption_exit_code,
)
from .trainer import Trainer, check_data
from .weights_io import UnsafeWeightsError, WeightsFileError, load_weights_file

__all__ = [
    "AtomicCheckpointer",
    "BEST_METRIC",
    "BestCheckpointer",
    "NoResumableCheckpointError",
    "PREEMPTION_SIGNALS",
    "Preempted",
    "UnsafeWeightsError",
    "WeightsFileError",
    "PreemptionHook",
    "SignalShieldedMapper",
    "atomic_write",
    "Trainer",
    "check_data",
    "check_dataset_classes",
    "create_ddp_model",
    "exit_when_preempted",
    "forward_signals_to_children",
    "launch",
    "limit_cpu_threads_per_process",
    "load_weights_file",
    "preemption_exit_code",
    "read_metrics_json",
    "resume_command",
    "train_seconds_per_iter",
]
