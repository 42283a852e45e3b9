"""Load a Hugging Face causal LM and turn it into a masked-diffusion model.

    pretrained causal LM  ->  + [MASK] token (new embedding row or a reused special token)
                          ->  bidirectional attention (both switches, see ``attention.py``)
                          ->  PEFT LoRA on the attention projections only
                          ->  ``DiffusionLM`` (aligned logits, shift, mask id)

``build_from_config`` does the same from an architecture dict, on any device including ``meta``:
that is how the dry run counts LLaMA 3.2 1B's parameters without downloading a byte.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from diffllm.model.attention import NATIVE_MODES, attention_mode, check_attention_mode, set_bidirectional
from diffllm.model.blocks import check_clean_stream
from diffllm.model.dlm import DiffusionLM

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message says what to do."""


# a hub id: "name" or "org/name" (letters, digits, - _ .), never starting with "/", "." or "~"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_local_path(pretrained: str) -> bool:
    """True for what can only be a folder (``/x``, ``./x``, ``~/x``, ``a/b/c``), not a hub id."""
    return pretrained.startswith(("/", ".", "~")) or (os.sep in pretrained and not _HUB_ID.match(pretrained))


def missing_folder_help(pretrained: str) -> ModelLoadError | None:
    """For a local path that does not exist: one line with the nearest existing sibling, if any."""
    if not looks_like_local_path(pretrained):
        return None
    path = Path(pretrained).expanduser().absolute()
    if path.exists():
        return None
    parent, missing = path, []  # walk up to the deepest folder that exists
    while not parent.exists():
        missing.append(parent.name)
        parent = parent.parent
    names = [p.name for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
    close = difflib.get_close_matches(missing[-1], names, n=1, cutoff=0.6)
    hint = (
        f"did you mean {parent / close[0]}?"
        if close
        else f"{parent} holds no folder named like {missing[-1]!r}"
    )
    return ModelLoadError(f"model.pretrained={pretrained!r}: no such folder: {path}; {hint}")


def _hub_help(pretrained: str, err: Exception) -> ModelLoadError:
    missing = missing_folder_help(str(pretrained))
    if missing is not None:
        return missing
    local = os.path.isdir(pretrained)
    where = "the local folder" if local else "the Hugging Face Hub"
    hint = (
        f"check that {pretrained!r} holds config.json, the weights and the tokenizer files"
        if local
        else (
            "this machine may have no hub access, or the model is gated. Either log in "
            "(`hf auth login`, after accepting the licence on the model's hub page) or download it "
            f"elsewhere and point the run at it: `model.pretrained=/path/to/{pretrained.split('/')[-1]}`"
        )
    )
    return ModelLoadError(
        f"could not load {pretrained!r} from {where} ({type(err).__name__}: {err}).\n  Fix: {hint}."
    )


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(pretrained: str, **kwargs: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of ``pretrained`` with a pad token (EOS when it has none: Llama 3 has none)."""
    missing = missing_folder_help(str(pretrained))
    if missing is not None:  # before transformers tries the hub with a path
        raise missing
    try:
        tok = AutoTokenizer.from_pretrained(pretrained, **kwargs)
    except (OSError, ValueError) as err:
        raise _hub_help(pretrained, err) from err
    if tok.eos_token_id is None:
        raise ModelLoadError(f"tokenizer of {pretrained!r} has no EOS token; the answer span needs one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass
class MaskTokenSpec:
    """How the [MASK] token enters the vocabulary (``model.mask_token``; the config layer's node is
    this class: its fields, defaults and ranges are written here once).

    mode:  ``add`` a new token and a new embedding row (the seed recipe), or ``reuse`` an
           existing (reserved, never-trained) special token given by ``token``.
    init:  for a new row, ``mean`` of the existing input embeddings or ``token:<text>`` to copy
           that token's embedding (``random`` keeps the model's own initialisation).
    """

    mode: str = "add"
    token: str = "[MASK]"
    init: str = "mean"

    def __post_init__(self) -> None:
        if self.mode not in ("add", "reuse"):
            raise ValueError(
                f"model.mask_token.mode={self.mode!r} is out of range; "
                "valid: add (a new row) | reuse (an existing token)"
            )
        if not (self.init in ("mean", "random") or self.init.startswith("token:")):
            raise ValueError(
                f"model.mask_token.init={self.init!r} is out of range; valid: mean | random | token:<text>"
            )


def _init_new_rows(model: nn.Module, old_vocab: int, init: str, init_ids: Sequence[int] = ()) -> None:
    """Initialise embedding rows >= old_vocab in place (input and, if untied, output embeddings)."""
    if init == "random" or model.get_input_embeddings().weight.is_meta:
        return
    embeddings = [model.get_input_embeddings()]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not embeddings[0].weight:
        embeddings.append(out)
    with torch.no_grad():
        for emb in embeddings:
            w = emb.weight
            src = w[:old_vocab].float().mean(0) if init == "mean" else w[list(init_ids)].float().mean(0)
            w[old_vocab:] = src.to(w.dtype)


def add_mask_token(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, spec: MaskTokenSpec | None = None
) -> int:
    """Give the model a [MASK] token (``spec``: ``MaskTokenSpec()`` when None); returns its id.

    With a tokenizer, ``add`` registers ``spec.token`` as its mask token and grows the embedding
    to the new vocabulary size. Without one (the meta-device dry run) one row is appended and the
    new id is the old vocabulary size.
    """
    spec = spec or MaskTokenSpec()
    old_vocab = model.get_input_embeddings().weight.shape[0]
    if spec.mode == "reuse":
        if tokenizer is None:
            raise ValueError("mask_token.mode=reuse needs a tokenizer to look the token up")
        mask_id = tokenizer.convert_tokens_to_ids(spec.token)
        if mask_id is None or mask_id == tokenizer.unk_token_id or mask_id >= old_vocab:
            raise ValueError(
                f"mask_token.token={spec.token!r} is not a token of this vocabulary; "
                "name an existing reserved token (e.g. Llama 3's '<|reserved_special_token_0|>') or use mode=add"
            )
        tokenizer.mask_token = spec.token
        return int(mask_id)

    if tokenizer is not None:
        tokenizer.add_special_tokens({"mask_token": spec.token})
        mask_id = int(tokenizer.mask_token_id)
        new_vocab = max(len(tokenizer), old_vocab)
        if mask_id < old_vocab:  # the tokenizer already knew the token: no new row needed
            return mask_id
    else:
        mask_id, new_vocab = old_vocab, old_vocab + 1
    # mean_resizing=False: we initialise the new row ourselves (and it is slow on big vocabularies)
    model.resize_token_embeddings(new_vocab, mean_resizing=False)
    init_ids: list[int] = []
    if spec.init.startswith("token:"):
        if tokenizer is None:
            raise ValueError("mask_token.init=token:<text> needs a tokenizer")
        init_ids = tokenizer.encode(spec.init.split(":", 1)[1], add_special_tokens=False)
        if not init_ids:
            raise ValueError(f"mask_token.init={spec.init!r} encodes to no token")
    _init_new_rows(model, old_vocab, spec.init, init_ids)
    return mask_id


def check_attention_targets(model: nn.Module, target_modules: Sequence[str]) -> None:
    """Refuse LoRA targets that are not projections inside an attention block."""
    hits = 0
    for name, _ in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in target_modules:
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            if "attention" not in type(parent).__name__.lower():
                raise ValueError(
                    f"lora.target_modules contains {leaf!r}, but {name} sits in {type(parent).__name__}, "
                    "not an attention block; diffllm adapts attention only (e.g. q_proj, k_proj, v_proj, o_proj)"
                )
            hits += 1
    if hits == 0:
        raise ValueError(
            f"lora.target_modules={list(target_modules)} matched no module of {type(model).__name__}"
        )


def apply_lora(
    model: nn.Module, lora: Mapping[str, Any], mask_id: int | None = None, train_mask_row: bool = False
) -> PeftModel:
    """Wrap ``model`` with PEFT LoRA adapters built from ``lora`` (LoraConfig keyword arguments).

    ``train_mask_row`` makes the [MASK] embedding row trainable too (PEFT trainable tokens); the
    rest of the embedding stays frozen.
    """
    kwargs = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(lora).items()}
    kwargs.pop("_target_", None)
    kwargs.setdefault("task_type", "CAUSAL_LM")
    check_attention_targets(model, kwargs.get("target_modules") or ())
    if train_mask_row:
        if mask_id is None:
            raise ValueError("train_mask_row=True needs the mask id")
        embed_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        kwargs["trainable_token_indices"] = {embed_name.rsplit(".", 1)[-1]: [int(mask_id)]}
    return get_peft_model(model, LoraConfig(**kwargs))


def _load_causal_lm(
    pretrained: str, dtype: torch.dtype, attn_implementation: str, **kwargs: Any
) -> nn.Module:
    try:
        return AutoModelForCausalLM.from_pretrained(
            pretrained, dtype=dtype, attn_implementation=attn_implementation, **kwargs
        )
    except (OSError, ValueError) as err:
        raise _hub_help(pretrained, err) from err


def check_attention(attention: str, attn_implementation: str) -> None:
    """A mode outside ``NATIVE_MODES`` is a custom 4D mask: only sdpa, eager and flex attention take one."""
    check_attention_mode(attention)
    if attention not in NATIVE_MODES and attn_implementation not in ("sdpa", "eager", "flex_attention"):
        raise ValueError(
            f"model.attention={attention} needs a custom 4D attention mask, which "
            f"attn_implementation={attn_implementation!r} cannot take; set model.attn_implementation=sdpa "
            "(or eager), or model.attention=bidirectional"
        )


def attention_options(attention: str, block_size: int | None, clean_stream: str = "block") -> dict[str, Any]:
    """The mode's options from the model node: ``block_size`` and ``clean_stream`` belong to
    ``block_causal`` alone (``clean_stream="block"``, the default, is what every other mode does anyway)."""
    if attention == "block_causal":
        return {"block_size": block_size, "clean_stream": check_clean_stream(clean_stream)}
    if block_size is not None:
        raise ValueError(
            f"model.block_size={block_size} is read only by model.attention=block_causal (attention is "
            f"{attention!r}); set model.attention=block_causal or model.block_size=null"
        )
    if clean_stream != "block":
        raise ValueError(
            f"model.clean_stream={clean_stream!r} is read only by model.attention=block_causal (attention is "
            f"{attention!r}); set model.attention=block_causal or model.clean_stream=block"
        )
    return {}


def build_diffusion_model(
    pretrained: str,
    lora: Mapping[str, Any] | None,
    *,
    shift: bool = True,
    attention: str | None = None,
    prefix_lm: bool | None = None,
    block_size: int | None = None,
    clean_stream: str = "block",
    attn_implementation: str = "sdpa",
    dtype: str = "float32",
    mask_token: Mapping[str, Any] | None = None,
    train_mask_row: bool = False,
    trust_remote_code: bool = False,
    from_scratch: bool = False,
    gradient_checkpointing: bool = False,
    **_: Any,
) -> tuple[DiffusionLM, PreTrainedTokenizerBase]:
    """Pretrained causal LM -> bidirectional LoRA ``DiffusionLM`` and its tokenizer ([MASK] included).

    ``lora=None`` returns the converted model without adapters (full fine-tuning or inspection).
    ``from_scratch=True`` is the control experiment: the same architecture with freshly initialised
    weights (seeded by the caller), to show how much the AR pretraining contributes.
    ``gradient_checkpointing=True`` recomputes each decoder block's activations in the backward
    pass (memory for compute, see ``enable_checkpointing``).
    ``attention``: ``model.attention`` (default ``bidirectional``); ``prefix_lm`` is the key it
    replaced, still read from old configs and checkpoints (``attention_mode``). ``block_size`` and
    ``clean_stream``: ``block_causal``'s options (``diffllm.model.blocks``).
    Extra keys (the model node's ``config`` architecture, used by the dry run, and ``block_schedule``,
    the training module's curriculum) are ignored here.
    """
    attention = attention_mode(attention, prefix_lm)
    check_attention(attention, attn_implementation)
    tokenizer = load_tokenizer(pretrained, trust_remote_code=trust_remote_code)
    if from_scratch:
        hf_config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        hf_config._attn_implementation = attn_implementation
        model = AutoModelForCausalLM.from_config(hf_config, dtype=resolve_dtype(dtype))
    else:
        model = _load_causal_lm(
            pretrained, resolve_dtype(dtype), attn_implementation, trust_remote_code=trust_remote_code
        )
    mask_id = add_mask_token(model, tokenizer, MaskTokenSpec(**dict(mask_token or {})))
    set_bidirectional(model)
    if gradient_checkpointing:
        enable_checkpointing(model)
    if lora is not None:
        model = apply_lora(model, lora, mask_id=mask_id, train_mask_row=train_mask_row)
    dlm = DiffusionLM(
        model,
        mask_id=mask_id,
        shift=shift,
        attention=attention,
        attention_options=attention_options(attention, block_size, clean_stream),
    )
    return dlm, tokenizer


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing of every decoder block, for training.

    Non-reentrant ``torch.utils.checkpoint``. The embedding output is made to require grad
    (``enable_input_require_grads``): with a frozen embedding the blocks' input would otherwise
    carry no gradient, and a reentrant checkpoint would then skip the backward of the LoRA
    weights inside it.
    """
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    model.enable_input_require_grads()


def build_from_config(
    config: Mapping[str, Any],
    lora: Mapping[str, Any] | None,
    *,
    device: str | torch.device = "meta",
    mask_token: Mapping[str, Any] | None = None,
    train_mask_row: bool = False,
    shift: bool = True,
    attention: str | None = None,
    prefix_lm: bool | None = None,
    block_size: int | None = None,
    clean_stream: str = "block",
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    **_: Any,
) -> DiffusionLM:
    """The same conversion from an architecture dict (``model_type`` + config fields), no weights."""
    attention = attention_mode(attention, prefix_lm)
    check_attention(attention, attn_implementation)
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise ValueError("model.config needs a 'model_type' (e.g. llama) to build the architecture")
    hf_config = AutoConfig.for_model(model_type, **config)
    hf_config._attn_implementation = attn_implementation
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=resolve_dtype(dtype))
    mask_id = add_mask_token(model, None, MaskTokenSpec(**dict(mask_token or {})))
    set_bidirectional(model)
    if lora is not None:
        model = apply_lora(model, lora, mask_id=mask_id, train_mask_row=train_mask_row)
    return DiffusionLM(
        model,
        mask_id=mask_id,
        shift=shift,
        attention=attention,
        attention_options=attention_options(attention, block_size, clean_stream),
    )


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, as PEFT's ``print_trainable_parameters`` counts them."""
    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def trainable_line(model: nn.Module) -> str:
    """PEFT's line: ``trainable params: 1,703,936 || all params: 1,237,520,384 || trainable%: 0.1377``."""
    trainable, total = parameter_counts(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
