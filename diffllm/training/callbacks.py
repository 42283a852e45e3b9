"""Training callbacks of the ``callbacks`` config group that Lightning does not ship.

Checkpoints that survive: ``PeriodicCheckpoint`` (every N optimizer steps, and ``last.ckpt``
current whenever training stops), ``BestCheckpoint`` (``best.ckpt`` by the objective's own
validation NLL), ``StopOnSignal`` (SIGTERM/SIGINT: checkpoint at the next step boundary, exit
128 + signal), ``NonFiniteGuard`` (a NaN/inf step is skipped and counted; N in a row stop the run).
Every checkpoint goes through the Trainer's ``diffllm.training.trainer.AtomicCheckpointIO``.

``TokenThroughput`` logs what a GPU run is judged by: tokens/s (every position of the padded
batch, what the GPU computes), non-pad tokens/s (what the data holds), the padding fraction and
the model-FLOPs utilisation (MFU) against the device's peak: non-pad tokens/s x FLOPs per token /
peak FLOP/s (padding is wasted work, not model FLOPs; as ``diffllm.bench.train`` counts it).

FLOPs per token (``flops_per_token``), with N the parameters outside the input and output
embeddings (the embedding lookup is no matmul; the LM head runs only on the hidden positions, see
``DiffusionLM.logits_at``, and is left out) and attention's L^2 term ignored (short sequences):

    forward 2N  +  backward to the activations 2N  +  weight gradients 2 N_trainable

which is 6N for full fine-tuning and 4N (+ 2x the adapters' 0.1 %) for a frozen base with LoRA:
the frozen weights get no gradient, but the gradient still flows through every block down to the
first LoRA layer. Gradient checkpointing's recomputed forward is not counted (MFU counts the
model's FLOPs, not the hardware's).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import deque
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from typing_extensions import override

from diffllm.training.module import VAL_METRICS


def _embedding_param_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of every input / output embedding inside ``model`` (tied ones once)."""
    ids: set[int] = set()
    for module in model.modules():
        get_in, get_out = (
            getattr(module, "get_input_embeddings", None),
            getattr(module, "get_output_embeddings", None),
        )
        if not (callable(get_in) and callable(get_out)):
            continue
        for getter in (get_in, get_out):
            try:
                emb = getter()
            except (AttributeError, NotImplementedError):
                emb = None
            if emb is not None:
                ids |= {id(p) for p in emb.parameters()}
    return ids


def parameter_count(model: nn.Module) -> tuple[int, int]:
    """(N, N_trainable): non-embedding parameters of ``model``, all and trainable (adapters included)."""
    skip = _embedding_param_ids(model)
    params = [p for p in model.parameters() if id(p) not in skip]
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def flops_per_token(model: nn.Module) -> int:
    """Training FLOPs per token: 4N + 2 N_trainable (6N full fine-tuning, ~4N frozen base + LoRA)."""
    n, n_trainable = parameter_count(model)
    return 4 * n + 2 * n_trainable


