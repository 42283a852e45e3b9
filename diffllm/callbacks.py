"""Training callbacks of the ``callbacks`` config group that Lightning does not ship.

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

import time
from collections import deque
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from torch import nn
from typing_extensions import override


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
