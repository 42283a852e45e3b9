"""Reading a training checkpoint back: the AR-SFT baseline a run's report scores beside it.

The general reader (diffusion checkpoints and export folders) is ``diffllm.inference.loading``;
this one sits in the training layer because a training run needs it (``report.ar_ckpt_path``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from diffllm.config.resolvers import register_resolvers
from diffllm.model.dlm import DiffusionLM
from diffllm.training.module import DiffusionLitModule
from diffllm.training.objectives import ARObjective


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", *, trust_remote_code: bool = False
) -> DiffusionLitModule:
    """A ``.ckpt`` written by a training run -> its module in eval mode on ``device``.

    The file is data: its hyperparameters are checked against the schema before anything is built
    (``DiffusionLitModule.load_from_checkpoint``); the frozen base is rebuilt from
    ``model.pretrained`` and the trainable weights are restored.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"ckpt_path={str(path)!r} does not exist; pass a .ckpt from a run folder "
            "(outputs/<date>/<time>/checkpoints/last.ckpt) or a folder written by diffllm.export"
        )
    register_resolvers()
    with warnings.catch_warnings():
        # the frozen base weights are rebuilt, not read: Lightning would list every one of them
        warnings.filterwarnings(
            "ignore", message="Found keys that are in the model state dict but not in the checkpoint"
        )
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        module = DiffusionLitModule.load_from_checkpoint(
            path, map_location=device, trust_remote_code=trust_remote_code
        )
    return module.eval()


def load_ar_sft(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device = "cpu",
    *,
    trust_remote_code: bool = False,
) -> DiffusionLM:
    """The model of an AR-SFT checkpoint (a run with ``objective=ar``), checked to score the same
    token ids as ``tokenizer`` (the diffusion model's): same vocabulary, [MASK] included."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"ar_ckpt_path={str(path)!r} is a folder; pass the .ckpt of an objective=ar run "
            "(outputs/<date>/<time>/checkpoints/last.ckpt)"
        )
    module = load_checkpoint(path, device=device, trust_remote_code=trust_remote_code)
    if not isinstance(module.objective, ARObjective):
        raise ValueError(
            f"ar_ckpt_path={str(path)!r} was trained with {module.objective!r}, not the AR-SFT baseline; "
            "pass a checkpoint of a run with objective=ar"
        )
    if module.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"ar_ckpt_path={str(path)!r} has another vocabulary ({len(module.tokenizer)} tokens vs "
            f"{len(tokenizer)}): train the AR-SFT baseline on the same model.pretrained"
        )
    return module.dlm
