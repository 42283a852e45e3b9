"""The research question in numbers: the converted diffusion model vs the AR models, on the same answers.

Two honest readings, side by side: the unadapted AR base on exactly the same scored tokens (also
without the end token, which a base model was never trained to produce there), and an AR-SFT
model trained at equal budget (``objective=ar``, ``report.ar_ckpt_path``): the bound minus its NLL is
the real price of the conversion. Plus the answers' unigram cross-entropy as the no-context
reference, generation quality (exact match, ROUGE-L, answer length, EOS rate) of every model, and
exact-match differences against AR-SFT. Every figure carries its standard error; the figures
come from ``diffllm.evaluation.compare.compare`` (as ``evaluate``'s), ``report.json`` also records
its provenance. The terminal view is ``tables.format_report``; the names are ``names``'s (keys
renamed in this release are written under their old names too: ``names.with_deprecated_keys``).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from diffllm.data.prompt_fit import fit_prompt_rows
from diffllm.evaluation.compare import EVAL_SCHEDULE, compare, likelihood_settings
from diffllm.evaluation.names import with_deprecated_keys
from diffllm.model.dlm import DiffusionLM


def provenance(device: torch.device | str, wall_seconds: float, tokens_seen: int | None) -> dict[str, Any]:
    """Where a figure came from: git commit (None outside a checkout), package versions, device,
    wall time, training tokens seen (non-pad tokens of every training batch)."""
    repo = Path(__file__).resolve().parents[2]
    commit = dirty = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=repo,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for name in ("torch", "transformers", "peft", "lightning", "diffllm"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": versions,
        "device": str(device),
        "device_name": name,
        "wall_seconds": wall_seconds,
        "tokens_seen": tokens_seen,
    }


@torch.no_grad()
def build_report(
    module,
    datamodule,
    num_rows: int = 64,
    likelihood_samples: int = 8,
    seed: int = 0,
    ar_sft: DiffusionLM | None = None,
    prompt_overflow: str = "truncate_left",
    l2r_nll: bool = False,
    quality: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Likelihoods and generation quality of ``module`` (a DiffusionLitModule) on ``num_rows`` val rows.

    Rows (``diffllm.evaluation.scoring``): the module's own model (the diffusion bound, or the AR-SFT NLL for an
    objective=ar run), the unadapted base with and without the end token, and ``ar_sft`` (an AR-SFT
    model on the same tokenizer, e.g. ``report.ar_ckpt_path``) when given. Batches of
    ``data.eval_batch_size`` rows, batch i seeded ``validation_seed(seed, i)``. Prompts longer than
    the model's positions minus ``gen_length`` are cut from the left and counted
    (``prompts_truncated``), or refused with ``prompt_overflow="error"`` (``diffllm.data.prompt_fit``).
    """
    module.eval()
    datamodule.setup()
    dlm, objective = module.dlm, module.objective
    n = min(num_rows, len(datamodule.val_ds))
    bs = datamodule.hparams.eval_batch_size or datamodule.hparams.batch_size
    likelihood = likelihood_settings(num_samples=likelihood_samples, method="grid")
    own = {objective.role: dlm}  # the bound (diffusion) or the AR-SFT NLL (objective=ar)
    if ar_sft is not None and objective.role != "ar_sft":
        own["ar_sft"] = ar_sft
    prompts, truncated = fit_prompt_rows(
        datamodule.sample_prompts(n),
        module.sampler_config.gen_length,
        dlm,
        prompt_overflow,
        key="report.prompt_overflow",
        bos_id=module.tokenizer.bos_token_id,
    )
    figures, _, _ = compare(
        scored=datamodule.val_ds.select(range(n)),
        train=datamodule.train_ds,
        collate=datamodule.collate,
        batch_size=bs,
        prompts=prompts,
        tokenizer=module.tokenizer,
        eos_id=module.eos_id,
        config=module.sampler_config,
        seed=seed,
        device=module.device,
        likelihood=likelihood,
        gen_batch_size=n,
        ar_base=dlm,
        l2r_nll=l2r_nll and objective.role == "diffusion",
        quality=quality,
        **own,
    )
    report = {
        "rows": n,
        "prompts_truncated": truncated,
        "objective": objective.label,
        "likelihood": {**likelihood, "seed": seed, "batch_size": bs, "schedule": repr(EVAL_SCHEDULE)},
        **figures,
        "sampler": dict(vars(module.sampler_config)),
    }
    return with_deprecated_keys(report)  # the keys renamed in this release, also under their old names


def write_report(r: dict[str, Any], out_dir: str | Path) -> Path:
    path = Path(out_dir) / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=2, default=str))
    return path
