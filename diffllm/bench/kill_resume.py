"""The runs behind ``python -m diffllm.bench.resume`` and ``tests/test_resume.py``: a run stopped at
any optimizer step and resumed ends where the uninterrupted run ends.

Two comparisons, both on the embedded default (CPU, in this process):

* ``reference_run``: the uninterrupted run, which writes a checkpoint at the end of every step.
* ``kill_and_resume``: the same run sent a real signal (SIGTERM, or SIGUSR1: the SLURM requeue
  path) during optimizer step ``kill_at + 1``, which stops at the end of that step with its
  checkpoint, and a fresh Trainer resumed from it in the same run folder (SIGUSR1: with no
  ``ckpt_path``, as a requeued job starts).
* ``every_step``: for every step k, the reference's run folder as it stood at step k (config,
  logs, the step-k checkpoint) resumed from that checkpoint to the end. A stop at step k writes
  the same checkpoint (``StepEnd``), so this covers every kill step for the price of the resumed
  tails.

Each resumed run is checked against the uninterrupted one: every trainable tensor and the AdamW
state (``torch.equal``), the LR scheduler's state, and the run folder's ``logs/metrics.csv`` and
``logs/val_samples.csv`` row for row (``WALL_CLOCK`` columns aside).
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from diffllm.config.resolvers import compose
from diffllm.training.callbacks import BestCheckpoint, Interrupted
from diffllm.training.run import train

# A short embedded-default run: validation every 5 steps (10 micro-batches) on one batch, LoRA
# dropout on, 5 batches per pass with accumulation 2 (a pass's last window holds one micro-batch,
# which Lightning steps on alone: pass ends and accumulation windows do not line up).
BASE = [
    "trainer.val_every_n_steps=5",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.accumulate_grad_batches=2",
    "trainer.log_every_n_steps=1",
    "data.limit_train_rows=40",
    "data.limit_val_rows=8",
    "data.batch_size=8",
    "data.num_sample_prompts=2",
    "lora.lora_dropout=0.1",
    "report.enabled=false",
    "sampler.gen_length=8",
    "sampler.steps=8",
    "val_likelihood.num_samples=2",
]

# Rates over the wall clock of the process that ran the steps (``TokenThroughput``): not a property
# of the run (an uninterrupted run repeated logs other values too).
WALL_CLOCK = ("train/tokens_per_sec", "train/nonpad_tokens_per_sec", "train/mfu")


class KillAt(L.Callback):
    """Sends this process a real signal (``signum``, SIGTERM unless given) during optimizer step
    ``step + 1`` (as its first micro-batch starts), as ``kill`` or a scheduler would: the run stops
    at the end of step ``step + 1``."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        super().__init__()
        self.step, self.signum = step, int(signum)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
            self.step = -1


