"""Samplers of the diffusion time t in [eps, 1] for a batch.

The ELBO weight grows like 1/t near 0, so t is clamped below at eps to keep the loss finite.
Each sampler is called as ``sampler(batch_size, device=..., generator=...) -> (B,)`` (validation:
one generator for the batch), or as ``sampler.keyed(keys, device=...) -> (B,)`` (training): row b's
time then comes from the "time" stream of its key (seed, optimizer step, global row index), see
``diffllm.diffusion.keys``, so it does not depend on how the global batch is split into ranks and
micro-batches.
"""

from __future__ import annotations

import torch

from diffllm.diffusion.keys import DrawKeys


def _check_eps(eps: float) -> float:
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"time eps must be in [0, 1), got {eps}")
    return float(eps)


class UniformTimeSampler:
    """t_b = eps + (1 - eps) * u_b with u_b ~ U(0, 1) i.i.d."""

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = _check_eps(eps)

    def __call__(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        u = torch.rand(batch_size, device=device, generator=generator)
        return self.eps + (1.0 - self.eps) * u

    def keyed(self, keys: DrawKeys, device: torch.device | str = "cpu") -> torch.Tensor:
        """t_b = eps + (1 - eps) * u_b, u_b the first number of row b's "time" stream."""
        u = keys.uniform("time", 1)[:, 0]
        return (self.eps + (1.0 - self.eps) * u).to(device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps})"


class AntitheticTimeSampler:
    """Stratified ("antithetic", MDLM) times: exactly one t per stratum, in random order.

        u_b = (pi(b) + v_b) / B,   v_b ~ U(0, 1) i.i.d.,   pi a random permutation of 0..B-1
        t_b = eps + (1 - eps) * u_b

    so the strata are the B equal slices of [eps, 1]. Each t_b is still marginally uniform (the
    loss stays unbiased) but the batch covers the noise levels evenly, which lowers the variance
    of the batch loss. The permutation keeps t independent of the row order (a length-sorted
    batch would otherwise give its longest rows the highest noise every step).
    """

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = _check_eps(eps)

    def __call__(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        v = torch.rand(batch_size, device=device, generator=generator)
        stratum = torch.randperm(batch_size, device=device, generator=generator)
        u = (stratum + v) / batch_size
        return self.eps + (1.0 - self.eps) * u

    def keyed(self, keys: DrawKeys, device: torch.device | str = "cpu") -> torch.Tensor:
        """The same stratification over the whole global batch of the optimizer step:

            u_b = (pi(row_b) + v_b) / G,   G = keys.global_batch_size

        pi: a permutation of 0..G-1 keyed on (seed, step) only, identical on every rank and
        micro-batch; v_b: the first number of row b's "time" stream. The G rows of a step hold
        one t per stratum whatever their split; a short global batch keeps every t uniform.
        """
        size = keys.global_batch_size
        stratum = torch.randperm(size, generator=keys.step_generator("time/strata"))
        rows = torch.as_tensor(list(keys.rows), dtype=torch.long)
        v = keys.uniform("time", 1)[:, 0]
        u = (stratum[rows] + v) / size
        return (self.eps + (1.0 - self.eps) * u).to(device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps})"
