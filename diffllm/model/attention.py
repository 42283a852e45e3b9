"""Attention of the diffusion model: the causal/bidirectional switches and the one mask builder.

Modes (``model.attention``, ``ATTENTION_MODES``), as a boolean "may attend" pattern over a
query i and a key j, given the answer canvas (``canvas_mask``, True on answer positions):

    causal         j <= i
    bidirectional  always
    prefix_lm      canvas_mask[i] or not canvas_mask[j]   (the prompt never sees the canvas; the canvas sees all)
    block_causal   the prompt causal; answer blocks of ``block_size``: the block being denoised (the
                   last key's) sees the prompt, the earlier (clean) blocks and itself; a clean block
                   sees the prompt and the clean blocks up to itself, its own block whole
                   (``clean_stream="block"``) or up to each token (``"causal"``; ``diffllm.model.blocks``)

``may_attend`` builds the whole (B, Lq, Lk) pattern in one place: padding AND the mode AND an
optional extra constraint (attention-mask annealing's draw); ``custom_attention_mask`` converts it
once into what the attention implementation takes (sdpa bool, eager additive, flex BlockMask).
``DiffusionLM.hidden_states`` keeps the model's own fast path where there is nothing to build:
``causal`` and ``bidirectional`` without an extra constraint pass the (B, L) padding mask to
transformers with the two switches below set accordingly (``NATIVE_MODES``).

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

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask

from diffllm.model.blocks import block_causal_pattern


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
def attention_switch(model: nn.Module, causal: bool) -> Iterator[nn.Module]:
    """Both switches set to causal (or bidirectional) inside a ``with`` block; restores the previous state."""
    flags = [getattr(c, "is_causal", True) for c in _configs(model)]
    flags += [m.is_causal for m in _attention_modules(model)]
    if all(f is causal for f in flags):  # already there: nothing to flip or restore
        yield model
        return
    was_bidirectional = is_bidirectional(model)
    set_bidirectional(model, not causal)
    try:
        yield model
    finally:
        set_bidirectional(model, was_bidirectional)


def causal_attention(model: nn.Module):
    """Temporarily restore causal attention (the AR baseline); restores the previous state."""
    return attention_switch(model, causal=True)


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
        f"attention implementation {attn_implementation!r} cannot take a custom 4D mask (needed by "
        "model.attention=prefix_lm and by attention-mask annealing); use model.attn_implementation=sdpa "
        "(or eager, flex_attention)"
    )


# -- attention modes ------------------------------------------------------------------------------
def causal_pattern(num_queries: int, num_keys: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(Lq, Lk) bool, key j <= query i, where the queries are the last ``num_queries`` keys (a KV cache's
    keys come first)."""
    q = torch.arange(num_keys - num_queries, num_keys, device=device)
    return torch.arange(num_keys, device=device)[None, :] <= q[:, None]


def _causal(canvas_mask: torch.Tensor, num_queries: int, **_: Any) -> torch.Tensor:
    return causal_pattern(num_queries, canvas_mask.shape[1], canvas_mask.device)[None]  # (1, Lq, Lk)


def _bidirectional(canvas_mask: torch.Tensor, num_queries: int, **_: Any) -> torch.Tensor:
    return canvas_mask.new_ones(1, num_queries, canvas_mask.shape[1])  # (1, Lq, Lk)


def _prefix_lm(canvas_mask: torch.Tensor, num_queries: int, **_: Any) -> torch.Tensor:
    query_canvas = canvas_mask[:, -num_queries:]  # (B, Lq)
    return query_canvas[:, :, None] | ~canvas_mask[:, None, :]  # (B, Lq, Lk)


def _block_causal(
    canvas_mask: torch.Tensor,
    num_queries: int,
    block_size: int | None = None,
    clean_stream: str = "block",
    **_: Any,
) -> torch.Tensor:
    if block_size is None:
        raise ValueError("model.attention=block_causal needs model.block_size (e.g. 4)")
    return block_causal_pattern(canvas_mask, num_queries, block_size, clean_stream)  # (B, Lq, Lk)