def _compute_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Lightning precision string (``bf16-mixed`` -> bfloat16)."""
    head = str(precision).split("-")[0]
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(head, torch.float32)


class TokenThroughput(L.Callback):
    """Logs ``train/tokens_per_sec``, ``train/nonpad_tokens_per_sec``, ``train/pad_frac`` and ``train/mfu``.

    Rates are over the last ``window`` logging points (every ``trainer.log_every_n_steps``
    optimizer steps), validation time excluded, summed over ranks (each rank's rate x world size,
    as the ranks run in lockstep); ``train/mfu`` is per device. The GPU is synchronised only at
    the logging points, so the counters cost no stall. ``peak_flops``: the device's peak FLOP/s
    for the compute dtype; ``None`` looks it up with Lightning's ``get_available_flops`` (known
    GPUs; none on a CPU, and then no MFU is logged).
    """

    def __init__(self, window: int = 5, peak_flops: float | None = None) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"callbacks.throughput.window={window!r} must be >= 1 logging point")
        self.window = int(window)
        self.peak_flops = peak_flops
        self.flops_per_token = 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.flops_per_token = flops_per_token(pl_module)
        if self.peak_flops is None:
            dtype = _compute_dtype(trainer.precision)
            self.peak_flops = get_available_flops(trainer.strategy.root_device, dtype)

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(trainer)
        self._paused = 0.0
        self._t0 = time.perf_counter()
        self._tokens = 0  # every position of every batch (padding included)
        self._nonpad: torch.Tensor | int = 0  # a device tensor between logging points: no sync
        self._last_step = trainer.global_step
        self._points: deque[tuple[float, int, int]] = deque([(0.0, 0, 0)], maxlen=self.window + 1)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        mask = batch["attention_mask"]
        self._tokens += mask.numel()
        self._nonpad = self._nonpad + mask.sum()
        stepped, self._last_step = trainer.global_step != self._last_step, trainer.global_step
        if not stepped or trainer.global_step % max(trainer.log_every_n_steps, 1):
            return
        self._sync(trainer)
        now = time.perf_counter() - self._t0 - self._paused
        self._points.append((now, self._tokens, int(self._nonpad)))
        (t_a, tok_a, real_a), (t_b, tok_b, real_b) = self._points[0], self._points[-1]
        if t_b <= t_a or tok_b <= tok_a:
            return
        world = trainer.world_size
        tokens_per_sec = (tok_b - tok_a) / (t_b - t_a)  # this device
        metrics = {
            "train/tokens_per_sec": tokens_per_sec * world,
            "train/nonpad_tokens_per_sec": (real_b - real_a) / (t_b - t_a) * world,
            "train/pad_frac": 1.0 - (real_b - real_a) / (tok_b - tok_a),
        }
        if self.peak_flops:  # non-pad tokens of this device
            metrics["train/mfu"] = self.flops_per_token * (real_b - real_a) / (t_b - t_a) / self.peak_flops
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=mask.shape[0])

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._sync(trainer)
            self._val_t0 = time.perf_counter()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and hasattr(self, "_val_t0"):
            self._sync(trainer)
            self._paused += time.perf_counter() - self._val_t0


# -- checkpoints that survive ---------------------------------------------------------------------


class PeriodicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` every ``every_n_train_steps`` optimizer steps whose ``last.ckpt`` is current
    whenever training stops.

    Lightning writes ``last`` with every periodic checkpoint but, when training ends, only if it
    never wrote one before: a run of 600 steps checkpointed every 200 would end with ``last`` at a
    step it already had. This also writes ``last`` at the end of training (and so after a
    signal stop) whenever the newest checkpoint is older than the current step.
    ``save_top_k``: -1 keeps every step checkpoint, 1 only the newest. (No ``monitor``: with one,
    Lightning defers a save due at an epoch's last batch to the next validation, under a later
    step's name.)
    """

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int,
        save_top_k: int = -1,
        filename: str = "{step:06d}",
        save_last: bool = True,
    ) -> None:
        if save_top_k not in (-1, 1):
            raise ValueError(
                f"callbacks.checkpoint.save_top_k={save_top_k!r} must be -1 (keep every step checkpoint) "
                "or 1 (only the newest)"
            )
        if int(every_n_train_steps) != every_n_train_steps or every_n_train_steps < 1:
            raise ValueError(
                f"callbacks.checkpoint.every_n_train_steps={every_n_train_steps!r} must be a whole number >= 1"
            )
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            save_top_k=save_top_k,
            every_n_train_steps=int(every_n_train_steps),
            save_last=save_last,
            save_on_train_epoch_end=False,
        )

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's own rule (write `last` only if none was written) leaves it stale
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class BestCheckpoint(ModelCheckpoint):
    """``best.ckpt``: the checkpoint of the best validation, by ``monitor`` (lower is better).

    monitor: a logged metric; ``None`` picks the objective's own NLL (``val/nll_bound`` for the
    diffusion objective, ``val/ar_sft_nll`` for ``objective=ar``), which is known at ``setup``.
    """

    def __init__(self, dirpath: str, monitor: str | None = None, filename: str = "best") -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode="min",
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
        self._monitor_from_module = monitor is None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._monitor_from_module:
            self.monitor = VAL_METRICS[pl_module.objective.role]
        super().setup(trainer, pl_module, stage)


