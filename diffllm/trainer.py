"""The ``trainer`` config node's target: a ``lightning.Trainer`` whose validation interval is in
optimizer steps.

Lightning's ``val_check_interval`` counts training batches, that is micro-batches: with
``accumulate_grad_batches=4`` an interval of 500 validates every 125 optimizer steps. The config
says ``val_every_n_steps`` (optimizer steps, the unit of ``max_steps``, the LR schedule and the
logged ``step``) and this builds the Trainer with ``val_check_interval = val_every_n_steps x
accumulate_grad_batches``.
"""

from __future__ import annotations

from typing import Any

import lightning as L


def build_trainer(
    val_every_n_steps: int | None = None, accumulate_grad_batches: int = 1, **trainer_kwargs: Any
) -> L.Trainer:
    """``lightning.Trainer(**trainer_kwargs)`` validating every ``val_every_n_steps`` optimizer steps.

    ``val_every_n_steps=None`` leaves validation to Lightning's own keys (``val_check_interval``,
    ``check_val_every_n_epoch``).
    """
    if val_every_n_steps is not None:
        if trainer_kwargs.get("val_check_interval") is not None:
            raise ValueError(
                f"trainer.val_check_interval={trainer_kwargs['val_check_interval']!r} and "
                f"trainer.val_every_n_steps={val_every_n_steps!r} both set the validation interval; "
                "keep val_every_n_steps (optimizer steps) and drop val_check_interval (micro-batches)"
            )
        if int(val_every_n_steps) != val_every_n_steps or val_every_n_steps < 1:
            raise ValueError(
                f"trainer.val_every_n_steps={val_every_n_steps!r} must be a positive whole number of "
                "optimizer steps (or null to use Lightning's val_check_interval)"
            )
        trainer_kwargs["val_check_interval"] = int(val_every_n_steps) * int(accumulate_grad_batches)
    return L.Trainer(accumulate_grad_batches=accumulate_grad_batches, **trainer_kwargs)
