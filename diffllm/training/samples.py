"""The validation-samples callback (``callbacks.samples``): the sampler's answers on fixed prompts.

After every validation (not the sanity check), on rank 0: decode the datamodule's
``sample_prompts()`` (the first ``data.num_sample_prompts`` validation rows, the same at every
validation) with the module's objective and sampler, log ``val/exact_match`` and ``val/rougeL``,
and write a table of (step, prompt, generated, reference) to every logger in the form it takes:
a CSV file (``val_samples.csv`` in the logger's folder), TensorBoard text, a W&B table.

With ``quality_rows > 0`` (a diffusion run) it also logs the reference-free quality of the first
``quality_rows`` answers (``diffllm.evaluation.quality``): ``val/ar_scored_nll``, ``val/ar_agreement``,
``val/eos_rate``, ``val/repetition``, ``val/answer_length``, at the cost of one AR greedy decode.

Resume: checkpoints hold the number of table rows written so far; a run resumed in the same folder
keeps that many rows of ``val_samples.csv`` (the rows of the validations before its checkpoint) and
appends after them. (A row's ``step`` cannot tell: a validation in the middle of an accumulation
window comes after the checkpoint of the step it names.)
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from diffllm.evaluation.metrics import exact_match, rouge_l
from diffllm.evaluation.quality import head, reference_free
from diffllm.evaluation.scoring import Answers, ar_answers
from diffllm.training.loggers import keep_rows

QUALITY_KEYS = ("ar_scored_nll", "ar_agreement", "eos_rate", "repetition", "answer_length")


class ValidationSamples(Callback):
    """Sampler answers, exact match and ROUGE-L on the datamodule's fixed validation prompts."""

    def __init__(self, quality_rows: int = 8) -> None:
        if quality_rows < 0:
            raise ValueError(
                f"callbacks.samples.quality_rows={quality_rows}; valid: an integer >= 0 (0: off)"
            )
        self.quality_rows = int(quality_rows)
        self.prompts: list[dict[str, Any]] = []
        self.rows_written = 0  # table rows this run has written (rank 0), resumed runs included
        self._resumed = False

    @override
    def state_dict(self) -> dict[str, int]:
        return {"rows_written": self.rows_written}

    @override
    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.rows_written, self._resumed = int(state_dict.get("rows_written", 0)), True

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resumed and trainer.is_global_zero:  # drop the rows written after the checkpoint
            keep_table_rows(trainer.loggers, self.rows_written)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "sample_prompts") and not self.prompts:
            self.prompts = dm.sample_prompts()

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.prompts:
            return
        if trainer.is_global_zero:
            self.log_samples(trainer, pl_module)

    def log_samples(self, trainer: L.Trainer, pl_module: Any) -> list[dict[str, Any]]:
        """Decode, log the metrics on ``pl_module`` and the table to the loggers; returns the rows."""
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            prompt_ids = [p["prompt_ids"] for p in self.prompts]
            answers = pl_module.objective.answers(
                pl_module.dlm,
                pl_module.tokenizer,
                prompt_ids,
                pl_module.sampler_config,
                eos_id=pl_module.eos_id,
                seed=pl_module.seed,
                batch_size=len(prompt_ids),
            )
            preds = answers.texts
            if self.quality_rows > 0 and pl_module.objective.role == "diffusion":
                self.log_quality(pl_module, prompt_ids, answers)
        pl_module.train(was_training)
        refs = [p["reference"] for p in self.prompts]
        pl_module.log("val/exact_match", exact_match(preds, refs), rank_zero_only=True)
        pl_module.log("val/rougeL", rouge_l(preds, refs), rank_zero_only=True)
        rows = [
            {"step": trainer.global_step, "prompt": p["prompt"], "generated": g, "reference": r}
            for p, g, r in zip(self.prompts, preds, refs)
        ]
        write_table(trainer.loggers, rows, trainer.global_step)
        self.rows_written += len(rows)
        return rows

    def log_quality(self, pl_module: Any, prompt_ids: list[list[int]], answers: Answers) -> None:
        """Reference-free quality of the first ``quality_rows`` answers against the AR base's greedy ones."""
        rows = min(self.quality_rows, len(prompt_ids))
        prompts = prompt_ids[:rows]
        tok = pl_module.tokenizer
        greedy = ar_answers(
            pl_module.dlm,
            tok,
            prompts,
            pl_module.sampler_config.gen_length,
            eos_id=pl_module.eos_id,
            batch_size=rows,
        )
        pad = tok.pad_token_id if tok.pad_token_id is not None else pl_module.eos_id
        figures = reference_free(
            head(answers, rows),
            prompts,
            end_id=pl_module.eos_id,
            pad_id=pad,
            ar_model=pl_module.dlm,
            ar_greedy=greedy,
        )
        for key in QUALITY_KEYS:
            pl_module.log(f"val/{key}", float(figures[key]), rank_zero_only=True)


def _table_file(logger: Any) -> Path | None:
    """``val_samples.csv`` in the folder of a logger that takes the table as a file (CSV), else None."""
    if hasattr(logger, "log_text") or hasattr(getattr(logger, "experiment", None), "add_text"):
        return None  # W&B, TensorBoard
    return Path(logger.log_dir) / "val_samples.csv" if getattr(logger, "log_dir", None) else None


def keep_table_rows(loggers: list[Any], rows: int) -> None:
    """Keep the first ``rows`` rows of every logger's ``val_samples.csv`` (a resume: the rest came after)."""
    for logger in loggers:
        path = _table_file(logger)
        if path is not None:
            keep_rows(path, lambda table: table[:rows])


def write_table(loggers: list[Any], rows: list[dict[str, Any]], step: int) -> None:
    """The table to every logger in the form it takes: CSV file, TensorBoard text, W&B table."""
    for logger in loggers:
        if hasattr(logger, "log_text"):  # W&B
            logger.log_text(key="val/samples", columns=list(rows[0]), data=[list(r.values()) for r in rows])
        elif hasattr(getattr(logger, "experiment", None), "add_text"):  # TensorBoard
            md = "| prompt | generated | reference |\n|---|---|---|\n" + "\n".join(
                f"| {r['prompt']!r} | {r['generated']!r} | {r['reference']!r} |" for r in rows
            )
            logger.experiment.add_text("val/samples", md, step)
        elif (path := _table_file(logger)) is not None:  # CSV (and anything with a folder)
            new = not path.exists()
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                if new:
                    w.writeheader()
                w.writerows(rows)
