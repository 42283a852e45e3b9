"""Evaluate a converted diffusion model against the AR model it came from.

    python -m diffllm.evaluate ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt
    python -m diffllm.evaluate ckpt_path=exports/tiny/merged data_path=rows.jsonl rows=200
    python -m diffllm.evaluate ckpt_path=... sampler.strategy=margin steps_grid=[8,16,32]

On the same answers (the run's validation split by default, or ``data_path``):

* likelihood and generation through ``diffllm.evaluation.compare.compare`` (as the end-of-run report; on
  the scoring core that validation uses too): the
  diffusion answer NLL upper bound (ELBO, linear schedule, the run's ``val_likelihood`` estimator)
  vs the base AR model's NLL (adapters off, causal attention), also without the end token, and,
  with ``ar_ckpt_path``, an AR-SFT checkpoint's NLL (objective=ar: the baseline at equal budget);
  each ± its standard error, gaps paired over rows, the gap per answer-length bucket, and the
  answers' unigram cross-entropy as the no-context reference (all nats / answer token, EOS included);
* generation: exact match, ROUGE-L, BLEU, answer length and EOS rate (± SE) for the diffusion
  sampler (the checkpoint's sampler config with ``sampler.*`` overrides), the AR-SFT model and the
  base model (greedy, [MASK] suppressed), exact-match differences against AR-SFT, time and forward
  passes; and diffusion quality against the number of steps;
* with ``agreement_file`` (e.g. ``diffllm.assets.ALPACA_SAMPLE``, 100 real Alpaca instructions): how
  close the diffusion model's and AR-SFT's answers stay to the base model's greedy answers on those
  prompts (``diffllm.evaluation.agreement``: exact match, first differing token).

Writes ``eval.json``, ``eval.md``, ``nll_by_length.png`` and ``quality_vs_steps.png`` into the run
folder (``<run>/`` for ``<run>/checkpoints/x.ckpt``, ``<folder>/eval`` for an exported folder) or
``out_dir``.

Validation is reproduced exactly: by default the scored rows are the ones training validated on (the
first ``trainer.limit_val_batches`` batches of the validation loader), batched the same way
(``data.eval_batch_size``), each batch masked with the same seed (``validation_seed``, as
``DiffusionLitModule.validation_step``) and the same ``val_likelihood`` settings
(``evaluation.likelihood_settings``). So for the
checkpoint that training validated last, ``nll_bound`` / ``ar_nll`` equal its ``val/nll_bound`` /
``val/ar_nll``. Changing ``batch_size`` or ``rows`` changes the masks drawn, not the expectation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from diffllm.cli.support import set_keys
from diffllm.config.resolvers import hydra_main
from diffllm.config.schema import ValLikelihoodNode, check_node, check_positive, check_sampler_overrides
from diffllm.data.prompt_fit import fit_prompt_rows
from diffllm.diffusion.sampler import SamplerConfig
from diffllm.evaluation import scoring
from diffllm.evaluation.agreement import agreement_on_file, format_agreement
from diffllm.evaluation.compare import (
    EVAL_SCHEDULE,
    compare,
    exact_match_by_task,
    likelihood_settings,
    per_row_figures,
)
from diffllm.evaluation.metrics import bleu
from diffllm.evaluation.plots import plot_nll_by_length, plot_quality_vs_steps, save_figure
from diffllm.evaluation.quality import quality_tables
from diffllm.evaluation.report import MODEL_COLUMNS, format_report, plus_minus, provenance
from diffllm.evaluation.scoring import Answers
from diffllm.inference.loading import (
    InferenceModel,
    ar_baseline_model,
    load_for_inference,
    run_datamodule,
)
from diffllm.model.load import ModelLoadError
from diffllm.training.checkpoints import load_ar_sft

log = logging.getLogger("diffllm.cli.evaluate")


# ----------------------------------------------------------------------------------- the inputs


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


# ----------------------------------------------------------------------------------- likelihood


def pooled(sums: np.ndarray, count: np.ndarray) -> float:
    """Per-token figure over rows with an answer: sum of row sums / sum of row lengths."""
    keep = count > 0
    return float(sums[keep].sum() / count[keep].sum()) if keep.any() else float("nan")


def length_buckets(nll: np.ndarray, ar: np.ndarray, count: np.ndarray) -> list[dict[str, Any]]:
    """Rows grouped by answer length in powers of two ([1], [2, 3], [4, 7], ...), pooled per bucket."""
    keep = count > 0
    nll, ar, count = nll[keep], ar[keep], count[keep]
    bucket = np.floor(np.log2(count)).astype(int)
    out = []
    for k in np.unique(bucket):
        sel = bucket == k
        lo, hi = 2**k, 2 ** (k + 1) - 1
        b_nll, b_ar = pooled(nll[sel], count[sel]), pooled(ar[sel], count[sel])
        out.append(
            {
                "label": f"{lo}" if lo == hi else f"{lo}-{hi}",
                "min_tokens": int(lo),
                "max_tokens": int(hi),
                "rows": int(sel.sum()),
                "tokens": int(count[sel].sum()),
                "nll_bound": b_nll,
                "ar_nll": b_ar,
                "gap": b_nll - b_ar,
            }
        )
    return out


# ----------------------------------------------------------------------------------- generation


def diffusion_answers(
    im: InferenceModel,
    prompt_ids: Sequence[list[int]],
    config: SamplerConfig,
    *,
    seed: int,
    batch_size: int,
    progress: bool = True,
    desc: str = "diffusion",
) -> Answers:
    """The sampler's answers with their lengths, EOS flags, time and forward passes (all batches)."""
    log.info("%s: %d prompts", desc, len(prompt_ids))
    return scoring.diffusion_answers(
        im.dlm, im.tokenizer, prompt_ids, config, eos_id=im.eos_id, seed=seed, batch_size=batch_size
    )


