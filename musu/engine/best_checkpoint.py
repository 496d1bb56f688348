"""``model_best.pth``: Detectron2's ``BestCheckpointer`` with a record that survives ``--resume``."""

from __future__ import annotations

import json
import logging
import os

from detectron2.engine import hooks as d2_hooks

from .checkpoint import AtomicCheckpointer, atomic_write

__all__ = ["BEST_METRIC", "BestCheckpointer"]

logger = logging.getLogger(__name__)

BEST_METRIC = "bbox/AP"
"""The evaluation result that ``model_best.pth`` maximizes (``TEST.EVAL_PERIOD > 0``)."""


class BestCheckpointer(d2_hooks.BestCheckpointer):
    """Detectron2's ``BestCheckpointer`` (keeps ``<prefix>.pth``, the weights of the best
    evaluation so far) that also records the best value in ``<prefix>.json`` (``metric``,
    ``value``, ``iteration``; written atomically after the checkpoint) and, when training resumes
    (``start_iter > 0``), starts from that record, so a resumed run never replaces the best
    checkpoint by a worse one. Saves go through ``checkpointer`` (:class:`musu.engine.Trainer`
    gives it its :class:`~musu.engine.AtomicCheckpointer`), which also re-tags ``last_checkpoint``:
    it names the newest complete checkpoint either way."""

    def __init__(
        self,
        eval_period: int,
        checkpointer: AtomicCheckpointer,
        val_metric: str = BEST_METRIC,
        file_prefix: str = "model_best",
    ) -> None:
        super().__init__(eval_period, checkpointer, val_metric, mode="max", file_prefix=file_prefix)
        self.checkpointer = checkpointer
        self.metric = val_metric
        self.record_file = os.path.join(checkpointer.save_dir, f"{file_prefix}.json")

    def before_train(self) -> None:
        if self.trainer.start_iter > 0 and os.path.isfile(self.record_file):
            with open(self.record_file) as f:
                record = json.load(f)
            if record.get("metric") == self.metric:
                self.best_metric, self.best_iter = record["value"], record["iteration"]
                logger.info(
                    "Resuming with the best %s so far: %.5f at iteration %d (%s)",
                    self.metric,
                    self.best_metric,
                    self.best_iter,
                    self.record_file,
                )

    def _write_record_if_changed(self, before: tuple) -> None:
        if (self.best_metric, self.best_iter) != before and self.best_metric is not None:
            record = {"metric": self.metric, "value": self.best_metric, "iteration": self.best_iter}
            with atomic_write(self.record_file, "w") as f:
                json.dump(record, f)

    def after_step(self) -> None:
        before = (self.best_metric, self.best_iter)
        super().after_step()
        self._write_record_if_changed(before)

    def after_train(self) -> None:
        before = (self.best_metric, self.best_iter)
        super().after_train()
        self._write_record_if_changed(before)
