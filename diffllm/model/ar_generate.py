"""The autoregressive baseline: the ORIGINAL model (LoRA off, causal attention) with a KV cache.

This is what the diffusion sampler is measured against for speed (forward passes) and quality.
Generation is Hugging Face ``generate`` on a left-padded batch: greedy when ``temperature == 0``,
otherwise sampling from softmax(logits / temperature) (optionally top-k / top-p filtered).
One forward pass prefills the prompts; each further token costs one more (cached) pass, and the
batch stops once every row has produced EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig

from diffllm.data.collate import left_pad, truncate_at_eos
from diffllm.model.attention import causal_attention
from diffllm.model.dlm import ar_mode


@dataclass
class ARSampleOutput:
    """Answers truncated at the first EOS (EOS removed), whether each produced its EOS, forward passes."""

    tokens: list[list[int]]
    nfe: int
    ended: list[bool] | None = None  # row produced EOS within max_new_tokens


def _hf_model(model: nn.Module) -> tuple[nn.Module, list[int]]:
    """The HF / PEFT model inside ``model`` and the ids it must never emit ([MASK] of a DiffusionLM)."""
    inner = getattr(model, "model", None)
    if hasattr(model, "mask_id") and isinstance(inner, nn.Module):  # a DiffusionLM
        return inner, [int(model.mask_id)]
    return model, []


@torch.no_grad()
def ar_generate(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int | None,
    temperature: float = 0.0,
    seed: int = 0,
    top_k: int | None = None,
    top_p: float | None = None,
    adapters: bool = False,
) -> ARSampleOutput:
    """Generate up to ``max_new_tokens`` after each prompt with the original AR model.

    ``model`` is the HF causal LM, its PeftModel wrapper, or a ``DiffusionLM`` (its ``.model`` is
    used and its [MASK] id suppressed). Inside the call adapters are disabled and attention is
    causal (``ar_mode``); both are restored afterwards. Sampling uses a forked RNG seeded with
    ``seed``, so the global RNG state is left untouched. ``pad_id`` None means ``eos_id``.
    ``adapters=True`` keeps the LoRA adapters on (causal attention still): an AR-SFT model.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    pad_id = eos_id if pad_id is None else pad_id
    hf_model, banned = _hf_model(model)
    get_base = getattr(hf_model, "get_base_model", None)
    causal_lm = get_base() if callable(get_base) else hf_model
    device = next(hf_model.parameters()).device

    input_ids, attention_mask = left_pad(prompts, pad_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    sample = temperature > 0
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else 1.0,
        top_k=(top_k or 0) if sample else None,
        top_p=(top_p if top_p is not None else 1.0) if sample else None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        suppress_tokens=banned or None,
        use_cache=True,
    )

    calls = 0

    def count(*_: object) -> None:
        nonlocal calls
        calls += 1

    hook = causal_lm.register_forward_pre_hook(count)
    was_training = hf_model.training
    hf_model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        mode = causal_attention(hf_model) if adapters else ar_mode(hf_model)
        with mode, torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = hf_model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config
            )  # (B, P + T)
    finally:
        hook.remove()
        hf_model.train(was_training)
    new = out[:, input_ids.shape[1] :].tolist()
    return ARSampleOutput(
        tokens=[truncate_at_eos(r, eos_id) for r in new], nfe=calls, ended=[eos_id in r for r in new]
    )
