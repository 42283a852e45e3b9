"""The runs behind ``python -m diffllm.bench.resume`` (and ``tests/test_resume.py``): a run
stopped by SIGTERM at a step and resumed ends where the uninterrupted run ends, tensor for tensor.

Three runs of the embedded default (CPU, in this process): the uninterrupted run to ``--steps``;
the same run sent a real SIGTERM after optimizer step ``--kill-at`` (random in [1, steps - 1]
unless given), which writes ``last.ckpt`` and stops with exit code 143; and a fresh Trainer
resumed from that checkpoint to ``--steps``. Prints the trainable tensors equal (``torch.equal``)
out of the total, and every final validation metric of the two runs side by side.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch

from diffllm.config.resolvers import compose
from diffllm.training.callbacks import Interrupted
from diffllm.training.run import train

# A short embedded-default run: validation every 5 steps (10 micro-batches, 2 passes) on one batch, LoRA dropout on, 5 batches
# per pass with accumulation 2 (passes end mid-window: the resume crosses pass boundaries).
BASE = [
    "trainer.val_every_n_steps=5",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.accumulate_grad_batches=2",
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


class KillAt(L.Callback):
    """Sends this process a real SIGTERM after optimizer step ``step`` (mid-accumulation-window:
    after the next micro-batch), as ``kill`` or a scheduler would."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
            self.step = -1


def trainable(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def final_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/loss"))}


def run(overrides: list[str], out: Path, kill_at: int | None = None) -> tuple[Any, Any]:
    """(trainer, module) of one ``train`` run; ``kill_at``: SIGTERM after that step."""
    if kill_at is not None:  # the killer joins the callbacks group like any callback
        overrides = overrides + [
            f"+callbacks.kill._target_={__name__}.KillAt",
            f"+callbacks.kill.step={kill_at}",
        ]
    cfg = compose(overrides + [f"output_dir={out}"])
    try:
        _, objs = train(cfg)
    except Interrupted as stop:
        return stop, None
    if kill_at is not None:
        raise AssertionError(f"the run was not interrupted at step {kill_at}")
    return objs["trainer"], objs["module"]


def compare(steps: int, kill_at: int, seed: int, root: Path, extra: list[str]) -> dict[str, Any]:
    """Uninterrupted vs killed-at-``kill_at``-and-resumed; returns the figures."""
    base = BASE + [f"trainer.max_steps={steps}", f"seed={seed}"] + extra
    trainer_a, module_a = run(base, root / "uninterrupted")
    stop, _ = run(base, root / "killed", kill_at=kill_at)
    ckpt = torch.load(stop.path, map_location="cpu", weights_only=False)
    trainer_b, module_b = run(base + [f"ckpt_path={stop.path}"], root / "killed")
    a, b = trainable(module_a), trainable(module_b)
    ma, mb = final_metrics(trainer_a), final_metrics(trainer_b)
    return {
        "steps": steps,
        "kill_at": kill_at,
        "stopped_at": int(ckpt["global_step"]),
        "exit_code": stop.exit_code,
        "equal": sum(torch.equal(a[n], b[n]) for n in a),
        "total": len(a),
        "metrics": {k: (ma[k], mb.get(k)) for k in sorted(ma)},
        "end_steps": (trainer_a.global_step, trainer_b.global_step),
    }
