"""Training callbacks of the ``callbacks`` config group that Lightning does not ship.

Checkpoints that survive: ``PeriodicCheckpoint`` (every N optimizer steps, and ``last.ckpt``
current whenever training stops), ``BestCheckpoint`` (``best.ckpt`` by the objective's own
validation NLL), ``StopOnSignal`` (SIGTERM/SIGINT/SIGUSR1: checkpoint at the end of the current
step, exit 128 + signal; SIGUSR1 requeues the SLURM job), ``NonFiniteGuard`` (a NaN/inf step is
skipped and counted; N in a row stop the run). Every checkpoint is written at the end of an
optimizer step (``StepEnd``: after its validation, if one follows it), where a resume equals the
uninterrupted run, and goes through the Trainer's ``diffllm.training.trainer.AtomicCheckpointIO``.

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

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
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
    the logging points, so the counters cost no stall. Checkpoints hold the token counts of the
    window, so a resumed run logs the uninterrupted run's ``train/pad_frac``; its rates are measured
    from the resume on (wall clock belongs to the process). ``peak_flops``: the device's peak FLOP/s
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
        # (time or None, tokens, non-pad tokens) at each logging point; None: before a resume
        self._points: deque[tuple[float | None, int, int]] = deque([(0.0, 0, 0)], maxlen=self.window + 1)
        self._anchor = (0.0, 0, 0)  # where this process's clock starts
        restored, self._restored = getattr(self, "_restored", None), None
        if restored is not None:  # a resumed run: the window's counts go on, its clock starts now
            self._tokens, self._nonpad = int(restored["tokens"]), int(restored["nonpad"])
            self._points.clear()
            self._points.extend((None, int(tok), int(real)) for tok, real in restored["points"])
            self._anchor = (0.0, self._tokens, self._nonpad)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The token counts (not the times): a resumed run logs the same ``train/pad_frac``; its rates
        start with its own clock."""
        if not hasattr(self, "_points"):
            return {}
        return {
            "tokens": self._tokens,
            "nonpad": int(self._nonpad),
            "points": [(tok, real) for _, tok, real in self._points],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict or None

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
        if tok_b <= tok_a or (t_a is not None and t_b <= t_a):
            return
        pad_frac = 1.0 - (real_b - real_a) / (tok_b - tok_a)
        if t_a is None:  # the window reaches back before a resume: its rates start at the resume
            t_a, tok_a, real_a = self._anchor
        metrics = {}
        if t_b > t_a and tok_b > tok_a:
            world = trainer.world_size
            metrics["train/tokens_per_sec"] = (tok_b - tok_a) / (t_b - t_a) * world  # this device x ranks
            metrics["train/nonpad_tokens_per_sec"] = (real_b - real_a) / (t_b - t_a) * world
        metrics["train/pad_frac"] = pad_frac
        if self.peak_flops and t_b > t_a:  # non-pad tokens of this device
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


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after the training batch that just ended.

    Call it from ``on_train_batch_end``. It asks the training loop's own rule
    (``_TrainingEpochLoop._should_check_val_fx``: ``val_check_interval`` in micro-batches, the pass's
    last batch, ``check_val_every_n_epoch``), which the loop asks again a moment later, before it
    validates; a validation the loop skips after a restart does not count.
    """
    loop = trainer.fit_loop.epoch_loop
    return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher)) and not loop._skip_next_val


class StepEnd:
    """The end of an optimizer step: where a checkpoint is written, so that a resume from it is exact.

    A step ends after its last micro-batch (``on_train_batch_end`` once ``global_step`` has moved),
    unless Lightning validates right after that batch: then it ends after the validation
    (``on_validation_end``). A checkpoint taken between the step and its validation would lose the
    validation: Lightning counts it as done when it resumes from such a checkpoint, so the resumed
    run would log no metrics and samples for it and ``best.ckpt`` would never see it. Mid-window
    micro-batches (gradient accumulation) are never a step end: a checkpoint there would lose the
    half-accumulated gradient. Every checkpoint callback of the project calls this one rule
    (``PeriodicCheckpoint``, ``StopOnSignal``; ``BestCheckpoint`` saves after validations anyway).
    """

    def __init__(self) -> None:
        self._step: int | None = None
        self._after_validation = False

    def start(self, trainer: L.Trainer) -> None:
        """At ``on_train_start``: the step the run starts from (a resumed run's checkpoint step)."""
        self._step, self._after_validation = trainer.global_step, False

    def after_batch(self, trainer: L.Trainer) -> bool:
        """At ``on_train_batch_end``: True when a step ended with this batch and no validation follows."""
        stepped, self._step = trainer.global_step != self._step, trainer.global_step
        if not stepped:
            return False
        if validation_follows(trainer):
            self._after_validation = True
            return False
        return True

    def after_validation(self, trainer: L.Trainer) -> bool:
        """At ``on_validation_end``: True when this validation closes the step that ended just before it."""
        if trainer.sanity_checking or not self._after_validation:
            return False
        self._after_validation = False
        return True


class PeriodicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` every ``every_n_train_steps`` optimizer steps, at the end of the step, whose
    ``last.ckpt`` is current whenever training stops.

    Each checkpoint is written at the end of its step (``StepEnd``: after the validation that follows
    it, if any), never between a step and its validation as Lightning's ``every_n_train_steps`` does:
    a resume from any of them equals the uninterrupted run, metrics included. ``last.ckpt`` comes
    with every periodic checkpoint and at the end of the last step (``trainer.max_steps``); when
    training ends another way, at the end of training (Lightning writes ``last`` then only if it
    never wrote one, leaving it at an older step). ``save_top_k``: -1 keeps every step
    checkpoint, 1 only the newest. (No ``monitor``: with one, Lightning defers a save due at an
    epoch's last batch to the next validation, under a later step's name.)
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
        self._step_end = StepEnd()

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._step_end.start(trainer)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # replaces Lightning's save here, which comes before the step's validation
        if self._step_end.after_batch(trainer):
            self._save_at_step_end(trainer)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)  # nothing with every_n_train_steps (epochs only)
        if self._step_end.after_validation(trainer):
            self._save_at_step_end(trainer)

    def _save_at_step_end(self, trainer: L.Trainer) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        due = trainer.global_step % self._every_n_train_steps == 0
        last_step = 0 <= trainer.max_steps <= trainer.global_step
        if not (due or last_step):
            return
        candidates = self._monitor_candidates(trainer)
        if due:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # training ended before max_steps (max_epochs, a stop): Lightning's own rule (write `last`
        # only if none was written) leaves it stale
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class BestCheckpoint(ModelCheckpoint):
    """``best.ckpt``: the checkpoint of the best validation, by ``monitor`` (lower is better).

    monitor: a logged metric; ``None`` picks the objective's own NLL (``val/nll_bound`` for the
    diffusion objective, ``val/ar_sft_nll`` for ``objective=ar``), which is known at ``setup``.
    Written after the validation (``on_validation_end``), the end of its step: a resume from it is exact.
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


# -- signals and SLURM requeue --------------------------------------------------------------------

REQUEUE_PREFIX = "hpc_ckpt_"  # Lightning's name for a requeue checkpoint in the run folder


def requeue_checkpoints(folder: str | Path) -> list[Path]:
    """The requeue checkpoints ``hpc_ckpt_<n>.ckpt`` of a run folder, oldest (lowest n) first."""
    found = []
    for path in Path(folder).glob(f"{REQUEUE_PREFIX}*.ckpt"):
        number = path.stem[len(REQUEUE_PREFIX) :]
        if number.isdigit():
            found.append((int(number), path))
    return [path for _, path in sorted(found)]


def next_requeue_checkpoint(folder: str | Path) -> Path:
    """``<folder>/hpc_ckpt_<n>.ckpt`` with n one more than the newest there (1 for the first)."""
    existing = requeue_checkpoints(folder)
    n = int(existing[-1].stem[len(REQUEUE_PREFIX) :]) + 1 if existing else 1
    return Path(folder) / f"{REQUEUE_PREFIX}{n}.ckpt"


def slurm_job_id() -> str | None:
    """This SLURM job's id as ``scontrol`` names it (``<array job>_<task>`` for an array task); None off SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_slurm_job() -> str:
    """``scontrol requeue <this job>``; returns what happened, in words, for the stop message."""
    job = slurm_job_id()
    if job is None:
        return "not requeued: not a SLURM job (no SLURM_JOB_ID)"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        return f"SLURM job {job} not requeued: scontrol is not on PATH"
    except subprocess.TimeoutExpired:
        return f"SLURM job {job} not requeued: scontrol requeue {job} did not answer in 120 s"
    if done.returncode != 0:
        return f"SLURM job {job} not requeued: scontrol requeue {job} exited {done.returncode} ({done.stderr.strip()})"
    return f"SLURM job {job} requeued: it resumes from this checkpoint in the same run folder"


class Interrupted(Exception):
    """A signal stopped training after its checkpoint was written; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, step: int, path: str | None, requeue: str | None = None) -> None:
        self.signum, self.step, self.path, self.requeue = signum, step, path, requeue
        self.exit_code = 128 + signum
        where = f"checkpoint {path}; resume with ckpt_path={path}" if path else "no checkpoint path"
        tail = f"; {requeue}" if requeue else ""
        super().__init__(f"{signal.Signals(signum).name} at optimizer step {step}: stopped, {where}{tail}")


class StopOnSignal(Checkpoint):
    """SIGTERM (SLURM preemption, ``docker stop``, ``kill``), SIGINT (Ctrl+C) and SIGUSR1 (SLURM's
    warning before the time limit) stop training at the end of the current optimizer step, write a
    checkpoint there and end the run with exit code 128 + signal (143, 130, 138); a ``requeue``
    signal also requeues the SLURM job.

    The end of the step is ``StepEnd``'s: after the step's last micro-batch, or after the validation
    that follows it (a stop at a validation step comes after that validation), the point where a
    resume is exact. The run then stops at the next batch (raising ``Interrupted`` out of ``fit``),
    so nothing of the step is lost (its metrics reach the loggers) and nothing after it runs: no
    extra validation, no second ``last.ckpt`` (Lightning's ``should_stop`` would run one validation
    more and end the epoch; a ``last.ckpt`` written after it did not resume exactly when the stop fell
    on a pass's last batch). The decision is taken with all ranks at every step end (one boolean
    all-reduce), so every rank stops after the same step. A second SIGINT falls back to Python's
    KeyboardInterrupt (Lightning then exits 1 without a checkpoint).

    ``path``: the checkpoint of a stop (``last.ckpt``). A ``requeue`` signal writes
    ``hpc_ckpt_<n>.ckpt`` in the run folder instead (``trainer.default_root_dir``; n one more than
    the newest there), then rank 0 runs ``scontrol requeue $SLURM_JOB_ID``: the requeued job starts in
    the same folder and ``diffllm.training.run.train`` resumes from the newest such file. Off SLURM
    nothing is requeued (the message says so). Lightning's own requeue (a USR1 handler that writes a
    checkpoint from inside the signal handler, mid-step) is switched off by
    ``diffllm.training.trainer.build_trainer``.

    A Lightning ``Checkpoint``, so that it runs after the other callbacks, and last of all
    (``step_end_order``): its checkpoint holds every callback's state of the step.
    """

    def __init__(
        self,
        path: str,
        signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1"),
        requeue: list[str] | tuple[str, ...] = ("SIGUSR1",),
    ) -> None:
        super().__init__()
        self.path = str(path)
        self.signals = self._parse("signals", signals)
        self.requeue = self._parse("requeue", requeue)
        stray = [s.name for s in self.requeue if s not in self.signals]
        if stray:
            raise ValueError(
                f"callbacks.signals.requeue={[s.name for s in self.requeue]!r}: {stray[0]} is not in "
                f"callbacks.signals.signals={[s.name for s in self.signals]!r}; add it there or drop it here"
            )
        self.received: int | None = None
        self.stopped: Interrupted | None = None
        self._previous: dict[int, Any] = {}
        self._step_end = StepEnd()

    @staticmethod
    def _parse(key: str, names: list[str] | tuple[str, ...]) -> list[signal.Signals]:
        try:
            return [signal.Signals[name] for name in names]
        except KeyError as err:
            raise ValueError(
                f"callbacks.signals.{key}={list(names)!r}: {err.args[0]!r} is not a signal name "
                "(use e.g. SIGTERM, SIGINT, SIGUSR1)"
            ) from None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: out now
        self.received = signum
        print(
            f"\n{signal.Signals(signum).name} received: stopping at the end of the current optimizer step",
            file=sys.stderr,
            flush=True,
        )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self.stopped = None, None
        self._step_end.start(trainer)
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.stopped is not None:  # the step that ended before this batch was the last one
            raise self.stopped

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._step_end.after_batch(trainer):
            self._stop_if_signalled(trainer)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._step_end.after_validation(trainer):
            self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        local = self.received is not None
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        self._stop(trainer, int(trainer.strategy.broadcast(self.received if local else signal.SIGTERM)))

    def _stop(self, trainer: L.Trainer, signum: int) -> None:
        """Write the stop's checkpoint (rank 0's path on every rank), requeue if asked; stop at the next batch."""
        requeue = signum in self.requeue
        path = str(next_requeue_checkpoint(trainer.default_root_dir)) if requeue else self.path
        path = trainer.strategy.broadcast(path)
        trainer.save_checkpoint(path)
        note = None
        if requeue:
            note = requeue_slurm_job() if trainer.is_global_zero else "requeued by rank 0"
        self.stopped = Interrupted(signum, trainer.global_step, path, note)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.received is not None and self.stopped is None:  # came after the last step's end
            self._stop(trainer, self.received)
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


def step_end_order(callbacks: list[L.Callback]) -> list[L.Callback]:
    """``callbacks`` reordered so that each checkpoint of a step end holds every callback's state of
    that step.

    Lightning calls the callbacks' hooks in list order, the checkpoint callbacks (``Checkpoint``)
    after the others, and a checkpoint holds each callback's state as it is when it is written: a
    callback whose hook comes later (``BestCheckpoint`` taking in the step's validation,
    ``TokenThroughput`` counting the step's tokens) would be a step behind in it. So the callbacks
    that write resume checkpoints go last: ``PeriodicCheckpoint``, then ``StopOnSignal``. A stable
    sort: the others keep their order. ``diffllm.training.trainer.build_trainer`` applies it.
    """

    def rank(callback: L.Callback) -> int:
        return (
            2 if isinstance(callback, StopOnSignal) else 1 if isinstance(callback, PeriodicCheckpoint) else 0
        )

    return sorted(callbacks, key=rank)


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
