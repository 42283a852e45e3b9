"""Switch a Hugging Face decoder between causal and bidirectional attention.

Two switches must agree, or one attention implementation silently stays causal:

* ``config.is_causal = False`` makes ``transformers.masking_utils.create_causal_mask`` build a
  bidirectional (padding-only) mask instead of a causal one. Eager attention only ever sees that
  mask, so this switch alone decides eager.
* ``module.is_causal = False`` on every attention module stops SDPA / flash-attention from adding
  their own causal triangle when the mask is elided (no padding -> mask is ``None``).

Both are plain attributes, so the switch is cheap and reversible at run time: ``causal_attention``
restores the AR behaviour for the base-model baseline inside a ``with`` block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask


def _configs(model: nn.Module) -> list:
    """Every config object the model's modules carry (a PEFT wrapper and its base share one)."""
    seen, out = set(), []
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict") and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
            text_cfg = getattr(cfg, "text_config", None)
            if text_cfg is not None and id(text_cfg) not in seen:
                seen.add(id(text_cfg))
                out.append(text_cfg)
    return out


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "is_causal") and isinstance(m, nn.Module)]


def set_bidirectional(model: nn.Module, bidirectional: bool = True) -> nn.Module:
    """Make every attention layer of ``model`` bidirectional (or causal again). Returns ``model``."""
    attn = _attention_modules(model)
    if not attn:
        raise ValueError(
            f"{type(model).__name__} has no attention module with an `is_causal` attribute; "
            "diffllm supports Hugging Face decoder models (LLaMA, Qwen2, Mistral, ...)."
        )
    for cfg in _configs(model):
        cfg.is_causal = not bidirectional
    for module in attn:
        module.is_causal = not bidirectional
    return model


def is_bidirectional(model: nn.Module) -> bool:
    """True when both switches say bidirectional on every config and attention module."""
    configs_ok = all(getattr(c, "is_causal", True) is False for c in _configs(model))
    modules_ok = all(m.is_causal is False for m in _attention_modules(model))
    return configs_ok and modules_ok


@contextmanager
def causal_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily restore causal attention (the AR baseline); restores the previous state."""
    was_bidirectional = is_bidirectional(model)
    set_bidirectional(model, False)
    try:
        yield model
    finally:
        set_bidirectional(model, was_bidirectional)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, Lq, Lk) bool "may attend" -> the additive float mask eager attention adds to scores."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, neg)


def block_mask(allowed: torch.Tensor):
    """(B, 1, Lq, Lk) bool -> flex attention's ``BlockMask`` (blocks with no allowed pair are skipped)."""
    dense = allowed[:, 0]  # (B, Lq, Lk)

    def mask_mod(b, h, q, kv):
        return dense[b, q, kv]

    lq, lk = dense.shape[-2:]
    return create_block_mask(mask_mod, B=dense.shape[0], H=None, Q_LEN=lq, KV_LEN=lk, device=dense.device)


def custom_attention_mask(
    allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype
) -> torch.Tensor:
    """Turn a (B, Lq, Lk) or (B, 1, Lq, Lk) boolean mask into what ``attn_implementation`` takes.

    transformers returns a 4D mask as-is, so this is how a non-standard pattern (annealing,
    block masks) reaches the kernels. SDPA takes booleans, eager an additive mask, and flex
    attention a ``BlockMask`` (a dense tensor would reach flex as a per-score ``score_mod``, with no
    block skipping). Rows that may attend to nothing (padding queries) are given their own
    diagonal so softmax never sees an all -inf row.
    """
    if allowed.dim() == 3:
        allowed = allowed[:, None]
    lq, lk = allowed.shape[-2:]
    if lq == lk:
        eye = torch.eye(lq, dtype=torch.bool, device=allowed.device)
        empty = ~allowed.any(dim=-1, keepdim=True)
        allowed = allowed | (empty & eye)
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation == "flex_attention":
        return block_mask(allowed)
    if attn_implementation == "eager":
        return additive_mask(allowed, dtype)
    raise ValueError(
        f"attention implementation {attn_implementation!r} cannot take a custom 4D mask; "
        "use model.attn_implementation=sdpa (or eager) for attention-mask annealing."
    )
