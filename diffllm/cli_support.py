"""What the command lines share (generate, evaluate, export, the benchmarks): bad-input errors,
device checks, reading ``key=???`` nodes. A library module: no CLI imports another CLI, they all
import this."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """Bad user input; a CLI prints the message (no traceback) and exits with ``EXIT_BAD_INPUT``."""


def check_device(device: str) -> None:
    """Refuse a device string torch does not know, or CUDA where there is none."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={device!r} but CUDA is not available here; pass device=cpu")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device={device!r} is not a torch device; pass device=cpu or device=cuda") from None


def is_set(cfg: DictConfig, key: str) -> bool:
    """``key`` is in ``cfg``, not ``???`` and not null."""
    return key in cfg and not OmegaConf.is_missing(cfg, key) and cfg[key] is not None


def set_keys(node: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    """The keys of a config node that were given a value: ``???`` (missing) means "keep the
    checkpoint's value" (the ``sampler.*`` node of ``conf/generate.yaml`` / ``conf/evaluate.yaml``)."""
    if not node:
        return {}
    if not isinstance(node, DictConfig):
        return {k: v for k, v in node.items() if not str(k).startswith("_") and v != "???"}
    return {k: node[k] for k in node if not str(k).startswith("_") and not OmegaConf.is_missing(node, k)}
