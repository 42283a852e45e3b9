"""Attention-mask annealing from causal to bidirectional (DiffuLLaMA).

Over the first ``steps`` optimizer steps the model sees a mix of the causal attention it was
pretrained with and the bidirectional attention it is converted to. At progress p = step / steps:

    allowed[b, i, j] = key_ok[b, j] and (j <= i or u[b, i, j] < p),   u ~ U(0, 1) i.i.d.

i.e. the causal part is always visible, each future key (j > i) is visible with probability p,
sampled independently per row and query-key pair (shared by all layers and heads, as in
DiffuLLaMA, which also shares it across the batch), and padding keys are never visible.
p = 0 is the causal model, p = 1 the bidirectional one.

Once annealing is over (or with steps = 0) the 2D padding mask is returned unchanged, so the
model's own (bidirectional) mask creation runs and SDPA keeps its fast path; during annealing a
4D mask is built, which transformers passes to the kernels untouched. The model must already be
bidirectional (``set_bidirectional``): the 4D mask decides attention only while it is passed.
"""

from __future__ import annotations

import torch

from diffllm.model.attention import custom_attention_mask


class AttentionAnnealing:
    """Causal -> bidirectional attention over ``steps`` optimizer steps (0: no annealing)."""

    def __init__(self, steps: int = 0) -> None:
        if steps < 0:
            raise ValueError(f"annealing steps must be >= 0, got {steps}")
        self.steps = int(steps)

    def progress(self, step: int) -> float:
        """p = step / steps in [0, 1]: the probability that a future key is visible."""
        if self.steps == 0:
            return 1.0
        return min(max(step, 0) / self.steps, 1.0)

    def active(self, step: int) -> bool:
        """True while a 4D annealing mask is in use (0 <= step < steps)."""
        return step < self.steps

    def mask(
        self,
        attention_mask: torch.Tensor,
        step: int,
        attn_implementation: str,
        dtype: torch.dtype,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, L) padding mask -> the mask to pass as ``attention_mask`` at optimizer step ``step``.

        Unchanged (the same tensor) when annealing is off or over; otherwise a (B, 1, L, L) mask in
        the form ``attn_implementation`` takes (bool for sdpa/flex, additive ``dtype`` for eager).
        """
        if not self.active(step):
            return attention_mask
        key_ok = attention_mask.bool()  # (B, L)
        batch_size, length = key_ok.shape
        p = self.progress(step)
        idx = torch.arange(length, device=key_ok.device)
        causal = idx[None, :] <= idx[:, None]  # (L, L): key j <= query i
        u = torch.rand(batch_size, length, length, device=key_ok.device, generator=generator)
        allowed = (causal | (u < p)) & key_ok[:, None, :]  # (B, Lq, Lk)
        return custom_attention_mask(allowed, attn_implementation, dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps})"
