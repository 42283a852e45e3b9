"""Export a trained diffusion model to Hugging Face formats (``diffllm.inference.loading`` reads them back).

    python -m diffllm.export ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt out=exports/tiny

writes two self-describing folders:

    out/adapter/   PEFT adapter folder (``PeftModel.save_pretrained``): the LoRA weights and, when
                   the [MASK] row was trained, its trainable-token delta; the tokenizer with [MASK]
                   and ``diffllm.json``. It needs the base model: load the base, apply the same
                   [MASK] conversion, then ``PeftModel.from_pretrained`` (``load_exported`` does it).
    out/merged/    the adapters merged into a copy of the model: a plain ``*ForCausalLM`` folder with
                   its tokenizer ([MASK] included) and ``diffllm.json``; ``AutoModelForCausalLM`` and
                   ``AutoTokenizer`` load it without diffllm or PEFT.

The whole embedding matrix is never written into the adapter: an untrained [MASK] row (mean of the
input embeddings) is reproduced exactly by re-running ``add_mask_token`` on the base, a trained one
travels as PEFT's trainable-token delta. This module only writes; the card's format
(``CARD``, ``FORMAT``, ``KINDS``) and every reader (``read_card``, ``load_exported``) live in
``diffllm.inference.loading``.

What no Hugging Face format can carry is the bidirectional switch. ``config.json`` keeps
``is_causal: false``, which makes transformers build a bidirectional *padding* mask, but the
per-module ``is_causal`` flag that SDPA reads when there is no padding is not saved: a model loaded
with plain ``from_pretrained`` is bidirectional with eager attention and CAUSAL with SDPA on an
unpadded batch. ``diffllm.inference.loading.load_exported`` re-applies ``set_bidirectional``; any other consumer must do the
same (``diffllm.json`` says ``"bidirectional": true`` and gives the recipe under ``usage``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from peft import PeftModel

from diffllm.data.template import TemplateError, get_format
from diffllm.inference.loading import CARD, FORMAT, KINDS, InferenceModel, load_for_inference
from diffllm.inference.model_card import checkpoint_step, model_card_text, report_of
from diffllm.model.attention import set_bidirectional
from diffllm.model.load import trainable_line

log = logging.getLogger("diffllm.inference.export")

USAGE = {
    "merged": (
        "model = AutoModelForCausalLM.from_pretrained(folder); tokenizer = AutoTokenizer.from_pretrained(folder); "
        "then set `is_causal = False` on model.config and on every attention module "
        "(diffllm.model.attention.set_bidirectional(model)). diffllm: diffllm.inference.loading.load_exported(folder)."
    ),
    "adapter": (
        "base = AutoModelForCausalLM.from_pretrained(base_model); tokenizer = AutoTokenizer.from_pretrained(folder); "
        "base.resize_token_embeddings(len(tokenizer)) and set row mask_id as diffllm.model.load.add_mask_token does "
        "(init in model.mask_token); set_bidirectional(base); PeftModel.from_pretrained(base, folder). "
        "diffllm: diffllm.inference.loading.load_exported(folder[, base_model=...])."
    ),
}


def _template(name: str | None) -> dict[str, str] | None:
    try:
        return get_format(name).describe() if name else None
    except TemplateError:
        return None


def model_card(im: InferenceModel, kind: str, source: str) -> dict[str, Any]:
    """Everything needed to run an export as a diffusion model (written as ``diffllm.json``)."""
    cfg, tok, dlm = im.cfg, im.tokenizer, im.dlm
    model_cfg = {k: v for k, v in cfg.get("model", {}).items() if k != "config"}
    template = cfg.get("data", {}).get("template")
    return {
        "format": FORMAT,
        "kind": kind,
        "bidirectional": True,
        "mask_id": dlm.mask_id,
        "mask_token": tok.convert_ids_to_tokens(dlm.mask_id),
        "shift": dlm.shift,
        "attention": dlm.attention,
        "block_size": dlm.block_size,  # block_causal's blocks (null for the other modes)
        "clean_stream": dlm.clean_stream,  # block_causal's clean stream: block | causal (null otherwise)
        "eos_id": im.eos_id,  # the end-of-answer id (EOS, or the chat template's end of turn)
        "pad_id": tok.pad_token_id,
        "vocab_size": len(tok),
        "base_model": model_cfg.get("pretrained"),
        "model": model_cfg,  # attn_implementation, dtype, mask_token spec, train_mask_row
        "lora": cfg.get("lora"),
        "trainable": trainable_line(dlm.model),
        "sampler": dict(vars(im.sampler_config)),
        "prompt_template": _template(template),
        "source_checkpoint": source,
        "usage": USAGE[kind],
        "run_config": cfg,
    }


def _write_card(folder: Path, card: dict[str, Any]) -> None:
    (folder / CARD).write_text(json.dumps(card, indent=2, default=str) + "\n")


def _prepare(folder: Path, overwrite: bool) -> Path:
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{folder} exists and is not empty; pass overwrite=true or choose another out="
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def export_model(
    im: InferenceModel,
    out: str | Path,
    formats: tuple[str, ...] | list[str] = KINDS,
    *,
    source: str = "",
    overwrite: bool = False,
    report: dict[str, Any] | None = None,
    license_: str | None = None,
    steps: int | None = None,
) -> dict[str, Path]:
    """Write ``out/adapter`` and/or ``out/merged`` for a loaded model, and the model card
    ``out/README.md`` (``report``: the run's ``report.json``, for its figures); returns {kind: folder}."""
    unknown = set(formats) - set(KINDS)
    if unknown or not formats:
        raise ValueError(f"formats={list(formats)}: choose one or more of {list(KINDS)}")
    peft_model = im.dlm.model
    if not isinstance(peft_model, PeftModel):
        raise ValueError(
            f"{source or 'this model'} holds no PEFT adapters (a lora=null run or an exported merged folder); "
            "export needs a training checkpoint with LoRA adapters"
        )
    out = Path(out)
    written: dict[str, Path] = {}
    if "adapter" in formats:
        folder = _prepare(out / "adapter", overwrite)
        # save_embedding_layers=False: the resized vocabulary would otherwise make PEFT save the
        # whole embedding (and LM head) -- 0.5 GB for Llama 3.2 1B -- for the sake of one row.
        peft_model.save_pretrained(folder, save_embedding_layers=False)
        im.tokenizer.save_pretrained(folder)
        _write_card(folder, model_card(im, "adapter", source))
        written["adapter"] = folder
    if "merged" in formats:
        folder = _prepare(out / "merged", overwrite)
        merged = im.dlm.merged_copy().model  # the loaded model stays unmerged
        set_bidirectional(merged)  # config.json keeps is_causal=false as a hint for readers
        merged.save_pretrained(folder)
        im.tokenizer.save_pretrained(folder)
        _write_card(folder, model_card(im, "merged", source))
        written["merged"] = folder
        del merged
    kinds = [k for k in KINDS if k in written]
    card = model_card(im, kinds[0], source)
    readme = model_card_text(card, kinds, report=report, license_=license_, steps=steps)
    (out / "README.md").write_text(readme)
    if "adapter" in written:  # PEFT's stub names the local base path: the same card, for the adapter alone
        (written["adapter"] / "README.md").write_text(
            model_card_text(card, ["adapter"], report, license_, steps)
        )
    for kind, folder in written.items():
        log.info("exported %s -> %s", kind, folder)
    return written


def upload_plan(out: str | Path) -> list[tuple[str, int]]:
    """What ``push_to_hub`` uploads from an export folder: (path relative to it, bytes), sorted."""
    out = Path(out)
    return sorted((p.relative_to(out).as_posix(), p.stat().st_size) for p in out.rglob("*") if p.is_file())


def push_to_hub(
    out: str | Path, repo_id: str, *, private: bool = True, dry_run: bool = False
) -> list[tuple[str, int]]:
    """Upload an export folder (card, ``adapter/``, ``merged/``) to the Hub repo ``repo_id`` with
    ``huggingface_hub`` (a login or ``HF_TOKEN`` is needed); ``dry_run`` only returns the plan."""
    plan = upload_plan(out)
    if not (Path(out) / "README.md").is_file():
        raise FileNotFoundError(
            f"{out} has no README.md model card; export it with python -m diffllm.export first"
        )
    if dry_run:
        return plan
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(out), repo_id=repo_id, commit_message="diffllm export")
    return plan


def export(
    ckpt_path: str | Path,
    out: str | Path,
    formats: tuple[str, ...] | list[str] = KINDS,
    *,
    device: str = "cpu",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    license_: str | None = None,
) -> dict[str, Path]:
    """A training checkpoint -> ``out/adapter`` and/or ``out/merged`` and ``out/README.md`` (with the
    figures of the run's ``report.json`` when it has one); returns {kind: folder}."""
    im = load_for_inference(ckpt_path, device=device, trust_remote_code=trust_remote_code)
    return export_model(
        im,
        out,
        formats,
        source=str(ckpt_path),
        overwrite=overwrite,
        report=report_of(ckpt_path),
        license_=license_,
        steps=checkpoint_step(ckpt_path),
    )
