"""Noise schedules of the absorbing-mask (masked) diffusion process.

A token survives to time t with probability alpha(t) and is replaced by [MASK] otherwise, with
alpha(0) = 1 (clean) and alpha(1) = 0 (all masked). The continuous-time ELBO (MDLM, Sahoo et al.
2024) weighs the cross-entropy of a hidden token by

    w(t) = -alpha'(t) / (1 - alpha(t)).

Each schedule is a small class exposing exactly those quantities.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class NoiseSchedule(ABC):
    """alpha(t), its derivative, the mask probability 1 - alpha(t) and the ELBO weight."""

    @abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is still clean at time t."""

    @abstractmethod
    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        """d alpha / dt (non-positive)."""

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """Probability 1 - alpha(t) that a token is hidden at time t."""
        return 1.0 - self.alpha(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """ELBO weight w(t) = -alpha'(t) / (1 - alpha(t))."""
        return -self.alpha_prime(t) / self.mask_prob(t).clamp_min(torch.finfo(t.dtype).tiny)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearSchedule(NoiseSchedule):
    """alpha(t) = 1 - t, so w(t) = 1 / t (LLaDA, MDLM's linear case)."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.ones_like(t)
