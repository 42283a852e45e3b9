"""Noise schedules of the absorbing-mask (masked) diffusion process.

A token survives to time t with probability alpha(t) and is replaced by [MASK] otherwise, with
alpha(0) = 1 (clean) and alpha(1) ~ 0 (all masked). The continuous-time ELBO (MDLM, Sahoo et al.
2024) weighs the cross-entropy of a hidden token by

    w(t) = -alpha'(t) / (1 - alpha(t)).

Each schedule is a small class exposing exactly those quantities. Substituting a = alpha(t) shows
that the ELBO itself does not depend on the schedule (only on alpha(0) and alpha(1)); the schedule
changes the variance of its Monte-Carlo estimate and which noise levels training sees most.
"""

from __future__ import annotations

import math
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


class CosineSchedule(NoiseSchedule):
    """alpha(t) = cos(pi t / 2), alpha'(t) = -(pi / 2) sin(pi t / 2).

    w(t) = (pi / 2) sin(pi t / 2) / (1 - cos(pi t / 2)) = (pi / 2) / tan(pi t / 4)  (~ 2 / t near 0).
    """

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(0.5 * math.pi * t)

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        # the closed form avoids the cancellation in 1 - cos(pi t / 2) at small t
        return 0.5 * math.pi / torch.tan(0.25 * math.pi * t).clamp_min(torch.finfo(t.dtype).tiny)


class LogLinearSchedule(NoiseSchedule):
    """MDLM's log-linear noise: sigma(t) = -log(1 - (1 - eps) t), alpha(t) = exp(-sigma(t)), i.e.

        alpha(t) = 1 - (1 - eps) t,   alpha'(t) = -(1 - eps),   w(t) = 1 / t.

    It is the linear schedule stopped at alpha(1) = eps instead of 0, so that sigma(1) stays finite.
    """

    def __init__(self, eps: float = 1e-3) -> None:
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"log-linear eps must be in [0, 1), got {eps}")
        self.eps = float(eps)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - (1.0 - self.eps) * t

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -(1.0 - self.eps))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps})"


class PolynomialSchedule(NoiseSchedule):
    """alpha(t) = 1 - t^p, alpha'(t) = -p t^(p-1), w(t) = p / t.

    p = 1 is the linear schedule; p > 1 keeps more tokens visible at small t, p < 1 fewer.
    """

    def __init__(self, exponent: float = 2.0) -> None:
        if not exponent > 0.0:
            raise ValueError(f"polynomial schedule exponent must be > 0, got {exponent}")
        self.exponent = float(exponent)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t**self.exponent

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        return -self.exponent * t ** (self.exponent - 1.0)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        # closed form p / t: exact where 1 - alpha = t^p underflows
        return self.exponent / t.clamp_min(torch.finfo(t.dtype).tiny)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(exponent={self.exponent})"
