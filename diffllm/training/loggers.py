"""The ``logger=csv`` target: Lightning's ``CSVLogger`` whose files survive a resume in the same folder.

Lightning's CSV writer deletes ``metrics.csv`` when it starts in a folder that holds one, so a run
resumed in its own folder (``ckpt_path=<run>/checkpoints/last.ckpt``, a requeued SLURM job) lost
every row logged before the resume. ``ResumableCSVLogger`` keeps the file and appends to it; before a
resume, ``resume_at(global_step)`` (``diffllm.training.run.train`` calls it with the checkpoint's
step) drops the rows logged after that checkpoint, which the resumed run logs again. The file then
reads as the uninterrupted run's, row for row.

Which rows a checkpoint of optimizer step G holds: Lightning logs everything under ``step`` = the
optimizer steps done before it (``_batches_that_stepped``): step s's train metrics and learning
rate, and the validation that follows it, under s - 1; a validation in the middle of an
accumulation window of step s + 1, under s. Every checkpoint is written at the end of its step,
after that step's validation (``diffllm.training.callbacks.StepEnd``), so ``metrics.csv`` keeps the
rows with step < G. Rows the killed run never flushed cannot come back (Lightning writes the file
every ``flush_logs_every_n_steps`` steps and when a run ends or fails: a SIGKILL loses the rows since
the last flush). The samples table ``val_samples.csv`` is its writer's
(``diffllm.training.samples.ValidationSamples`` keeps its own row count in checkpoints).

A run that is not a resume behaves as Lightning's: an existing ``metrics.csv`` is replaced.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override


def keep_rows(path: Path, select: Callable[[list[dict[str, str]]], list[dict[str, str]]]) -> int | None:
    """Rewrite the CSV file ``path`` with the rows ``select(rows)`` returns, header unchanged (atomic:
    a temporary file renamed over it); returns how many rows were dropped (None without a file)."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames or [], list(reader)
    kept = select(rows)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)
    return len(rows) - len(kept)


def _step(row: dict[str, str]) -> int:
    return int(float(row["step"]))


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer, appending to an existing ``metrics.csv`` under its header."""

    @override
    def _check_log_dir_exists(self) -> None:  # Lightning deletes metrics.csv here
        pass

    @override
    def save(self) -> None:
        if self.metrics and not self.metrics_keys and self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])  # new keys extend the header
        super().save()


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps ``metrics.csv`` up to a resumed checkpoint and appends after it
    (module docstring); same arguments as Lightning's."""

    _resume_step: int | None = None

    @rank_zero_only
    def resume_at(self, global_step: int) -> None:
        """Before fitting from a checkpoint of optimizer step ``global_step``: drop the rows logged
        after it, keep the rest and append from there. Call it before the run logs anything."""
        if self._experiment is not None:
            raise RuntimeError("ResumableCSVLogger.resume_at must come before the first log call")
        self._resume_step = int(global_step)
        keep_rows(
            Path(self.log_dir) / _AppendingWriter.NAME_METRICS_FILE,
            lambda rows: [row for row in rows if _step(row) < global_step],
        )

    @property
    @override
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self._resume_step is not None and rank_zero_only.rank == 0:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return super().experiment
