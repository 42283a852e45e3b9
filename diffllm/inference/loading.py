"""Loading a trained run for inference: the one place that reads checkpoints and export folders.

``load_for_inference(path)`` is what the CLIs (generate, evaluate, export, the sampler bench) and
notebooks call:

* ``*.ckpt`` written by a training run (``diffllm.training.checkpoints.load_checkpoint``): the base is rebuilt from the config's
  ``model.pretrained`` and the trainable weights (adapters, [MASK] row) are restored;
* a folder written by ``python -m diffllm.export`` (merged model or PEFT adapter + ``diffllm.json``,
  the card this module reads and ``diffllm.inference.export`` writes).

``run_datamodule``
rebuilds a run's datamodule from its config, ``ar_baseline_model`` gives the model whose
adapters-off causal mode is the original AR model.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.utils import instantiate
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from diffllm.config.trust import check_card
from diffllm.data.template import end_of_answer_id
from diffllm.diffusion.sampler import SamplerConfig
from diffllm.model.attention import attention_of, set_bidirectional
from diffllm.model.dlm import DiffusionLM
from diffllm.model.load import ModelLoadError, build_diffusion_model, load_tokenizer, resolve_dtype
from diffllm.training.checkpoints import load_checkpoint
from diffllm.training.objectives import ARObjective

log = logging.getLogger(__name__)

# The export card: diffllm.inference.export writes it, this module reads it.
CARD = "diffllm.json"
FORMAT = "diffllm-export/1"
KINDS = ("adapter", "merged")


@dataclass
class InferenceModel:
    """What inference needs: the diffusion model, its tokenizer, the run's sampler and config."""

    dlm: DiffusionLM
    tokenizer: PreTrainedTokenizerBase
    sampler_config: SamplerConfig
    cfg: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def template(self) -> str:
        """The run's prompt format (``data.template``); ``alpaca`` for a config without one."""
        return (self.cfg.get("data") or {}).get("template") or "alpaca"

    @cached_property
    def eos_id(self) -> int:
        """The end-of-answer id (EOS, or the chat template's end of turn): ``end_of_answer_id``."""
        return end_of_answer_id(self.tokenizer, self.template)


# ----------------------------------------------------------------------------------- checkpoints


def load_for_inference(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    allow_ar_sft: bool = False,
    trust_remote_code: bool = False,
) -> InferenceModel:
    """A checkpoint (``.ckpt``) or an exported folder -> ``InferenceModel`` in eval mode on ``device``.

    The file is data: its config is checked against the schema before anything is built
    (``diffllm.config.trust.check_untrusted`` / ``check_card``); a ``model.trust_remote_code: true`` in it
    is refused unless the caller passes ``trust_remote_code=True`` (the user's command line).

    An AR-SFT checkpoint (``objective=ar``) is refused unless ``allow_ar_sft``: it is a causal model,
    the baseline that ``diffllm.training.checkpoints.load_ar_sft`` loads, not a diffusion model for the sampler.
    """
    path = Path(path)
    if path.is_dir():
        return load_exported(path, device=device, trust_remote_code=trust_remote_code)
    module = load_checkpoint(path, device=device, trust_remote_code=trust_remote_code)
    cfg = module.cfg
    if isinstance(module.objective, ARObjective) and not allow_ar_sft:
        raise ValueError(
            f"ckpt_path={str(path)!r} is an AR-SFT checkpoint (objective=ar), a causal baseline, not a "
            "diffusion model: pass it as ar_ckpt_path= to diffllm.evaluate (or report.ar_ckpt_path= to a run)"
        )
    return InferenceModel(
        dlm=module.dlm,
        tokenizer=module.tokenizer,
        sampler_config=instantiate(cfg["sampler"]),
        cfg=cfg,
        source=str(path),
    )


def newest_checkpoint(outputs: str | Path) -> Path | None:
    """The newest diffusion run checkpoint under ``outputs``, or None.

    Every ``<outputs>/**/checkpoints/last.ckpt`` by modification time (``make train`` writes
    ``<date>/<time>/ar_sft/`` then ``<date>/<time>/diffusion/``; a plain run ``<date>/<time>/``), minus
    the AR-SFT baselines: a run whose ``config.yaml`` (read as data) has ``objective=ar``.
    """
    found = sorted(Path(outputs).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    for ckpt in reversed(found):
        if not _is_ar_sft_run(ckpt.parent.parent / "config.yaml"):
            return ckpt
    return None


def _is_ar_sft_run(config_file: Path) -> bool:
    try:
        cfg = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError):
        return False  # no readable config: let loading decide
    objective = (cfg or {}).get("objective") if isinstance(cfg, dict) else None
    return isinstance(objective, dict) and str(objective.get("_target_", "")).endswith(".ARObjective")


def load_quietly(
    path: str | Path, device: str | torch.device = "cpu", *, trust_remote_code: bool = False
) -> InferenceModel:
    """``load_for_inference`` without the expected noise: the frozen base weights are rebuilt, not
    read from the checkpoint (Lightning lists every one of them), and the weight-loading bar."""
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return load_for_inference(path, device=device, trust_remote_code=trust_remote_code)


