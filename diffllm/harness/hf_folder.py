"""Hugging Face folders of the AR models, for lm-eval's own ``hf`` model.

The AR base is already a folder (``model.pretrained``). An AR-SFT checkpoint (``objective=ar``)
holds only its LoRA weights and [MASK] row: ``ar_sft_folder`` merges them into a copy of the base
and writes a plain causal ``*ForCausalLM`` folder with the run's tokenizer ([MASK] included, which
the AR model never emits). ``config.json`` is written causal (``is_causal: true``): the project
switches every model it builds to bidirectional attention, and an AR-SFT model is trained and
scored causally.
"""

from __future__ import annotations

from pathlib import Path

from diffllm.inference.loading import load_for_inference
from diffllm.model.attention import set_bidirectional
from diffllm.training.objectives import ARObjective, objective_of


def ar_sft_folder(ckpt_path: str | Path, out_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Merge an AR-SFT checkpoint into an HF folder (default ``<ckpt without .ckpt>.hf/``); returns it.

    An existing folder is reused unless ``overwrite``.
    """
    ckpt_path = Path(ckpt_path)
    out = Path(out_dir) if out_dir is not None else ckpt_path.with_suffix(".hf")
    if (out / "config.json").exists() and not overwrite:
        return out
    im = load_for_inference(ckpt_path, allow_ar_sft=True)
    if not isinstance(objective_of(im.cfg), ARObjective):
        raise ValueError(
            f"{str(ckpt_path)!r} is a diffusion checkpoint; pass it to --model diffllm_mdlm, and the .ckpt of "
            "an objective=ar run to --model hf"
        )
    model = im.dlm.merged_copy().model
    set_bidirectional(model, bidirectional=False)  # config.json and the modules causal again
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    im.tokenizer.save_pretrained(out)
    return out
