"""The research question in numbers: the converted diffusion model vs the AR models, on the same answers.

Two honest readings, side by side: the unadapted AR base on exactly the same scored tokens (also
without the end token, which a base model was never trained to produce there), and an AR-SFT
model trained at equal budget (``objective=ar``, ``report.ar_ckpt_path``): the bound minus its NLL is
the real price of the conversion. Plus the answers' unigram cross-entropy as the no-context
reference, generation quality (exact match, ROUGE-L, answer length, EOS rate) of every model, and
exact-match differences against AR-SFT. Every figure carries its standard error; the figures
come from ``diffllm.evaluation.compare.compare`` (as ``diffllm.cli.evaluate``'s), ``report.json`` also records
its provenance.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from diffllm.data.prompt_fit import fit_prompt_rows
from diffllm.evaluation.compare import EVAL_SCHEDULE, compare, likelihood_settings
from diffllm.evaluation.quality import quality_tables
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
    order_nll: bool = False,
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
        order_nll=order_nll and objective.role == "diffusion",
        quality=quality,
        **own,
    )
    return {
        "rows": n,
        "prompts_truncated": truncated,
        "objective": objective.label,
        "likelihood": {**likelihood, "seed": seed, "batch_size": bs, "schedule": repr(EVAL_SCHEDULE)},
        **figures,
        "sampler": dict(vars(module.sampler_config)),
    }


def plus_minus(r: dict[str, Any], key: str, digits: int = 3) -> str:
    """``value ± se`` of ``key`` in a report, or an em dash when absent / not finite."""
    value, se = r.get(key), r.get(f"{key}_se")
    if value is None or not math.isfinite(value):
        return "—"
    if se is None or not math.isfinite(se):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {se:.{digits}f}"


MODEL_COLUMNS = (("diffusion", "diffusion"), ("ar_sft", "AR-SFT"), ("ar", "AR base"))


def format_report(r: dict[str, Any]) -> str:
    """A plain-text table of a report (``build_report`` or ``evaluate``): every figure ± its SE."""
    lines = [
        f"== diffllm report: {r['rows']} validation rows, {r['answer_tokens']} answer tokens (answer + end token) ==",
        "answer NLL (nats/token), ± SE over rows",
    ]
    nll_rows = [
        ("nll_bound", "diffusion, ELBO upper bound"),
        ("ar_sft_nll", "AR-SFT, same budget"),
        ("ar_nll", "AR base, unadapted"),
        ("ar_nll_no_end", f"AR base, without end token ({r.get('answer_tokens_no_end', '?')} tokens)"),
    ]
    lines += [f"  {label:44s}{plus_minus(r, key):>16s}" for key, label in nll_rows if key in r]
    lines.append(f"  {'unigram CE of the answers':44s}{r['unigram_ce']:>16.3f}   (no-context reference)")
    if "gap_sft" in r:
        lines.append(
            f"  {'bound - AR-SFT (price of the conversion)':44s}{plus_minus(r, 'gap_sft'):>16s}   (paired over rows)"
        )
    if "gap" in r:
        lines.append(f"  {'bound - AR base':44s}{plus_minus(r, 'gap'):>16s}   (paired over rows)")
    cols = [(key, name) for key, name in MODEL_COLUMNS if f"{key}_exact_match" in r]
    lines += [
        "",
        f"generation, {r.get('gen_rows', r['rows'])} prompts"
        + (f" ({r['prompts_truncated']} cut from the left)" if r.get("prompts_truncated") else "")
        + "".join(f"{n:>18s}" for _, n in cols),
    ]
    for metric, label, digits in (
        ("exact_match", "exact match", 3),
        ("rougeL", "ROUGE-L", 3),
        ("answer_length", "answer tokens (mean)", 2),
        ("eos_rate", "EOS rate", 3),
        ("tokens_per_pass", "tokens per forward pass", 2),
    ):
        lines.append(
            f"  {label:26s}" + "".join(f"{plus_minus(r, f'{k}_{metric}', digits):>18s}" for k, _ in cols)
        )
    lines.append(
        f"  {'generation seconds':26s}"
        + "".join(
            f"{r[f'{k}_seconds']:>18.2f}" if math.isfinite(r[f"{k}_seconds"]) else f"{'—':>18s}"
            for k, _ in cols
        )
    )
    ref = "ar_sft" if "ar_sft_exact_match" in r else "ar"
    ref_name = dict(MODEL_COLUMNS)[ref]
    for k, name in cols:
        key = f"{k}_minus_{ref}_exact_match"
        if key in r:
            lines.append(
                f"  {f'EM {name} - {ref_name}':26s}{plus_minus(r, key):>18s}   (paired over prompts)"
            )
    return "\n".join(lines + quality_tables(r))


def write_report(r: dict[str, Any], out_dir: str | Path) -> Path:
    path = Path(out_dir) / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=2, default=str))
    return path