def quality(answers: Answers, refs: Sequence[str]) -> dict[str, float]:
    """``scoring.quality`` (exact match, ROUGE-L, length, EOS rate, with SEs) plus corpus BLEU-4."""
    return {**scoring.quality(answers, refs), "bleu": bleu(answers.texts, refs)}


def default_steps_grid(config: SamplerConfig) -> list[int]:
    """G/8, G/4, G/2, G (G = gen_length), the ones the block layout allows."""
    return sorted({max(config.gen_length // d, 1) for d in (8, 4, 2, 1)})


def steps_sweep(
    im: InferenceModel,
    prompt_ids: Sequence[list[int]],
    refs: Sequence[str],
    base: SamplerConfig,
    grid: Sequence[int],
    *,
    seed: int,
    batch_size: int,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Quality of the sampler at each step count (schedule mode: threshold off); invalid counts skipped."""
    done, skipped = [], []
    for steps in grid:
        try:
            config = dataclasses.replace(base, steps=int(steps), threshold=None)
        except ValueError as err:
            skipped.append({"steps": int(steps), "reason": str(err)})
            log.warning("steps=%s skipped: %s", steps, err)
            continue
        gen = diffusion_answers(
            im, prompt_ids, config, seed=seed, batch_size=batch_size, progress=progress, desc=f"steps={steps}"
        )
        done.append({"steps": int(steps), **quality(gen, refs)})
    return done, skipped


# ----------------------------------------------------------------------------------- the report


def _cell(text: Any, limit: int = 80) -> str:
    s = str(text).replace("\n", "⏎").replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_markdown(r: Mapping[str, Any]) -> str:
    """``eval.md``: the headline table, NLL by length, quality vs steps, examples."""
    lk = r["likelihood"]
    cols = [(k, name) for k, name in MODEL_COLUMNS if f"{k}_exact_match" in r]
    lines = [
        "# diffllm evaluation",
        "",
        f"- model: `{r['source']}`" + (f"; AR-SFT: `{r['ar_ckpt_path']}`" if r.get("ar_ckpt_path") else ""),
        f"- data: {r['data']}; {r['rows']} rows scored ({r['answer_tokens']} answer tokens, EOS included), "
        f"{r['gen_rows']} generated",
        f"- likelihood: ELBO bound, linear schedule, {lk['num_samples']}-point `{lk['method']}` t estimator, "
        f"batch {lk['batch_size']}, seed {lk['seed']} (batch i: validation_seed(seed, i))",
        f"- sampler: {', '.join(f'{k}={v}' for k, v in r['sampler'].items())}",
        "",
        "Answer NLL, nats per scored token (answer + end token), ± standard error over rows "
        "(ratio estimator, delta method; gaps paired over the same rows):",
        "",
        "| model | answer NLL | ± SE | tokens |",
        "|---|---:|---:|---:|",
        *(
            f"| {label} | {_num(r[key])} | {_num(r.get(key + '_se'))} | {tokens} |"
            for key, label, tokens in (
                ("nll_bound", "diffusion (ELBO upper bound)", r["answer_tokens"]),
                ("ar_sft_nll", "AR-SFT, same budget", r["answer_tokens"]),
                ("ar_nll", "AR base, unadapted", r["answer_tokens"]),
                ("ar_nll_no_end", "AR base, without the end token", r.get("answer_tokens_no_end")),
            )
            if key in r
        ),
        f"| unigram CE of the answers | {_num(r['unigram_ce'])} | | (no-context reference) |",
        *(
            f"| {label} | {_num(r[key])} | {_num(r.get(key + '_se'))} | paired |"
            for key, label in (("gap_sft", "bound − AR-SFT"), ("gap", "bound − AR base"))
            if key in r
        ),
        "",
        "Generation (± SE: binomial for exact match and EOS rate, sd/√n otherwise):",
        "",
        "| metric | " + " | ".join(name for _, name in cols) + " |",
        "|---|" + "---:|" * len(cols),
        *(
            f"| {label} | " + " | ".join(plus_minus(r, f"{k}_{metric}", digits) for k, _ in cols) + " |"
            for metric, label, digits in (
                ("exact_match", "exact match", 3),
                ("rougeL", "ROUGE-L", 3),
                ("bleu", "BLEU-4 (corpus)", 3),
                ("answer_length", "answer tokens (mean)", 2),
                ("eos_rate", "EOS rate", 3),
                ("seconds", "generation seconds", 2),
                ("nfe", "forward passes", 0),
                ("tokens_per_pass", "tokens per forward pass", 2),
            )
        ),
        *(
            f"| exact match − {cols_ref} | "
            + " | ".join(plus_minus(r, f"{k}_minus_{ref}_exact_match") for k, _ in cols)
            + " |"
            for ref, cols_ref in [
                (
                    "ar_sft" if "ar_sft_exact_match" in r else "ar",
                    "AR-SFT" if "ar_sft_exact_match" in r else "AR base",
                )
            ]
        ),
        "",
        "BLEU-4 is 0 when no 4-gram of the whole set matches: expected for answers of a few words.",
        "",
        "## Answer NLL by answer length",
        "",
        "| answer tokens | rows | tokens | NLL bound | AR NLL | gap |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {b['label']} | {b['rows']} | {b['tokens']} | {_num(b['nll_bound'])} | {_num(b['ar_nll'])} | {_num(b['gap'])} |"
        for b in r["length_buckets"]
    ]
    if r.get("by_task"):
        lines += [
            "",
            "## Exact match by task",
            "",
            "| task | rows | " + " | ".join(n for _, n in cols) + " |",
            "|---|---:|" + "---:|" * len(cols),
        ]
        lines += [
            f"| {t['task']} | {t['rows']} | "
            + " | ".join(_num(t.get(f"{k}_exact_match")) for k, _ in cols)
            + " |"
            for t in r["by_task"]
        ]
    lines += [
        "",
        "## Diffusion quality vs sampling steps",
        "",
        "| steps | exact match | ROUGE-L | BLEU-4 | seconds | forward passes |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {g['steps']} | {_num(g['exact_match'])} | {_num(g['rougeL'])} | {_num(g['bleu'])} | {_num(g['seconds'], 2)} | {g['nfe']} |"
        for g in r["steps_grid"]
    ]
    lines += [f"\n(steps={s['steps']} skipped: {s['reason']})" for s in r["steps_skipped"]]
    lines += quality_tables(r, markdown=True)
    if r.get("agreement"):
        lines += [
            "",
            "## Agreement with the base model",
            "",
            *format_agreement(r["agreement"], markdown=True),
        ]
    lines += ["", *(f"![{name}]({Path(path).name})" for name, path in r["plots"].items()), ""]
    lines += ["## Examples", "", "| prompt | reference | " + " | ".join(n for _, n in cols) + " |"]
    lines += ["|---|---|" + "---|" * len(cols)]
    lines += [
        f"| {_cell(e['prompt'])} | {_cell(e['reference'])} | "
        + " | ".join(_cell(e.get(k, "")) for k, _ in cols)
        + " |"
        for e in r["examples"]
    ]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out_dir: Path, buckets_fig, steps_fig) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "nll_by_length": save_figure(buckets_fig, out_dir / "nll_by_length.png"),
        "quality_vs_steps": save_figure(steps_fig, out_dir / "quality_vs_steps.png"),
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


# ----------------------------------------------------------------------------------- the task


def evaluate(
    ckpt_path: str | Path,
    *,
    data_path: str | Path | None = None,
    rows: int | None = None,
    gen_rows: int | None = None,
    out_dir: str | Path | None = None,
    device: str = "cpu",
    seed: int | None = None,
    batch_size: int | None = None,
    gen_batch_size: int = 16,
    likelihood: Mapping[str, Any] | None = None,
    sampler: Mapping[str, Any] | None = None,
    steps_grid: Sequence[int] | None = None,
    ar_baseline: bool = True,
    ar_ckpt_path: str | Path | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    prompt_overflow: str = "error",
    order_nll: bool = True,
    quality_cfg: Mapping[str, Any] | None = None,
    agreement_file: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint or exported folder; writes the report files and returns ``eval.json``'s content.

    rows: rows scored for likelihood (None: the rows training validated on, or all of ``data_path``);
    gen_rows: rows generated (None: as many as scored); likelihood: ``num_samples`` / ``method``
    replacing the run's ``val_likelihood``; sampler: fields replacing the checkpoint's sampler;
    steps_grid: step counts for the quality-vs-steps sweep (None: G/8, G/4, G/2, G);
    prompt_overflow: ``error`` or ``truncate_left`` for prompts longer than the model's positions
    minus ``gen_length`` (``diffllm.data.prompt_fit``); agreement_file: Alpaca rows on which every
    model's answers are compared with the base model's (``evaluation.agreement``; ``eval.json``'s
    ``agreement``).
    """
    started = time.perf_counter()
    # the arguments against the schema, before anything is read
    check_positive(
        {"rows": rows, "gen_rows": gen_rows, "batch_size": batch_size, "gen_batch_size": gen_batch_size}
    )
    check_sampler_overrides(dict(sampler or {}))
    if agreement_file is not None and not Path(agreement_file).is_file():
        raise FileNotFoundError(
            f"agreement_file={str(agreement_file)!r} does not exist; pass a .json/.jsonl file of Alpaca rows "
            "(the 100 shipped with diffllm: agreement_file='${asset:alpaca/alpaca_sample.json}')"
        )
    lk_given = {k: v for k, v in dict(likelihood or {}).items() if v is not None}
    if lk_given:
        check_node(ValLikelihoodNode, lk_given)
    im = load_for_inference(ckpt_path, device=device, trust_remote_code=trust_remote_code)
    cfg, tok = im.cfg, im.tokenizer
    seed = int(cfg.get("seed", 0) if seed is None else seed)
    lk = likelihood_settings(cfg.get("val_likelihood"), **dict(likelihood or {}))
    config = im.sampler_config.with_overrides(sampler)

    dm = run_datamodule(cfg, tok, data_path)
    bs = int(batch_size or dm.hparams.eval_batch_size or dm.hparams.batch_size)
    if rows is None:
        rows = len(dm.val_ds) if data_path is not None else validated_rows(cfg, len(dm.val_ds), bs)
    rows = min(int(rows), len(dm.val_ds))
    if rows < 1:
        raise ValueError(f"no validation row to score (rows={rows}, {len(dm.val_ds)} available)")

    ar_model = ar_baseline_model(im, device) if ar_baseline else None
    ar_sft = (
        load_ar_sft(ar_ckpt_path, tok, device=device, trust_remote_code=trust_remote_code)
        if ar_ckpt_path is not None
        else None
    )
    prompts, truncated = fit_prompt_rows(
        dm.sample_prompts(rows if gen_rows is None else int(gen_rows)),
        config.gen_length,
        im.dlm,
        prompt_overflow,
        bos_id=tok.bos_token_id,
    )
    refs = [p["reference"] for p in prompts]
    figures, scores, answers = compare(
        scored=dm.val_ds.select(range(rows)),
        train=dm.train_ds,
        collate=dm.collate,
        batch_size=bs,
        prompts=prompts,
        tokenizer=tok,
        eos_id=im.eos_id,
        config=config,
        seed=seed,
        device=device,
        likelihood=lk,
        gen_batch_size=gen_batch_size,
        diffusion=im.dlm,
        ar_base=ar_model,
        ar_sft=ar_sft,
        progress=lambda it: tqdm(it, desc="likelihood", total=math.ceil(rows / bs), disable=not progress),
        order_nll=order_nll,
        quality=quality_cfg,
    )
    if ar_model is None:  # the headline keys stay, as not-a-number
        figures.update(
            dict.fromkeys(("ar_nll", "ar_nll_se", "ar_nll_no_end", "gap", "gap_se", "ar_ppl"), float("nan"))
        )
        figures.update({f"ar_{k}": float("nan") for k in quality(answers["diffusion"], refs)})
        figures["examples"] = [{**e, "ar": ""} for e in figures["examples"]]
    for model, a in answers.items():
        figures[f"{model}_bleu"] = bleu(a.texts, refs)
    prompt_ids = [p["prompt_ids"] for p in prompts]
    grid, skipped = steps_sweep(
        im,
        prompt_ids,
        refs,
        config,
        default_steps_grid(config) if steps_grid is None else list(steps_grid),
        seed=seed,
        batch_size=gen_batch_size,
        progress=progress,
    )

    buckets = length_buckets(
        scores["diffusion"], scores.get("ar_base", np.full(rows, np.nan)), scores["tokens"]
    )
    texts = {m: a.texts for m, a in answers.items()}
    result: dict[str, Any] = {
        "source": str(ckpt_path),
        "ar_ckpt_path": None if ar_ckpt_path is None else str(ar_ckpt_path),
        "prompts_truncated": truncated,
        "data": f"file {data_path}" if data_path is not None else "validation split of the run",
        "rows": rows,
        "gen_rows": len(prompts),
        "likelihood": {**lk, "seed": seed, "batch_size": bs, "schedule": repr(EVAL_SCHEDULE)},
        **figures,
        "sampler": dict(vars(config)),
        "length_buckets": buckets,
        "by_task": exact_match_by_task(
            [p["row"].get("task") for p in prompts],
            refs,
            diffusion=texts["diffusion"],
            ar_sft=texts.get("ar_sft"),
            ar=texts.get("ar"),
        ),
        "steps_grid": grid,
        "steps_skipped": skipped,
        "per_row": per_row_figures(scores, answers, refs),
        "provenance": provenance(device, time.perf_counter() - started, None),
    }
    if agreement_file is not None:
        base = ar_model if ar_model is not None else ar_baseline_model(im, device)
        if base is None:
            raise ModelLoadError(
                "agreement_file needs the base model, and none could be loaded (see the log)"
            )
        result["agreement"] = agreement_on_file(
            agreement_file,
            prompt_format=dm.format,
            tokenizer=tok,
            eos_id=im.eos_id,
            config=config,
            seed=seed,
            batch_size=gen_batch_size,
            base=base,
            diffusion=im.dlm,
            ar_sft=ar_sft,
            prompt_overflow=prompt_overflow,
        )
    ar_q = {"exact_match": result["ar_exact_match"], "rougeL": result["ar_rougeL"]}
    out = Path(out_dir) if out_dir is not None else default_out_dir(ckpt_path)
    files = write_outputs(
        result,
        out,
        plot_nll_by_length(buckets, result["unigram_ce"]),
        plot_quality_vs_steps(grid, ar_q),
    )
    result["files"] = {k: str(v) for k, v in files.items()}
    return result


# ----------------------------------------------------------------------------------- a multirun folder


def multirun_jobs(folder: str | Path) -> list[Path]:
    """``<job>/checkpoints/last.ckpt`` of every job folder directly under ``folder`` (a Hydra multirun
    folder: ``multirun/<date>/<time>/``), sorted by job folder name."""
    return sorted(Path(folder).glob("*/checkpoints/last.ckpt"))


# (key in eval.json, column); reference-free keys are read from reference_free["diffusion"]
COMPARISON = (
    ("nll_bound", "NLL bound"),
    ("l2r_nll", "L2R NLL"),
    ("ar_sft_nll", "AR-SFT NLL"),
    ("ar_nll", "AR NLL"),
    ("gap", "bound − AR"),
    ("diffusion_exact_match", "exact match"),
    ("diffusion_rougeL", "ROUGE-L"),
    ("ar_scored_nll", "AR-scored NLL"),
)


def format_comparison(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One markdown table: a row per job (``job name -> eval.json content``), each figure ± SE."""
    columns = [
        (k, name)
        for k, name in COMPARISON
        if any(k in r or k in (r.get("reference_free") or {}).get("diffusion", {}) for r in results.values())
    ]
    lines = [
        "| job | " + " | ".join(name for _, name in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for job, r in results.items():
        figures = {**r, **(r.get("reference_free") or {}).get("diffusion", {})}
        lines.append(f"| {job} | " + " | ".join(plus_minus(figures, k) for k, _ in columns) + " |")
    return "\n".join(lines)


def evaluate_multirun(folder: str | Path, **kwargs: Any) -> tuple[dict[str, dict[str, Any]], Path]:
    """``evaluate`` every job of a multirun folder (each writes its own report into its job folder);
    writes ``comparison.md`` into ``folder``; returns ({job: result}, that file)."""
    jobs = multirun_jobs(folder)
    if not jobs:
        raise FileNotFoundError(
            f"{str(folder)!r} holds no <job>/checkpoints/last.ckpt; pass a multirun folder "
            "(multirun/<date>/<time>), a .ckpt or an exported folder"
        )
    results = {}
    for ckpt in jobs:
        log.info("job %s", ckpt.parent.parent.name)
        results[ckpt.parent.parent.name] = evaluate(ckpt, **kwargs)
    path = Path(folder) / "comparison.md"
    path.write_text(f"# {len(jobs)} jobs of {folder}\n\n" + format_comparison(results) + "\n")
    return results, path


# ----------------------------------------------------------------------------------- the CLI


def run(cfg: DictConfig) -> dict[str, Any]:
    """The CLI body (``conf/evaluate.yaml``); ``sampler.*`` keys left at ??? keep the checkpoint's value."""
    # the same arguments for one checkpoint and for every job of a multirun folder
    kwargs: dict[str, Any] = dict(
        data_path=cfg.data_path,
        rows=cfg.rows,
        gen_rows=cfg.gen_rows,
        device=cfg.device,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        gen_batch_size=cfg.gen_batch_size,
        likelihood=OmegaConf.to_container(cfg.likelihood),
        sampler=set_keys(cfg.sampler),
        steps_grid=None if cfg.steps_grid is None else list(cfg.steps_grid),
        ar_baseline=cfg.ar_baseline,
        ar_ckpt_path=cfg.ar_ckpt_path,
        progress=cfg.progress,
        trust_remote_code=bool(cfg.trust_remote_code),
        prompt_overflow=cfg.prompt_overflow,
        order_nll=cfg.order_nll,
        quality_cfg=OmegaConf.to_container(cfg.quality),
        agreement_file=cfg.agreement_file,
    )
    path = Path(cfg.ckpt_path)
    if path.is_dir() and multirun_jobs(path):  # a multirun folder: every job, then one table
        results, table = evaluate_multirun(path, **kwargs)
        print("\n" + format_comparison(results) + f"\n\n  comparison.md      {table}", flush=True)
        return {"jobs": results, "comparison": str(table)}
    result = evaluate(cfg.ckpt_path, out_dir=cfg.out_dir, **kwargs)
    print("\n" + format_report(result), flush=True)
    cols = [k for k in ("diffusion", "ar_sft", "ar") if f"{k}_bleu" in result]
    print(f"  {'BLEU-4 (corpus)':26s}" + "".join(f"{result[f'{k}_bleu']:>18.3f}" for k in cols), flush=True)
    if result.get("agreement"):
        print("\n" + "\n".join(format_agreement(result["agreement"])), flush=True)
    print("\n" + "\n".join(f"  {name:18s} {path}" for name, path in result["files"].items()), flush=True)
    return result


@hydra_main("evaluate")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ModelLoadError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