class Interrupted(Exception):
    """A signal stopped training after its checkpoint was written; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, step: int, path: str | None) -> None:
        self.signum, self.step, self.path = signum, step, path
        self.exit_code = 128 + signum
        where = f"checkpoint {path}; resume with ckpt_path={path}" if path else "no checkpoint path"
        super().__init__(f"{signal.Signals(signum).name} at optimizer step {step}: stopped, {where}")


class StopOnSignal(L.Callback):
    """SIGTERM (SLURM preemption, ``docker stop``, ``kill``) and SIGINT (Ctrl+C) stop training at the
    next optimizer-step boundary, write ``path`` and end the run with exit code 128 + signal.

    Lightning's own SIGTERM handling stops after any micro-batch, writes nothing unless told, and
    exits 0 (its ``SIGTERMException`` is a ``SystemExit`` without a code), so a scheduler records a
    success. This replaces Lightning's SIGTERM handler while training runs (Lightning restores the
    original handlers when ``fit`` ends) and decides with all ranks at each step boundary (one
    boolean all-reduce), so every rank stops after the same step. The checkpoint is taken at the
    step boundary, where a resume is exact (no half-accumulated gradient is lost). A second SIGINT
    falls back to Python's KeyboardInterrupt (Lightning then exits 1 without a checkpoint).

    Under SLURM, requeueing is Lightning's alone (``SLURMEnvironment``: USR1 before the time
    limit writes an hpc checkpoint into the run folder and requeues the job); this callback never
    requeues.
    """

    def __init__(self, path: str, signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGINT")) -> None:
        super().__init__()
        self.path = str(path)
        try:
            self.signals = [signal.Signals[name] for name in signals]
        except KeyError as err:
            raise ValueError(
                f"callbacks.signals.signals={list(signals)!r}: {err.args[0]!r} is not a signal name "
                "(use e.g. SIGTERM, SIGINT, SIGUSR2)"
            ) from None
        self.received: int | None = None
        self.stopped: Interrupted | None = None
        self._previous: dict[int, Any] = {}
        self._last_step = -1

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: out now
        self.received = signum
        print(
            f"\n{signal.Signals(signum).name} received: stopping after the current optimizer step",
            file=sys.stderr,
            flush=True,
        )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self.stopped, self._last_step = None, None, trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped, self._last_step = trainer.global_step != self._last_step, trainer.global_step
        if not stepped:
            return  # mid-accumulation: a checkpoint here would lose the partial gradient
        local = self.received is not None
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        signum = trainer.strategy.broadcast(self.received if local else signal.SIGTERM)
        trainer.save_checkpoint(self.path)
        self.stopped = Interrupted(int(signum), trainer.global_step, self.path)
        trainer.should_stop = True

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.received is not None and self.stopped is None:  # came after the last step boundary
            trainer.save_checkpoint(self.path)
            self.stopped = Interrupted(self.received, trainer.global_step, self.path)
        self._restore()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# -- numerics -------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard(L.Callback):
    """Skips every optimizer step whose loss or gradient is not finite; stops after
    ``max_consecutive`` such steps in a row.

    Runs in ``on_before_optimizer_step``, after the backward of the step's last micro-batch (and
    DDP's gradient all-reduce) and before the update: if the step's loss (the module's
    ``normaliser`` sums, every rank) or any gradient is NaN/inf, every gradient is dropped, so
    AdamW leaves the weights and its moments untouched (the step still counts toward
    ``max_steps`` and the LR schedule, as a skipped fp16 GradScaler step does). Logs
    ``train/nonfinite_steps`` (the run's total, kept in checkpoints). Costs one host sync per step.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        super().__init__()
        if int(max_consecutive) != max_consecutive or max_consecutive < 1:
            raise ValueError(
                f"callbacks.numerics.max_consecutive={max_consecutive!r} must be a whole number >= 1"
            )
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0  # steps skipped in the whole run
        self.consecutive = 0  # ... in a row, up to now

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        checks = [p.grad.isfinite().all() for p in params]
        totals = getattr(getattr(pl_module, "normaliser", None), "totals", None)
        if totals is not None:
            checks.append(totals.isfinite().all())
        local_bad = bool(checks) and not bool(torch.stack([c.to(checks[0].device) for c in checks]).all())
        bad = trainer.strategy.reduce_boolean_decision(local_bad, all=False)
        if bad:
            for p in params:
                p.grad = None
            self.skipped += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
        pl_module.log("train/nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradient (up to "
                f"step {trainer.global_step + 1}; {self.skipped} skipped in all): stopped. No checkpoint "
                "holds non-finite weights; lower optimizer.lr, check the data, or raise "
                "callbacks.numerics.max_consecutive"
            )

    @override
    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    @override
    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
