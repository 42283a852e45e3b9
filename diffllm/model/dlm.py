"""The diffusion view of a (bidirectional, LoRA-adapted) causal LM.

With ``shift=True`` (DiffuLLaMA, Dream) the prediction for token i is read from the hidden state
at position i - 1, exactly as the AR head was trained; with ``shift=False`` position i predicts
itself. Logits are computed only where they are needed: a full (tokens x 128k) fp32 logits
tensor costs ~0.5 MB per token.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from diffllm.model.attention import causal_attention, custom_attention_mask


def source_positions(targets: torch.Tensor, shift: bool) -> torch.Tensor:
    """Boolean (B, L) mask of the hidden states that predict the ``targets`` positions.

    With shift, position i is predicted from i - 1; the first position has no source and must
    never be a target (it is always a prompt token).
    """
    if not shift:
        return targets
    if targets[:, 0].any():
        raise ValueError("with shift=True position 0 cannot be predicted; it must be a prompt token")
    return torch.cat([targets[:, 1:], torch.zeros_like(targets[:, :1])], dim=1)


def align(logits: torch.Tensor, shift: bool) -> torch.Tensor:
    """(B, L, V) raw logits -> (B, L, V) predictions where [:, i] predicts token i."""
    if not shift:
        return logits
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


class DiffusionLM(nn.Module):
    """Wraps a Hugging Face causal LM (optionally a PeftModel) for masked-diffusion use.

    ``prefix_lm=True``: prompt positions attend to the prompt only (bidirectionally), never to the
    answer canvas; canvas positions attend to everything (a prefix-LM mask over the bidirectional
    model). The prompt's keys/values then never depend on the canvas, as in the AR model, so a
    prefix KV cache of the prompt is exact. Callers mark the canvas with ``canvas=`` (B, L_keys) in
    ``hidden_states`` / ``logits_at``; without it (the AR path, ``ar_nll``) nothing changes.
    """

    def __init__(self, model: nn.Module, mask_id: int, shift: bool = False, prefix_lm: bool = False) -> None:
        super().__init__()
        self.model = model
        self.mask_id = int(mask_id)
        self.shift = bool(shift)
        self.prefix_lm = bool(prefix_lm)

    @property
    def base(self) -> nn.Module:
        """The underlying ``*ForCausalLM`` (through a PEFT wrapper if there is one)."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    @property
    def lm_head(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        canvas: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """(B, L, H) final hidden states of the decoder (LoRA layers included).

        ``canvas`` (B, L_keys) bool marks the answer-canvas positions over all keys (a KV cache's
        positions first, then ``input_ids``); it matters only with ``prefix_lm``.
        """
        if self.prefix_lm and canvas is not None:
            attention_mask = self.prefix_lm_mask(attention_mask, canvas, input_ids.shape[1])
        out = self.base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.last_hidden_state

    def prefix_lm_mask(
        self, attention_mask: torch.Tensor | None, canvas: torch.Tensor, num_queries: int
    ) -> torch.Tensor:
        """(B, Lk) padding mask + canvas -> the (B, 1, Lq, Lk) mask where prompt queries skip the canvas.

        allowed[b, i, j] = key_ok[b, j] and (canvas[b, i] or not canvas[b, j]); the queries are
        the last ``num_queries`` keys.
        """
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "model.prefix_lm builds its own 4D mask from the (B, L) padding mask and cannot be "
                "combined with another 4D mask (attention annealing); set anneal=none or model.prefix_lm=false"
            )
        canvas = canvas.bool()
        key_ok = canvas.new_ones(canvas.shape) if attention_mask is None else attention_mask.bool()
        query_canvas = canvas[:, -num_queries:]  # (B, Lq)
        allowed = key_ok[:, None, :] & (query_canvas[:, :, None] | ~canvas[:, None, :])  # (B, Lq, Lk)
        return custom_attention_mask(allowed, self.base.config._attn_implementation, self.base.dtype)

    def merged_copy(self) -> DiffusionLM:
        """A DiffusionLM over a copy of the model with its LoRA adapters merged into the weights.

        Plain linear layers: what an exported merged folder holds and a deployment runs. This model
        stays unmerged (merging in place and unmerging would not give back the exact weights). A
        model without PEFT adapters is returned as is.
        """
        if not callable(getattr(self.model, "merge_and_unload", None)):
            return self
        merged = copy.deepcopy(self.model).merge_and_unload()  # module is_causal flags are copied too
        return DiffusionLM(merged, mask_id=self.mask_id, shift=self.shift, prefix_lm=self.prefix_lm)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        canvas: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L, V) aligned logits: [:, i] is the prediction for token i."""
        return align(self.lm_head(self.hidden_states(input_ids, attention_mask, canvas)), self.shift)

    def logits_at(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        canvas: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, V) predictions for the N True positions of ``targets`` (B, L), in row-major order."""
        if hidden is None:
            hidden = self.hidden_states(input_ids, attention_mask, canvas)
        return self.lm_head(hidden[source_positions(targets, self.shift)])


@contextmanager
def ar_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The original AR model inside a ``with`` block: LoRA adapters off, causal attention back.

    ``model`` is the HF causal LM or its PeftModel wrapper (``DiffusionLM.model``). The [MASK]
    row added to the embedding is never an input of the AR model, so it changes nothing here.
    """
    disable = getattr(model, "disable_adapter", None)
    with disable() if callable(disable) else nullcontext(), causal_attention(model):
        yield model
