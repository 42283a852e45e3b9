"""``evaluate``'s report (``eval.json``, ``eval.md``, two plots) from models already loaded.

``evaluate_models`` puts a converted diffusion model, the AR base and optionally an AR-SFT model
through ``compare.compare`` (the scoring core that validation and the end-of-run report use too),
then adds what only ``evaluate`` reports: BLEU, the answer NLL by answer length, exact match by task
and the sampler's quality against its number of steps (``sweep.steps_sweep``). ``write_eval``
renders it (``tables.format_markdown``, ``plots``). Loading a checkpoint, an exported folder or a
multirun folder is ``diffllm.inference.evaluate``'s (the layer that loads).

Validation is reproduced exactly: by default the scored rows are the ones training validated on (the
first ``trainer.limit_val_batches`` batches of the validation loader, ``validated_rows``), batched
the same way (``data.eval_batch_size``), each batch masked with the same seed (``validation_seed``)
and the same ``val_likelihood`` settings; so for the checkpoint that training validated last,
``nll_bound`` / ``ar_nll`` equal its ``val/nll_bound`` / ``val/ar_nll``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from diffllm.data.prompt_fit import fit_prompt_rows
from diffllm.diffusion.sampler import SamplerConfig
from diffllm.evaluation import scoring
from diffllm.evaluation.agreement import agreement_on_file
from diffllm.evaluation.compare import (
    EVAL_SCHEDULE,
    compare,
    exact_match_by_task,
    likelihood_settings,
    per_row_figures,
)
from diffllm.evaluation.metrics import bleu
from diffllm.evaluation.names import FIGURES, GAPS, with_deprecated_keys
from diffllm.evaluation.plots import (
    nll_by_length_data,
    plot_nll_by_length,
    plot_quality_vs_steps,
    quality_vs_steps_data,
    save_figure,
)
from diffllm.evaluation.report import provenance
from diffllm.evaluation.scoring import TOKENS_OF
from diffllm.evaluation.sweep import default_steps, steps_sweep
from diffllm.evaluation.tables import format_markdown
from diffllm.model.dlm import DiffusionLM
from diffllm.model.load import ModelLoadError


def default_out_dir(path: str | Path) -> Path:
    """``<run>`` for ``<run>/checkpoints/x.ckpt``; ``<folder>/eval`` for an exported folder."""
    path = Path(path)
    if path.is_dir():
        return path / "eval"
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def validated_rows(cfg: Mapping[str, Any], num_rows: int, batch_size: int) -> int:
    """How many validation rows training scored: ``trainer.limit_val_batches`` as Lightning reads it
    (an int is a batch count, a float a fraction of the batches)."""
    limit = (cfg.get("trainer") or {}).get("limit_val_batches")
    num_batches = math.ceil(num_rows / batch_size)
    if limit is None:
        used = num_batches
    elif isinstance(limit, float):
        used = int(num_batches * limit)
    else:
        used = min(int(limit), num_batches)
    return min(num_rows, used * batch_size)


def pooled(sums: np.ndarray, count: np.ndarray) -> float:
    """Per-token figure over rows with an answer: sum of row sums / sum of row lengths."""
    keep = count > 0
    return float(sums[keep].sum() / count[keep].sum()) if keep.any() else float("nan")


def length_buckets(scores: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Rows grouped by answer length in powers of two ([1], [2, 3], [4, 7], ...): per bucket its rows
    and tokens, every likelihood figure of ``scores`` counted on the scored tokens (``names.FIGURES``:
    ``nll_bound``, ``ar_nll``, ``ar_sft_nll``, ``l2r_nll``) pooled, and the gaps ``gap`` / ``gap_sft``."""
    count = np.asarray(scores["tokens"])
    keep = count > 0
    rows = {k: np.asarray(v)[keep] for k, v in scores.items() if k in FIGURES and TOKENS_OF[k] == "tokens"}
    count = count[keep]
    bucket = np.floor(np.log2(count)).astype(int)
    out = []
    for k in np.unique(bucket):
        sel = bucket == k
        lo, hi = 2**k, 2 ** (k + 1) - 1
        b: dict[str, Any] = {
            "label": f"{lo}" if lo == hi else f"{lo}-{hi}",
            "min_tokens": int(lo),
            "max_tokens": int(hi),
            "rows": int(sel.sum()),
            "tokens": int(count[sel].sum()),
        }
        b.update({FIGURES[row][0]: pooled(v[sel], count[sel]) for row, v in rows.items()})
        for gap, one, other, _ in GAPS:
            if gap in ("gap", "gap_sft") and one in rows and other in rows:
                b[gap] = b[FIGURES[one][0]] - b[FIGURES[other][0]]
        out.append(b)
    return out


