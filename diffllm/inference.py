"""Load a trained diffusion model for inference from a Lightning checkpoint or an exported folder.

``load_for_inference(path)`` is what the CLIs (generate, evaluate, export) and notebooks call:

* ``*.ckpt`` written by ``diffllm.train``: the base is rebuilt from the config's
  ``model.pretrained`` and the trainable weights (adapters, [MASK] row) are restored;
* a folder written by ``diffllm.export`` (merged model or PEFT adapter + ``diffllm.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from transformers import PreTrainedTokenizerBase

from diffllm.diffusion.sampler import SamplerConfig
from diffllm.model.dlm import DiffusionLM


@dataclass
class InferenceModel:
    """What inference needs: the diffusion model, its tokenizer, the run's sampler and config."""

    dlm: DiffusionLM
    tokenizer: PreTrainedTokenizerBase
    sampler_config: SamplerConfig
    cfg: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def load_for_inference(path: str | Path, device: str | torch.device = "cpu") -> InferenceModel:
    """A checkpoint (``.ckpt``) or an exported folder -> ``InferenceModel`` in eval mode on ``device``."""
    path = Path(path)
    if path.is_dir():
        from diffllm.export import load_exported

        return load_exported(path, device=device)
    if not path.exists():
        raise FileNotFoundError(
            f"ckpt_path={str(path)!r} does not exist; pass a .ckpt from a run folder "
            "(outputs/<date>/<time>/checkpoints/last.ckpt) or a folder written by diffllm.export"
        )
    from diffllm.config import register_resolvers
    from diffllm.lit_module import DiffusionLitModule

    register_resolvers()
    module = DiffusionLitModule.load_from_checkpoint(path, map_location=device)
    module.eval()
    cfg = module.cfg
    return InferenceModel(
        dlm=module.dlm,
        tokenizer=module.tokenizer,
        sampler_config=instantiate(cfg["sampler"]),
        cfg=cfg,
        source=str(path),
    )
