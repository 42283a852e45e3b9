"""Per-step training time and the evaluation overhead of a run, measured on a few real steps.

    python -m diffllm.bench.real_model [--steps 4] [hydra overrides ...]
    python -m diffllm.bench.real_model data=alpaca data.path=../shared/data/alpaca_sample.json \\
        data.max_length=256 data.batch_size=8 sampler.gen_length=64 sampler.block_length=32

Composes ``+experiment=smollm2`` with the overrides, runs ``--steps`` optimizer steps through
Lightning (validation at the end, the sanity check before, exactly as the run's
``val_every_n_steps`` = ``max_steps`` does) and then the end-of-run report, timing each part.
It prints a table: seconds per training step (the first step, a warm-up, left out), the
validation and report seconds, the training time projected to the experiment's ``max_steps``,
and the share of that time that validation + report would add.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

from diffllm.config.resolvers import compose, prepare_assets
from diffllm.evaluation.report import build_report
from diffllm.training.module import DiffusionLitModule
from diffllm.training.samples import ValidationSamples


class Timer(Callback):
    """Wall seconds of every training batch (forward, backward, optimizer) and of every validation."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.validations: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps.append(time.perf_counter() - self._t)

    def on_validation_start(self, *args: Any) -> None:
        self._t_val = time.perf_counter()

    def on_validation_end(self, *args: Any) -> None:
        self.validations.append(time.perf_counter() - self._t_val)


def measure(overrides: list[str], steps: int) -> dict[str, Any]:
    cfg = compose(["+experiment=smollm2", "output_dir=null", "report.enabled=false", *overrides])
    prepare_assets(cfg)
    full_steps = int(cfg.trainer.max_steps)
    L.seed_everything(cfg.seed)
    module = DiffusionLitModule.from_run_config(cfg)
    datamodule = instantiate(cfg.data, tokenizer=module.tokenizer, report_dir=None)
    timer = Timer()
    trainer = instantiate(
        cfg.trainer,
        max_steps=steps,
        val_every_n_steps=steps,
        logger=False,
        callbacks=[timer, ValidationSamples()],  # validation as a run does it: with the sampler
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=datamodule)
    t0 = time.perf_counter()
    build_report(
        module,
        datamodule,
        num_rows=cfg.report.num_rows,
        likelihood_samples=cfg.report.likelihood_samples,
        seed=cfg.seed,
    )
    report_s = time.perf_counter() - t0
    step_s = statistics.mean(timer.steps[1:] or timer.steps)
    validation_s = sum(timer.validations)
    train_s = step_s * full_steps
    return {
        "threads": torch.get_num_threads(),
        "batch_size": int(cfg.data.batch_size),
        "template": str(cfg.data.template),
        "step_s": step_s,
        "first_step_s": timer.steps[0],
        "validation_s": validation_s,
        "report_s": report_s,
        "max_steps": full_steps,
        "train_s": train_s,
        "overhead": (validation_s + report_s) / train_s,
        "report_rows": int(cfg.report.num_rows),
    }


def table(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"| SmolLM2-135M, batch {r['batch_size']}, template {r['template']}, {r['threads']} torch threads | seconds |",
            "|---|---:|",
            f"| one training step (mean after the first) | {r['step_s']:.2f} |",
            f"| first training step (warm-up) | {r['first_step_s']:.2f} |",
            f"| training, projected to max_steps={r['max_steps']} | {r['train_s']:.0f} |",
            f"| validation (sanity check + the one at the end, sampler included) | {r['validation_s']:.1f} |",
            f"| end-of-run report ({r['report_rows']} rows) | {r['report_s']:.1f} |",
            f"| validation + report, share of training | {100 * r['overhead']:.1f} % |",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffllm.bench.real_model", description=__doc__)
    parser.add_argument(
        "--steps", type=int, default=4, help="optimizer steps to time (the first is a warm-up)"
    )
    parser.add_argument("overrides", nargs="*", help="hydra overrides on top of +experiment=smollm2")
    args = parser.parse_args(argv)
    print(table(measure(args.overrides, args.steps)), flush=True)


if __name__ == "__main__":
    main()
