"""Load a trained diffusion model for inference from a Lightning checkpoint or an exported folder.

``load_for_inference(path)`` is what the CLIs (generate, evaluate, export) and notebooks call:

* ``*.ckpt`` written by ``diffllm.train``: the base is rebuilt from the config's
  ``model.pretrained`` and the trainable weights (adapters, [MASK] row) are restored;
* a folder written by ``diffllm.export`` (merged model or PEFT adapter + ``diffllm.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
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

    @property
    def template(self) -> str:
        """The run's prompt format (``data.template``); ``alpaca`` for a config without one."""
        return (self.cfg.get("data") or {}).get("template") or "alpaca"

    @cached_property
    def eos_id(self) -> int:
        """The end-of-answer id (EOS, or the chat template's end of turn): ``end_of_answer_id``."""
        from diffllm.data.template import end_of_answer_id

        return end_of_answer_id(self.tokenizer, self.template)


def load_for_inference(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    allow_ar_sft: bool = False,
    trust_remote_code: bool = False,
) -> InferenceModel:
    """A checkpoint (``.ckpt``) or an exported folder -> ``InferenceModel`` in eval mode on ``device``.

    The file is data: its config is checked against the schema before anything is built
    (``diffllm.schema.check_untrusted`` / ``check_card``); a ``model.trust_remote_code: true`` in it
    is refused unless the caller passes ``trust_remote_code=True`` (the user's command line).

    An AR-SFT checkpoint (``objective=ar``) is refused unless ``allow_ar_sft``: it is a causal model,
    the baseline that ``load_ar_sft`` loads, not a diffusion model for the sampler.
    """
    path = Path(path)
    if path.is_dir():
        from diffllm.export import load_exported

        return load_exported(path, device=device, trust_remote_code=trust_remote_code)
    if not path.exists():
        raise FileNotFoundError(
            f"ckpt_path={str(path)!r} does not exist; pass a .ckpt from a run folder "
            "(outputs/<date>/<time>/checkpoints/last.ckpt) or a folder written by diffllm.export"
        )
    from diffllm.config import register_resolvers
    from diffllm.lit_module import DiffusionLitModule

    register_resolvers()
    module = DiffusionLitModule.load_from_checkpoint(
        path, map_location=device, trust_remote_code=trust_remote_code
    )
    module.eval()
    cfg = module.cfg
    from diffllm.objectives import ARObjective

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


def load_ar_sft(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device = "cpu",
    *,
    trust_remote_code: bool = False,
) -> DiffusionLM:
    """The model of an AR-SFT checkpoint (a run with ``objective=ar``), checked to score the same
    token ids as ``tokenizer`` (the diffusion model's): same vocabulary, [MASK] included."""
    from diffllm.objectives import ARObjective, objective_of

    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"ar_ckpt_path={str(path)!r} is a folder; pass the .ckpt of an objective=ar run "
            "(outputs/<date>/<time>/checkpoints/last.ckpt)"
        )
    im = load_for_inference(path, device=device, allow_ar_sft=True, trust_remote_code=trust_remote_code)
    objective = objective_of(im.cfg)
    if not isinstance(objective, ARObjective):
        raise ValueError(
            f"ar_ckpt_path={str(path)!r} was trained with {objective!r}, not the AR-SFT baseline; "
            "pass a checkpoint of a run with objective=ar"
        )
    if im.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"ar_ckpt_path={str(path)!r} has another vocabulary ({len(im.tokenizer)} tokens vs "
            f"{len(tokenizer)}): train the AR-SFT baseline on the same model.pretrained"
        )
    return im.dlm
