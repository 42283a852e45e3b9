"""The diffusion view of a (bidirectional, LoRA-adapted) causal LM.

With ``shift=True`` (DiffuLLaMA, Dream) the prediction for token i is read from the hidden state
at position i - 1, exactly as the AR head was trained; with ``shift=False`` position i predicts
itself. Logits are computed only where they are needed: a full (tokens x 128k) fp32 logits
tensor costs ~0.5 MB per token.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from diffllm.model.attention import (
    NATIVE_MODES,
    attention_switch,
    causal_attention,
    check_attention_mode,
    custom_attention_mask,
    may_attend,
)
from diffllm.model.blocks import check_clean_stream, clean_copy_sources, two_copy_layout, two_copy_sources


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

    ``attention`` (``model.attention``, see ``diffllm.model.attention``): ``bidirectional`` (every
    position sees every real position, LLaDA), ``prefix_lm`` (prompt positions attend to the prompt
    only, never to the answer canvas; canvas positions attend to everything: the prompt's
    keys/values never depend on the canvas, as in the AR model, so a prefix KV cache of the prompt
    is exact) or ``causal``. Callers mark the canvas with ``canvas_mask=`` (B, L_keys) in
    ``hidden_states`` / ``logits_at``; without it there is no canvas and ``prefix_lm`` is
    bidirectional. ``attention_options`` go to the mode's mask function: ``block_causal`` takes
    ``block_size`` and ``clean_stream`` (``block``, the default, or ``causal``: ``diffllm.model.blocks``).
    """

    def __init__(
        self,
        model: nn.Module,
        mask_id: int,
        shift: bool = False,
        attention: str = "bidirectional",
        attention_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.mask_id = int(mask_id)
        self.shift = bool(shift)
        self.attention = check_attention_mode(attention)
        self.attention_options = dict(attention_options or {})
        if self.attention == "block_causal":
            size = self.attention_options.get("block_size")
            if not isinstance(size, int) or size < 1:
                raise ValueError(
                    f"model.attention=block_causal needs model.block_size, a positive integer; got {size!r}"
                )
            check_clean_stream(self.attention_options.setdefault("clean_stream", "block"))

    @property
    def block_size(self) -> int | None:
        """The block size of a block-diffusion model (``attention == "block_causal"``), else None."""
        return self.attention_options["block_size"] if self.attention == "block_causal" else None

    @property
    def clean_stream(self) -> str | None:
        """How a block model's clean tokens attend inside their block (``block`` or ``causal``), else None."""
        return self.attention_options["clean_stream"] if self.attention == "block_causal" else None

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
        canvas_mask: torch.Tensor | None = None,
        *,
        attention: str | None = None,
        extra_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """(B, L, H) final hidden states of the decoder (LoRA layers included).

        attention_mask: (B, L_keys) padding mask (1 = real token) over all keys (a KV cache's
                        positions first, then ``input_ids``), or None (no padding)
        canvas_mask:         (B, L_keys) bool, the answer-canvas positions over the same keys
        attention:      the mode of this call (default ``self.attention``; the AR path passes ``causal``)
        extra_mask:     (B, L, L_keys) bool ANDed into the mask (attention-mask annealing)
        """
        mask, is_causal = self.attention_inputs(input_ids, attention_mask, canvas_mask, attention, extra_mask)
        switch = nullcontext() if is_causal is None else attention_switch(self.model, is_causal)
        with switch:
            out = self.base.get_decoder()(input_ids=input_ids, attention_mask=mask, **kwargs)
        return out.last_hidden_state

    def attention_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        canvas_mask: torch.Tensor | None,
        attention: str | None = None,
        extra_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, bool | None]:
        """(what the decoder gets as ``attention_mask``, the ``is_causal`` switch it needs or None).

        The fast path: a native mode (``causal``, ``bidirectional``; ``prefix_lm`` without a canvas_mask
        is bidirectional) with no ``extra_mask`` hands the (B, L) padding mask to transformers and
        sets the switch. Anything else is ``may_attend``'s (B, Lq, Lk) pattern, converted once by
        ``custom_attention_mask`` for this model's attention implementation (the switch then does
        not matter: transformers passes a 4D mask through untouched).
        """
        mode = check_attention_mode(attention or self.attention)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be the (B, L) padding mask, got shape {tuple(attention_mask.shape)}; "
                "DiffusionLM builds the 4D mask itself (pass extra constraints as extra_mask=)"
            )
        if mode == "prefix_lm" and canvas_mask is None:
            mode = "bidirectional"
        if extra_mask is None and mode in NATIVE_MODES:
            return attention_mask, NATIVE_MODES[mode]
        num_queries = input_ids.shape[1]
        if attention_mask is not None:
            key_ok = attention_mask.bool()
        else:
            num_keys = num_queries if canvas_mask is None else canvas_mask.shape[1]
            key_ok = torch.ones(input_ids.shape[0], num_keys, dtype=torch.bool, device=input_ids.device)
        allowed = may_attend(
            mode, key_ok, canvas_mask, num_queries, extra=extra_mask, **self.attention_options
        )  # (B, Lq, Lk)
        return custom_attention_mask(allowed, self.base.config._attn_implementation, self.base.dtype), None

    def merged_copy(self) -> DiffusionLM:
        """A DiffusionLM over a copy of the model with its LoRA adapters merged into the weights.

        Plain linear layers: what an exported merged folder holds and a deployment runs. This model
        stays unmerged (merging in place and unmerging would not give back the exact weights). A
        model without PEFT adapters is returned as is.
        """
        if not callable(getattr(self.model, "merge_and_unload", None)):
            return self
        merged = copy.deepcopy(self.model).merge_and_unload()  # module is_causal flags are copied too
        return DiffusionLM(
            merged,
            mask_id=self.mask_id,
            shift=self.shift,
            attention=self.attention,
            attention_options=self.attention_options,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        canvas_mask: torch.Tensor | None = None,
        *,
        attention: str | None = None,
        extra_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L, V) aligned logits: [:, i] is the prediction for token i."""
        hidden_states = self.hidden_states(
            input_ids, attention_mask, canvas_mask, attention=attention, extra_mask=extra_mask
        )
        return align(self.lm_head(hidden_states), self.shift)

    def logits_at(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        canvas_mask: torch.Tensor | None = None,
        *,
        attention: str | None = None,
        extra_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, V) predictions for the N True positions of ``targets`` (B, L), in row-major order."""
        if hidden_states is None:
            hidden_states = self.hidden_states(
                input_ids, attention_mask, canvas_mask, attention=attention, extra_mask=extra_mask
            )
        return self.lm_head(hidden_states[source_positions(targets, self.shift)])

    def noised_logits(
        self,
        x0: torch.Tensor,
        xt: torch.Tensor,
        targets: torch.Tensor,
        attention_mask: torch.Tensor | None,
        answer_mask: torch.Tensor,
        *,
        extra_mask: torch.Tensor | None = None,
        block_size: int | None = None,
        copies: int = 1,
    ) -> torch.Tensor:
        """(N, V) predictions at the N True ``targets`` (B, L) of the noised rows ``xt``, row-major.

        The denoising forward of training and of the bound. Every mode but ``block_causal``: one pass
        over ``xt`` (``logits_at``). A block model: one pass over the two-copy sequence (clean ``x0``
        then the noised answer, ``diffllm.model.blocks``), the logits read at
        ``two_copy_sources`` (the first token of a block from the clean copy of the token before it).
        ``block_size``: the blocks of this pass (a block-size curriculum's size in force); default
        the model's own (the final size: validation, bounds, sampling).
        ``copies`` = K: ``x0``, ``attention_mask``, ``answer_mask`` (and ``extra_mask``) are B rows,
        ``xt`` and ``targets`` (K * B, L) K noisings of them stacked (``loss.complementary``'s pair);
        the predictions are those of the (K * B) rows each with its own copy of the clean row. A block
        model computes the clean row once for the K (``two_copy_layout``'s ``copies``); the others
        repeat it.
        """
        if self.block_size is None:
            if block_size is not None:
                raise ValueError(
                    f"block_size={block_size} needs a block model (model.attention=block_causal); this one is "
                    f"{self.attention!r}"
                )
            if copies > 1:
                attention_mask = None if attention_mask is None else attention_mask.repeat(copies, 1)
                answer_mask = answer_mask.repeat(copies, 1)
                extra_mask = None if extra_mask is None else extra_mask.repeat(copies, 1, 1)
            return self.logits_at(xt, targets, attention_mask, canvas_mask=answer_mask, extra_mask=extra_mask)
        if extra_mask is not None:
            raise ValueError(
                "model.attention=block_causal does not compose with attention annealing (its mask is "
                "over the two-copy layout); set anneal=none"
            )
        return self.two_copy_logits(
            x0, xt, targets, attention_mask, answer_mask, block_size=block_size, copies=copies
        )[0]

    def two_copy_logits(
        self,
        x0: torch.Tensor,
        xt: torch.Tensor,
        targets: torch.Tensor,
        attention_mask: torch.Tensor | None,
        answer_mask: torch.Tensor,
        *,
        block_size: int | None = None,
        clean_targets: torch.Tensor | None = None,
        copies: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A block model's one pass over the two-copy sequence: (the (N, V) denoising predictions at
        ``targets``, as ``noised_logits``; the (M, V) next-token predictions of the clean copy at the
        M True ``clean_targets`` (B, L), row-major, or None). Token i of ``clean_targets`` is read from
        the clean copy at i - 1 whatever ``shift`` is: with ``clean_stream="causal"`` that is the causal
        model's next-token prediction (the AR loss of ``loss.ar_weight``); with ``block`` it sees its
        own block, the token it predicts included.
        ``copies`` = K: ``xt`` and ``targets`` are (K * B, L), K noisings of the B rows of ``x0``
        stacked, in one sequence per row (``two_copy_layout``); ``clean_targets`` stays (B, L): the
        clean stream is computed once, so its predictions are the B rows' once.
        """
        if self.block_size is None:
            raise ValueError(
                f"two_copy_logits needs a block model (model.attention=block_causal), not {self.attention!r}"
            )
        size = self.block_size if block_size is None else int(block_size)
        layout = two_copy_layout(x0, xt, attention_mask, answer_mask, size, self.clean_stream, copies=copies)
        hidden = self.hidden_states(
            layout.input_ids,
            layout.key_ok.long(),
            attention="bidirectional",  # every constraint is in the layout's block-causal pattern
            extra_mask=layout.allowed,
            position_ids=layout.position_ids,
        ).flatten(0, 1)  # (B * (L + K A), H)
        sources = two_copy_sources(answer_mask, targets, size, self.shift, x0.shape[1], copies=copies)
        logits = self.lm_head(hidden[sources])
        if clean_targets is None:
            return logits, None
        width = layout.input_ids.shape[1] - x0.shape[1]  # K A, the noised copies' columns
        return logits, self.lm_head(hidden[clean_copy_sources(clean_targets, width)])


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` (HF causal LM or PeftModel) with its LoRA adapters off inside a ``with`` block."""
    disable = getattr(model, "disable_adapter", None)
    with disable() if callable(disable) else nullcontext():
        yield model


@contextmanager
def ar_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The original AR model inside a ``with`` block: LoRA adapters off, causal attention back.

    ``model`` is the HF causal LM or its PeftModel wrapper (``DiffusionLM.model``). The [MASK]
    row added to the embedding is never an input of the AR model, so it changes nothing here.
    (Through ``DiffusionLM``, pass ``attention="causal"`` instead of switching: the mode decides.)
    """
    with adapters_disabled(model), causal_attention(model):
        yield model
