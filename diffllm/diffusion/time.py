"""Samplers of the diffusion time t in [eps, 1] for a batch.

The ELBO weight grows like 1/t near 0, so t is clamped below at eps to keep the loss finite.
"""

from __future__ import annotations

import torch


class UniformTimeSampler:
    """t_b = eps + (1 - eps) * u_b with u_b ~ U(0, 1) i.i.d."""

    def __init__(self, eps: float = 1e-3) -> None:
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"time eps must be in [0, 1), got {eps}")
        self.eps = eps

    def __call__(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        u = torch.rand(batch_size, device=device, generator=generator)
        return self.eps + (1.0 - self.eps) * u