def trainable(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def training_state(trainer: L.Trainer) -> dict[str, Any]:
    """The optimizer's and the LR scheduler's state dicts, flattened to {name: tensor or value}."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f"{prefix}/{i}", item)
        else:
            flat[prefix] = value.detach().clone() if isinstance(value, torch.Tensor) else value

    walk("optimizer", trainer.optimizers[0].state_dict())
    for i, config in enumerate(trainer.lr_scheduler_configs):
        walk(f"scheduler{i}", config.scheduler.state_dict())
    return flat


def equal_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        torch.equal(a[k], b[k])
        if isinstance(a[k], torch.Tensor)
        else a[k] == b[k] and type(a[k]) is type(b[k])
        for k in a
    )


def csv_rows(path: Path, drop: tuple[str, ...] = WALL_CLOCK) -> list[dict[str, str]]:
    """A CSV file's rows in order, without the ``drop`` columns ([] when there is no file)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def run_logs(folder: Path) -> dict[str, list[dict[str, str]]]:
    """``metrics.csv`` and ``val_samples.csv`` of a run folder (the csv logger's files)."""
    return {name: csv_rows(folder / "logs" / name) for name in ("metrics.csv", "val_samples.csv")}


def run(overrides: list[str], out: Path, kill_at: int | None = None, signum: int = int(signal.SIGTERM)):
    """(trainer, module) of one ``train`` run; ``kill_at``: ``signum`` after that step, and then
    (the ``Interrupted`` stop, None)."""
    if kill_at is not None:  # the killer joins the callbacks group like any callback
        overrides = overrides + [
            f"+callbacks.kill._target_={__name__}.KillAt",
            f"+callbacks.kill.step={kill_at}",
            f"+callbacks.kill.signum={int(signum)}",
        ]
    cfg = compose(overrides + [f"output_dir={out}"])
    try:
        _, objs = train(cfg)
    except Interrupted as stop:
        return stop, None
    if kill_at is not None:
        raise AssertionError(f"the run was not interrupted at step {kill_at}")
    return objs["trainer"], objs["module"]


def final_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/loss"))}


@dataclass
class Reference:
    """An uninterrupted run: its overrides, trainer, module and run folder."""

    overrides: list[str]
    trainer: L.Trainer
    module: L.LightningModule
    folder: Path


def reference_run(steps: int, seed: int, root: Path, extra: list[str]) -> Reference:
    """The uninterrupted run (``BASE`` to ``steps``), checkpointing at the end of every step, in
    ``root/uninterrupted`` (it runs in ``root/run``, the folder ``every_step`` resumes in)."""
    overrides = BASE + [f"trainer.max_steps={steps}", f"seed={seed}"] + extra
    work = root / "run"
    trainer, module = run(overrides + ["callbacks.checkpoint.every_n_train_steps=1"], work)
    work.rename(root / "uninterrupted")
    return Reference(overrides, trainer, module, root / "uninterrupted")


def same_run(
    reference: Reference, trainer: L.Trainer, module: L.LightningModule, folder: Path
) -> dict[str, Any]:
    """How a resumed run (trainer, module, run folder) compares with the uninterrupted one."""
    a, b = trainable(reference.module), trainable(module)
    logs_a, logs_b = run_logs(reference.folder), run_logs(folder)
    return {
        "equal": sum(torch.equal(a[n], b[n]) for n in a),
        "total": len(a),
        "training_state": equal_state(training_state(reference.trainer), training_state(trainer)),
        "metrics_csv": logs_a["metrics.csv"] == logs_b["metrics.csv"],
        "metrics_rows": (len(logs_a["metrics.csv"]), len(logs_b["metrics.csv"])),
        "samples_csv": logs_a["val_samples.csv"] == logs_b["val_samples.csv"],
        "best_score": best_score(reference.trainer) == best_score(trainer),
        "end_steps": (reference.trainer.global_step, trainer.global_step),
    }


def best_score(trainer: L.Trainer) -> float | None:
    """The best validation score ``BestCheckpoint`` holds (None without one)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, BestCheckpoint) and callback.best_model_score is not None:
            return float(callback.best_model_score)
    return None


def kill_and_resume(
    reference: Reference, kill_at: int, root: Path, signum: int = int(signal.SIGTERM)
) -> dict[str, Any]:
    """The reference's run sent ``signum`` during step ``kill_at + 1``, then resumed in its folder
    (``root/killed``): SIGTERM with ``ckpt_path`` = its checkpoint, SIGUSR1 (requeue) with none, as
    a requeued job starts again. Returns the figures (``same_run``'s and the stop's)."""
    folder = root / "killed"
    stop, _ = run(reference.overrides, folder, kill_at=kill_at, signum=signum)
    stopped_at = int(torch.load(stop.path, map_location="cpu", weights_only=False)["global_step"])
    resume = [] if signum == signal.SIGUSR1 else [f"ckpt_path='{stop.path}'"]
    trainer, module = run(reference.overrides + resume, folder)
    ma, mb = final_metrics(reference.trainer), final_metrics(trainer)
    return {
        "kill_at": kill_at,
        "stopped_at": stopped_at,
        "exit_code": stop.exit_code,
        "stop": stop,
        "metrics": {k: (ma[k], mb.get(k)) for k in sorted(ma)},
        **same_run(reference, trainer, module, folder),
    }


def folder_at_step(source: Path, step: int, target: Path) -> Path:
    """``target``: the run folder ``source`` as it stood at the end of ``step`` (its config, its logs,
    the step's checkpoint); returns that checkpoint's path in it. The resumed run trims the logs."""
    target.mkdir(parents=True)
    shutil.copy2(source / "config.yaml", target / "config.yaml")
    shutil.copytree(source / "logs", target / "logs")
    (target / "checkpoints").mkdir()
    ckpt = target / "checkpoints" / f"step={step:06d}.ckpt"
    shutil.copy2(source / "checkpoints" / ckpt.name, ckpt)
    return ckpt


def every_step(reference: Reference, root: Path) -> list[dict[str, Any]]:
    """Resume from the end of every step 1 .. steps - 1 of the reference; one figures dict per step.

    Each resume works in ``root/run``, the folder the reference ran in and its checkpoints name (so
    ``BestCheckpoint`` takes its state back as in a same-folder resume), then moves to
    ``root/from_step_<k>``.
    """
    work, results = root / "run", []
    for k in range(1, reference.trainer.global_step):
        ckpt = folder_at_step(reference.folder, k, work)
        trainer, module = run(reference.overrides + [f"ckpt_path='{ckpt}'"], work)
        results.append({"resumed_from": k, **same_run(reference, trainer, module, work)})
        work.rename(root / f"from_step_{k}")
    return results
