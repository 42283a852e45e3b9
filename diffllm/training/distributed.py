"""What makes a step's gradient independent of ranks and micro-batches (issue 10, defects 6 and 7).

``GlobalNormaliser``: the loss normaliser Z of one optimizer step, summed over its micro-batches
and ranks. Each micro-batch's backward runs on its unnormalised weighted sum S_{r,m}; Lightning
divides every micro-batch loss by k = ``accumulate_grad_batches`` and DDP averages the gradients of
the W ranks, so when the optimizer step begins the gradient is

    (1 / (k W)) sum_{r,m} grad S_{r,m}

and ``finish`` multiplies it by k W / Z, Z = sum_{r,m} count_{r,m} (one all-reduce of two numbers
per step), which leaves grad (sum_{r,m} S_{r,m} / Z): the gradient of one batch of all the step's
rows. It runs in ``on_before_optimizer_step``, before Lightning clips the gradients (and after it
unscales them under fp16).

``draw_keys``: the (seed, optimizer step, global row index) keys of a micro-batch's draws.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from diffllm.diffusion.keys import DrawKeys, global_row_index


class GlobalNormaliser:
    """Accumulates S and Z over an accumulation window; ``finish`` rescales the gradients once."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.totals: torch.Tensor | None = None  # (2,) float64 [sum of S, sum of counts], on S's device

    def add(self, weighted_sum: torch.Tensor, count: int | torch.Tensor) -> None:
        """Record one micro-batch: its numerator S and its count (kept on the device: no sync)."""
        s = weighted_sum.detach().double()
        pair = torch.stack([s, torch.as_tensor(count, device=s.device).double()])
        self.totals = pair if self.totals is None else self.totals + pair

    def finish(
        self,
        params: Iterable[torch.nn.Parameter],
        accumulate: int,
        world_size: int,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Scale the accumulated gradients by ``accumulate * world_size / Z``; returns the step's loss.

        reduce_sum: sums a tensor over the ranks (``trainer.strategy.reduce(x, reduce_op="sum")``).
        """
        if self.totals is None:
            raise RuntimeError("GlobalNormaliser.finish before any micro-batch was added")
        totals = reduce_sum(self.totals)
        total_sum, z = totals[0], totals[1].clamp_min(1)
        scale = accumulate * world_size / z  # 0-d, on the device: no host sync
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.device, p.grad.dtype))
        self.reset()
        return (total_sum / z).float()


def nominal_batch_size(loader: Any, default: int) -> int:
    """The configured rows per micro-batch of a train loader (a short last batch has fewer)."""
    for holder in (loader, getattr(loader, "batch_sampler", None)):
        size = getattr(holder, "batch_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return default


def draw_keys(
    seed: int,
    step: int,
    batch_idx: int,
    rows: int,
    micro_batch_size: int,
    accumulate: int,
    rank: int,
    world_size: int,
) -> DrawKeys:
    """Keys of the ``rows`` rows of training batch ``batch_idx`` (its micro-batch index is
    ``batch_idx % accumulate``, the window Lightning accumulates over)."""
    micro_batch_size = max(micro_batch_size, rows)
    return DrawKeys(
        seed=seed,
        step=step,
        rows=global_row_index(micro_batch_size, rows, batch_idx % accumulate, rank, world_size),
        global_batch_size=micro_batch_size * accumulate * world_size,
    )