def evaluate_models(
    dlm: DiffusionLM,
    tokenizer: Any,
    *,
    eos_id: int,
    sampler: SamplerConfig,
    datamodule: Any,
    run_cfg: Mapping[str, Any],
    source: str,
    ar_base: DiffusionLM | None = None,
    ar_sft: DiffusionLM | None = None,
    ar_ckpt_path: str | Path | None = None,
    data_path: str | Path | None = None,
    rows: int | None = None,
    gen_rows: int | None = None,
    device: str = "cpu",
    seed: int | None = None,
    batch_size: int | None = None,
    gen_batch_size: int = 16,
    likelihood: Mapping[str, Any] | None = None,
    steps_grid: Sequence[int] | None = None,
    progress: bool = False,
    prompt_overflow: str = "error",
    l2r_nll: bool = True,
    quality: Mapping[str, Any] | None = None,
    agreement_file: str | Path | None = None,
    agreement_base: DiffusionLM | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """``eval.json``'s content for loaded models (the keyword arguments are those of
    ``diffllm.inference.evaluate.evaluate``); ``progress``: a bar over the likelihood batches;
    ``agreement_base``: the base model whose greedy answers ``agreement_file``'s are compared with
    (``ar_base``, or the base loaded for it alone)."""
    started = time.perf_counter() if started is None else started
    seed = int(run_cfg.get("seed", 0) if seed is None else seed)
    lk = likelihood_settings(run_cfg.get("val_likelihood"), **dict(likelihood or {}))
    dm = datamodule
    bs = int(batch_size or dm.hparams.eval_batch_size or dm.hparams.batch_size)
    if rows is None:
        rows = len(dm.val_ds) if data_path is not None else validated_rows(run_cfg, len(dm.val_ds), bs)
    rows = min(int(rows), len(dm.val_ds))
    if rows < 1:
        raise ValueError(f"no validation row to score (rows={rows}, {len(dm.val_ds)} available)")
    prompts, truncated = fit_prompt_rows(
        dm.sample_prompts(rows if gen_rows is None else int(gen_rows)),
        sampler.gen_length,
        dlm,
        prompt_overflow,
        bos_id=tokenizer.bos_token_id,
    )
    refs = [p["reference"] for p in prompts]
    figures, scores, answers = compare(
        scored=dm.val_ds.select(range(rows)),
        train=dm.train_ds,
        collate=dm.collate,
        batch_size=bs,
        prompts=prompts,
        tokenizer=tokenizer,
        eos_id=eos_id,
        config=sampler,
        seed=seed,
        device=device,
        likelihood=lk,
        gen_batch_size=gen_batch_size,
        diffusion=dlm,
        ar_base=ar_base,
        ar_sft=ar_sft,
        progress=lambda it: tqdm(it, desc="likelihood", total=math.ceil(rows / bs), disable=not progress),
        l2r_nll=l2r_nll,
        quality=quality,
    )
    if ar_base is None:  # the headline keys stay, as not-a-number
        figures.update(
            dict.fromkeys(("ar_nll", "ar_nll_se", "ar_nll_no_end", "gap", "gap_se", "ar_ppl"), float("nan"))
        )
        figures.update({f"ar_base_{k}": float("nan") for k in scoring.quality(answers["diffusion"], refs)})
        figures["examples"] = [{**e, "ar_base": ""} for e in figures["examples"]]
    for model, a in answers.items():
        figures[f"{model}_bleu"] = bleu(a.texts, refs)
    sweep = steps_sweep(
        dlm,
        tokenizer,
        [p["prompt_ids"] for p in prompts],
        sampler,
        default_steps(sampler, dlm) if steps_grid is None else list(steps_grid),
        eos_id=eos_id,
        seed=seed,
        batch_size=gen_batch_size,
        refs=refs,
    )
    texts = {m: a.texts for m, a in answers.items()}
    result: dict[str, Any] = {
        "source": str(source),
        "ar_ckpt_path": None if ar_ckpt_path is None else str(ar_ckpt_path),
        "prompts_truncated": truncated,
        "data": f"file {data_path}" if data_path is not None else "validation split of the run",
        "rows": rows,
        "gen_rows": len(prompts),
        "likelihood": {**lk, "seed": seed, "batch_size": bs, "schedule": repr(EVAL_SCHEDULE)},
        **figures,
        "sampler": dict(vars(sampler)),
        "length_buckets": length_buckets(scores),
        "by_task": exact_match_by_task([p["row"].get("task") for p in prompts], refs, **texts),
        "steps_grid": [g for g in sweep if "skipped" not in g],
        "steps_skipped": [{"steps": g["steps"], "reason": g["skipped"]} for g in sweep if "skipped" in g],
        "per_row": per_row_figures(scores, answers, refs),
        "provenance": provenance(device, time.perf_counter() - started, None),
    }
    if agreement_file is not None:
        if agreement_base is None:
            raise ModelLoadError(
                "agreement_file needs the base model, and none could be loaded (see the log)"
            )
        result["agreement"] = agreement_on_file(
            agreement_file,
            prompt_format=dm.format,
            tokenizer=tokenizer,
            eos_id=eos_id,
            config=sampler,
            seed=seed,
            batch_size=gen_batch_size,
            base=agreement_base,
            diffusion=dlm,
            ar_sft=ar_sft,
            prompt_overflow=prompt_overflow,
        )
    return with_deprecated_keys(result)


def write_eval(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``nll_by_length.png``, ``quality_vs_steps.png``, ``eval.md`` and ``eval.json`` into ``out_dir``
    (their paths recorded in ``result["plots"]``); returns {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "nll_by_length": save_figure(
            plot_nll_by_length(nll_by_length_data(result)), out_dir / "nll_by_length.png"
        ),
        "quality_vs_steps": save_figure(
            plot_quality_vs_steps(quality_vs_steps_data(result)), out_dir / "quality_vs_steps.png"
        ),
    }
    result["plots"] = {k: str(v) for k, v in files.items()}
    files["eval.md"] = out_dir / "eval.md"
    files["eval.json"] = out_dir / "eval.json"
    files["eval.md"].write_text(format_markdown(result))
    # eval.json last and atomically: its presence means the evaluation finished (bench.recipes skips it)
    tmp = out_dir / f".eval.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, files["eval.json"])
    return files