# mode -> fn(canvas_mask (B, Lk) bool, num_queries, **options) -> "may attend" (B or 1, Lq, Lk) bool,
# padding left out (``may_attend`` adds it). A new mode (block_causal) is one more entry here; its
# options (block_size, clean_stream) come from ``DiffusionLM.attention_options``.
ATTENTION_MODES: dict[str, Callable[..., torch.Tensor]] = {
    "causal": _causal,
    "bidirectional": _bidirectional,
    "prefix_lm": _prefix_lm,
    # the prompt causal, answer blocks of block_size: a block sees the clean blocks before it and
    # itself (diffllm.model.blocks; trained on the two-copy layout, DiffusionLM.noised_logits)
    "block_causal": _block_causal,
}

# Modes the model builds itself from a (B, L) padding mask, with the value of the ``is_causal``
# switches they need: no 4D mask, and SDPA keeps its fast path.
NATIVE_MODES: dict[str, bool] = {"causal": True, "bidirectional": False}


def check_attention_mode(attention: str) -> str:
    """``attention`` if it names a mode, else a ValueError listing the modes."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"model.attention={attention!r} is not one of {sorted(ATTENTION_MODES)}")
    return attention


def attention_mode(attention: str | None = None, prefix_lm: bool | None = None) -> str:
    """The attention mode of a model config, an old one included.

    Configs, checkpoints and export cards written before ``model.attention`` carry
    ``prefix_lm: true/false``: true reads as ``prefix_lm``, false as ``bidirectional`` (with a
    FutureWarning). Neither key: ``bidirectional``, the old default. Both: they must agree.
    """
    if prefix_lm is not None:
        old = "prefix_lm" if prefix_lm else "bidirectional"
        if attention is not None and attention != old:
            raise ValueError(
                f"model.prefix_lm={prefix_lm} and model.attention={attention!r} disagree; "
                "drop model.prefix_lm (deprecated) and set model.attention only"
            )
        warnings.warn(
            f"model.prefix_lm={prefix_lm} is deprecated; read as model.attention={old!r} "
            "(write model.attention instead)",
            FutureWarning,
            stacklevel=2,
        )
        attention = old
    return check_attention_mode(attention or "bidirectional")


def attention_of(node: Mapping[str, Any]) -> str:
    """``attention_mode`` of a model config node or an export card (``attention`` / old ``prefix_lm``)."""
    return attention_mode(node.get("attention"), node.get("prefix_lm"))


def may_attend(
    attention: str,
    key_ok: torch.Tensor,
    canvas_mask: torch.Tensor | None,
    num_queries: int,
    *,
    extra: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """Every attention constraint as one (B, Lq, Lk) boolean "query i may attend to key j".

        allowed[b, i, j] = key_ok[b, j]  and  mode(canvas_mask)[b, i, j]  and  extra[b, i, j]

    key_ok:      (B, Lk) bool, the real (non-padding) keys; a KV cache's keys come first
    canvas_mask:      (B, Lk) bool, the answer canvas over the same keys (None: no canvas, so
                 ``prefix_lm`` is plain bidirectional)
    num_queries: Lq, the queries being the last Lq keys
    extra:       (B, Lq, Lk) bool or None, ANDed in (attention-mask annealing's draw,
                 ``AttentionAnnealing.visible``)
    options:     passed to the mode's function (``ATTENTION_MODES``)
    """
    key_ok = key_ok.bool()
    canvas_mask = torch.zeros_like(key_ok) if canvas_mask is None else canvas_mask.bool()
    if canvas_mask.shape != key_ok.shape:
        raise ValueError(
            f"canvas {tuple(canvas_mask.shape)} and padding mask {tuple(key_ok.shape)} differ in shape"
        )
    allowed = ATTENTION_MODES[check_attention_mode(attention)](canvas_mask, num_queries, **options)
    allowed = allowed & key_ok[:, None, :]  # (B, Lq, Lk)
    if extra is not None:
        allowed = allowed & extra
    return allowed