def ar_baseline_model(im: InferenceModel, device: str | torch.device) -> DiffusionLM | None:
    """The model whose ``ar_mode`` is the original AR model: the same one when it has adapters to
    switch off; for a merged export, the base rebuilt from the recorded ``model.pretrained``."""
    if callable(getattr(im.dlm.model, "disable_adapter", None)):
        return im.dlm
    model_cfg = {k: v for k, v in (im.cfg.get("model") or {}).items() if k != "config"}
    # the file's own trust_remote_code never counts (its config was checked on loading)
    model_cfg["trust_remote_code"] = False
    if not model_cfg.get("pretrained"):
        log.warning("no base model recorded for %s: AR baseline skipped", im.source)
        return None
    try:
        base, _ = build_diffusion_model(lora=None, **model_cfg)
    except ModelLoadError as err:
        log.warning("AR baseline skipped: %s", err)
        return None
    return base.to(device).eval()


# ----------------------------------------------------------------------------------- the run's data


def run_datamodule(
    cfg: Mapping[str, Any], tokenizer: Any, data_path: str | Path | None = None, **overrides: Any
):
    """The run's datamodule rebuilt from its config, set up (``data_path``: that file as the
    validation split; ``overrides`` replace ``data.*`` keys, e.g. ``limit_train_rows=1``)."""
    if not cfg.get("data"):
        raise ValueError(
            "this model carries no run config (data section) to rebuild the validation split from; pass data_path=FILE"
        )
    data_cfg = dict(cfg["data"])
    if data_path is not None:
        if not Path(data_path).exists():
            raise FileNotFoundError(
                f"data_path={str(data_path)!r} does not exist; pass a .json/.jsonl file of Alpaca rows"
            )
        data_cfg.update(val_path=str(data_path), limit_val_rows=None)
    data_cfg.update(report_dir=None, **overrides)  # evaluation writes nothing into the run's data report
    datamodule = instantiate(data_cfg, tokenizer=tokenizer)
    datamodule.setup()
    return datamodule


# ----------------------------------------------------------------------------------- export folders


def read_card(folder: str | Path) -> tuple[Path, dict[str, Any]]:
    """(the folder holding ``diffllm.json``, its content). An export root resolves to ``merged/`` first."""
    folder = Path(folder)
    if not (folder / CARD).exists():
        for kind in ("merged", "adapter"):
            if (folder / kind / CARD).exists():
                folder = folder / kind
                break
        else:
            raise FileNotFoundError(
                f"{folder} has no {CARD} (nor merged/ or adapter/ with one); pass a folder written by "
                "`python -m diffllm.export`"
            )
    card = json.loads((folder / CARD).read_text())
    if card.get("format") != FORMAT or card.get("kind") not in KINDS:
        raise ValueError(
            f"{folder / CARD} is not a {FORMAT} card (format={card.get('format')!r}, kind={card.get('kind')!r})"
        )
    return folder, card


def load_exported(
    folder: str | Path,
    device: str | torch.device = "cpu",
    base_model: str | None = None,
    *,
    trust_remote_code: bool = False,
) -> InferenceModel:
    """An exported folder (``adapter/``, ``merged/`` or their parent) -> ``InferenceModel`` in eval mode.

    ``base_model`` replaces the recorded base path for an adapter (the base moved, or another
    copy of the same weights).
    """
    folder, card = read_card(folder)
    # the card is data: checked against the schema before anything is built; its own
    # trust_remote_code is refused unless the user passed it
    card = check_card(card, folder / CARD, trust_remote_code=trust_remote_code)
    model_cfg = dict(card["model"])
    model_cfg["trust_remote_code"] = trust_remote_code
    if card["kind"] == "merged":
        tokenizer = load_tokenizer(str(folder))
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            trust_remote_code=trust_remote_code,
            dtype=resolve_dtype(model_cfg.get("dtype", "float32")),
            attn_implementation=model_cfg.get("attn_implementation", "sdpa"),
        )
    else:
        model_cfg["pretrained"] = base_model or card["base_model"]
        # the same tokenizer + [MASK] conversion as training; the adapter restores a trained [MASK] row
        dlm, tokenizer = build_diffusion_model(lora=None, **model_cfg)
        model = PeftModel.from_pretrained(dlm.model, folder, is_trainable=False)
    if tokenizer.mask_token_id != card["mask_id"]:
        raise ValueError(
            f"{folder}: the tokenizer's [MASK] id is {tokenizer.mask_token_id}, diffllm.json says {card['mask_id']}; "
            "the base model or tokenizer differs from the one the export was trained on"
        )
    set_bidirectional(model)  # module-level is_causal flags are not saved by any HF format
    model.to(device).eval()
    return InferenceModel(
        # cards older than model.attention say prefix_lm: true/false
        dlm=DiffusionLM(
            model,
            mask_id=card["mask_id"],
            shift=card["shift"],
            attention=attention_of(card),
            # cards older than model.clean_stream have none: their clean stream was the block one
            attention_options={
                "block_size": card["block_size"],
                "clean_stream": card.get("clean_stream") or "block",
            }
            if card.get("block_size")
            else None,
        ),
        tokenizer=tokenizer,
        sampler_config=SamplerConfig(**card["sampler"]),
        cfg=card.get("run_config") or {},
        source=str(folder),
    )
