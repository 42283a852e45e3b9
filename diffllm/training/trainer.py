"""The ``trainer`` config node's target: a ``lightning.Trainer`` whose validation interval is in
optimizer steps.

Lightning's ``val_check_interval`` counts training batches, that is micro-batches: with
``accumulate_grad_batches=4`` an interval of 500 validates every 125 optimizer steps. The config
says ``val_every_n_steps`` (optimizer steps, the unit of ``max_steps``, the LR schedule and the
logged ``step``) and this builds the Trainer with ``val_check_interval = val_every_n_steps x
accumulate_grad_batches``.

``AtomicCheckpointIO`` (the ``plugins`` of ``conf/trainer/*``): every checkpoint is written to a
temporary file beside its target and renamed over it, so a failed write (full disk, a kill) leaves
the previous checkpoint intact. Lightning's ``TorchCheckpointIO`` writes through an fsspec
transaction whose temporary file lives in the system temp folder (``/tmp``): its final move to the
run folder is a copy when the two are on different filesystems, and a copy cut short leaves a
truncated checkpoint in place of the good one. It also refuses to write non-finite trainable
weights.

``check_accelerator``: a GPU trainer on a machine without one is refused in one line, before the
model or the data are loaded.

Under SLURM the Trainer gets ``SLURMEnvironment(auto_requeue=False)``: requeueing is
``diffllm.training.callbacks.StopOnSignal``'s (USR1 stops at the end of the current optimizer step,
writes the checkpoint there, then requeues). Lightning's own requeue, on by default, handles USR1
inside the signal handler: it writes a checkpoint wherever training happens to be (mid-step, with a
half-accumulated gradient lost) and requeues, and the two would fight over the signal.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from omegaconf import ListConfig

from diffllm.training.callbacks import step_end_order


class NonFiniteCheckpointError(RuntimeError):
    """A checkpoint would hold NaN/inf trainable weights: it is not written."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, permissions); the previous one is intact."""


class NoAcceleratorError(RuntimeError):
    """The trainer config asks for an accelerator this machine does not have."""


def check_accelerator(accelerator: str, devices: Any = None) -> None:
    """Refuse ``trainer.accelerator=gpu|cuda`` without a CUDA device (one line naming ``trainer=cpu``)."""
    if str(accelerator) not in ("gpu", "cuda"):
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise NoAcceleratorError(
            f"trainer.accelerator={accelerator} but this machine has no CUDA GPU "
            f"(torch {torch.__version__}): add trainer=cpu to the command"
        )
    if isinstance(devices, int) and devices > available:
        raise NoAcceleratorError(
            f"trainer.devices={devices} but this machine has {available} CUDA GPU(s): "
            f"set trainer.devices={available} (or fewer)"
        )


def non_finite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` holding a NaN or an inf."""
    return [
        name
        for name, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.isfinite().all())
    ]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.<pid>.tmp`` beside the target, fsync, ``os.replace`` (module docstring).

    Remote paths (``s3://``...) go through Lightning's own writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteCheckpointError(
                f"not writing {path}: {len(bad)} trainable tensor(s) hold NaN/inf (e.g. {bad[0]}); "
                "the previous checkpoint is kept"
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: same folder, same filesystem
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise CheckpointWriteError(
                err.errno,
                f"could not write checkpoint {path} ({err.strerror or err}); the previous one is intact",
            ) from err
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def build_trainer(
    val_every_n_steps: int | None = None, accumulate_grad_batches: int = 1, **trainer_kwargs: Any
) -> L.Trainer:
    """``lightning.Trainer(**trainer_kwargs)`` validating every ``val_every_n_steps`` optimizer steps.

    ``val_every_n_steps=None`` leaves validation to Lightning's own keys (``val_check_interval``,
    ``check_val_every_n_epoch``). The callbacks are put in ``step_end_order`` (the resume checkpoints
    last); under SLURM, Lightning's requeue is off (``without_lightning_requeue``).
    """
    if val_every_n_steps is not None:
        if trainer_kwargs.get("val_check_interval") is not None:
            raise ValueError(
                f"trainer.val_check_interval={trainer_kwargs['val_check_interval']!r} and "
                f"trainer.val_every_n_steps={val_every_n_steps!r} both set the validation interval; "
                "keep val_every_n_steps (optimizer steps) and drop val_check_interval (micro-batches)"
            )
        if int(val_every_n_steps) != val_every_n_steps or val_every_n_steps < 1:
            raise ValueError(
                f"trainer.val_every_n_steps={val_every_n_steps!r} must be a positive whole number of "
                "optimizer steps (or null to use Lightning's val_check_interval)"
            )
        trainer_kwargs["val_check_interval"] = int(val_every_n_steps) * int(accumulate_grad_batches)
    plugins = trainer_kwargs.get("plugins")  # Hydra hands a ListConfig of instantiated objects
    if plugins is None:
        plugins = []
    plugins = list(plugins) if isinstance(plugins, (list, tuple, ListConfig)) else [plugins]
    trainer_kwargs["plugins"] = without_lightning_requeue(plugins) or None
    if trainer_kwargs.get("callbacks"):
        trainer_kwargs["callbacks"] = step_end_order(list(trainer_kwargs["callbacks"]))
    return L.Trainer(accumulate_grad_batches=accumulate_grad_batches, **trainer_kwargs)


def without_lightning_requeue(plugins: list[Any]) -> list[Any]:
    """``plugins`` plus ``SLURMEnvironment(auto_requeue=False)`` under SLURM (module docstring).

    A SLURM environment given with Lightning's requeue on is refused: it would write a mid-step
    checkpoint and requeue from inside its USR1 handler, beside ``StopOnSignal``'s.
    """
    given = [p for p in plugins if isinstance(p, ClusterEnvironment)]
    for env in given:
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            raise ValueError(
                "trainer.plugins holds SLURMEnvironment(auto_requeue=True): Lightning's requeue writes a "
                "checkpoint mid-step from its USR1 handler; give auto_requeue=False (callbacks.signals "
                "requeues at the end of the step)"
            )
    if not given and SLURMEnvironment.detect():
        plugins = [*plugins, SLURMEnvironment(auto_requeue=False)]
    return plugins
