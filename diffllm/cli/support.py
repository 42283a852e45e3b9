"""What the command lines share: reading ``key=???`` nodes (keep the checkpoint's value). No CLI
imports another CLI; they all import this. Bad-input errors and device checks are
``diffllm.inference.inputs`` (the library raises them too)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf


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
