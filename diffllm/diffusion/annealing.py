"""Attention-mask annealing from causal to bidirectional (DiffuLLaMA).

Over the first ``steps`` optimizer steps the model sees a mix of the causal attention it was
pretrained with and the attention it is converted to (``model.attention``). At progress
p = step / steps, annealing lets query i see key j when

    visible[b, i, j] = j <= i  or  u[b, i, j] < p,        u ~ U[0, 1) i.i.d.,

i.e. the causal part is always visible and each future key (j > i) with probability p, drawn
independently per row and query-key pair (shared by all layers and heads, as in DiffuLLaMA, which
also shares it across the batch). ``visible`` is ANDed with the mode's own pattern and the padding
(``diffllm.model.attention.may_attend``):

    allowed = key_ok[b, j]  and  mode[b, i, j]  and  (j <= i  or  u[b, i, j] < p)

so p = 0 gives causal AND mode AND padding, p = 1 (u < 1 always) gives mode AND padding: with
``prefix_lm`` the prompt never sees the canvas at any p, and the canvas gains its future keys (the
canvas after it) as p grows; with ``bidirectional`` it is DiffuLLaMA's annealing.

Once annealing is over (or with steps = 0) ``visible`` is None: no extra constraint, and a native
mode keeps the model's own mask creation and SDPA's fast path. The draws come from ``generator``
(validation: the validation generator, so two validation passes are equal) or, in training, from
per-row keys: row b's u is drawn by a generator on the batch's device seeded with
``key_seed(seed, step, row, "anneal")`` (reproducible on resume and across batch cuts; unlike the
time and mask draws, the numbers depend on the padded length and the device).
"""

from __future__ import annotations

import torch

from diffllm.diffusion.keys import DrawKeys, key_seed
from diffllm.model.attention import causal_pattern


class AttentionAnnealing:
    """Causal -> ``model.attention`` over ``steps`` optimizer steps (0: no annealing)."""

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
        """True while annealing constrains attention (0 <= step < steps)."""
        return step < self.steps

    def visible(
        self,
        batch_size: int,
        length: int,
        step: int,
        *,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        keys: DrawKeys | None = None,
    ) -> torch.Tensor | None:
        """(B, L, L) bool: the keys annealing lets each query see at optimizer step ``step``; None when off.

        The draws come from ``keys`` (row b: its own keyed generator) or else from ``generator``
        (None: the global RNG).
        """
        if not self.active(step):
            return None
        p = self.progress(step)
        if keys is not None:
            if len(keys.rows) != batch_size:
                raise ValueError(f"{len(keys.rows)} draw keys for a batch of {batch_size} rows")
            u = torch.stack(
                [
                    torch.rand(
                        length,
                        length,
                        device=device,
                        generator=torch.Generator(device=device).manual_seed(
                            key_seed(keys.seed, keys.step, row, "anneal")
                        ),
                    )
                    for row in keys.rows
                ]
            )
        else:
            u = torch.rand(batch_size, length, length, device=device, generator=generator)
        return causal_pattern(length, length, device)[None] | (u < p)  # (B, L, L)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps})"
