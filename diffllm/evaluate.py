"""Evaluate a converted diffusion model against the AR model it came from.

    python -m diffllm.evaluate ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt
    python -m diffllm.evaluate ckpt_path=exports/tiny/merged data_path=rows.jsonl rows=200
    python -m diffllm.evaluate ckpt_path=... sampler.strategy=margin steps_grid=[8,16,32]

On the same answers (the run's validation split by default, or ``data_path``):

* likelihood (``diffllm.scoring``, the same core as validation and the end-of-run report): the
  diffusion answer NLL upper bound (ELBO, linear schedule, the run's ``val_likelihood`` estimator)
  vs the base AR model's NLL (adapters off, causal attention), also without the end token, and,
  with ``ar_ckpt_path``, an AR-SFT checkpoint's NLL (objective=ar: the baseline at equal budget);
  each ± its standard error, gaps paired over rows, the gap per answer-length bucket, and the
  answers' unigram cross-entropy as the no-context reference (all nats / answer token, EOS included);
* generation: exact match, ROUGE-L, BLEU, answer length and EOS rate (± SE) for the diffusion
  sampler (the checkpoint's sampler config with ``sampler.*`` overrides), the AR-SFT model and the
  base model (greedy, [MASK] suppressed), exact-match differences against AR-SFT, time and forward
  passes; and diffusion quality against the number of steps.

Writes ``eval.json``, ``eval.md``, ``nll_by_length.png`` and ``quality_vs_steps.png`` into the run
folder (``<run>/`` for ``<run>/checkpoints/x.ckpt``, ``<folder>/eval`` for an exported folder) or
``out_dir``.

Validation is reproduced exactly: by default the scored rows are the ones training validated on (the
first ``trainer.limit_val_batches`` batches of the validation loader), batched the same way
(``data.eval_batch_size``), each batch masked with the same seed (``likelihood.validation_seed``,
as ``DiffusionLitModule.validation_step``) and the same ``val_likelihood`` settings. So for the
checkpoint that training validated last, ``nll_bound`` / ``ar_nll`` equal its ``val/nll_bound`` /
``val/ar_nll``. Changing ``batch_size`` or ``rows`` changes the masks drawn, not the expectation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from diffllm import scoring
from diffllm.config import CONF_DIR
from diffllm.diffusion.sampler import SamplerConfig
from diffllm.generate import sampler_with_overrides
from diffllm.inference import InferenceModel, load_ar_sft, load_for_inference
from diffllm.metrics import bleu, exact_match, unigram_cross_entropy
from diffllm.model.dlm import DiffusionLM
from diffllm.model.load import ModelLoadError, build_diffusion_model
from diffllm.objectives import ARObjective
from diffllm.report import MODEL_COLUMNS, _answer_tokens, _pm, format_report, generation_figures, provenance
from diffllm.schema import ValLikelihoodNode, check_node, check_positive, check_sampler_overrides
from diffllm.scoring import Answers

log = logging.getLogger("diffllm.evaluate")

NUM_EXAMPLES = 8


# ----------------------------------------------------------------------------------- the inputs


def default_out_dir(path: str | Path) -> Path:
    """``<run>`` for ``<run>/checkpoints/x.ckpt``; ``<folder>/eval`` for an exported folder."""
    path = Path(path)
    if path.is_dir():
        return path / "eval"
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def eval_datamodule(
    cfg: Mapping[str, Any], tokenizer: Any, data_path: str | Path | None = None, **overrides: Any
):
    """The run's datamodule rebuilt from its config (``data_path``: that file as the validation split)."""
    from hydra.utils import instantiate

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


def batches(dataset, collate, batch_size: int) -> Iterable[dict[str, torch.Tensor]]:
    """Consecutive padded batches of ``dataset`` rows, as the (unshuffled) validation loader builds them."""
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


def ar_baseline_model(im: InferenceModel, device: str | torch.device) -> DiffusionLM | None:
    """The model whose ``ar_mode`` is the original AR model: the same one when it has adapters to
    switch off; for a merged export, the base rebuilt from the recorded ``model.pretrained``."""
    if callable(getattr(im.dlm.model, "disable_adapter", None)):
        return im.dlm
    model_cfg = {k: v for k, v in (im.cfg.get("model") or {}).items() if k != "config"}
    if not model_cfg.get("pretrained"):
        log.warning("no base model recorded for %s: AR baseline skipped", im.source)
        return None
    try:
        base, _ = build_diffusion_model(lora=None, **model_cfg)
    except ModelLoadError as err:
        log.warning("AR baseline skipped: %s", err)
        return None
    return base.to(device).eval()


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


def by_task(
    rows: Sequence[Mapping[str, Any]],
    refs: Sequence[str],
    diffusion: Sequence[str],
    ar: Sequence[str] | None,
    ar_sft: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Exact match per value of the rows' ``task`` key (the tiny tasks carry one; Alpaca rows do not).

    Returns [{task, rows, diffusion_exact_match, ar_exact_match}] sorted by task, or [] when no row
    has a task; rows without one are grouped under "(none)".
    """
    tasks = [str(r.get("task") or "(none)") for r in rows]
    if set(tasks) == {"(none)"}:
        return []
    out = []
    for task in sorted(set(tasks)):
        idx = [i for i, t in enumerate(tasks) if t == task]
        task_refs = [refs[i] for i in idx]
        out.append(
            {
                "task": task,
                "rows": len(idx),
                "diffusion_exact_match": exact_match([diffusion[i] for i in idx], task_refs),
                "ar_exact_match": exact_match([ar[i] for i in idx], task_refs)
                if ar is not None
                else float("nan"),
                **(
                    {"ar_sft_exact_match": exact_match([ar_sft[i] for i in idx], task_refs)}
                    if ar_sft is not None
                    else {}
                ),
            }
        )
    return out


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
            f"| {label} | " + " | ".join(_pm(r, f"{k}_{metric}", digits) for k, _ in cols) + " |"
            for metric, label, digits in (
                ("exact_match", "exact match", 3),
                ("rougeL", "ROUGE-L", 3),
                ("bleu", "BLEU-4 (corpus)", 3),
                ("answer_length", "answer tokens (mean)", 2),
                ("eos_rate", "EOS rate", 3),
                ("seconds", "generation seconds", 2),
                ("nfe", "forward passes", 0),
            )
        ),
        *(
            f"| exact match − {cols_ref} | "
            + " | ".join(_pm(r, f"{k}_minus_{ref}_exact_match") for k, _ in cols)
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
    from diffllm.viz import save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "nll_by_length": save_figure(buckets_fig, out_dir / "nll_by_length.png"),
        "quality_vs_steps": save_figure(steps_fig, out_dir / "quality_vs_steps.png"),
    }
    result["plots"] = {k: str(v) for k, v in files.items()}
    files["eval.md"] = out_dir / "eval.md"
    files["eval.json"] = out_dir / "eval.json"
    files["eval.md"].write_text(format_markdown(result))
    files["eval.json"].write_text(json.dumps(result, indent=2, default=str) + "\n")
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
) -> dict[str, Any]:
    """Evaluate a checkpoint or exported folder; writes the report files and returns ``eval.json``'s content.

    rows: rows scored for likelihood (None: the rows training validated on, or all of ``data_path``);
    gen_rows: rows generated (None: as many as scored); likelihood: ``num_samples`` / ``method``
    replacing the run's ``val_likelihood``; sampler: fields replacing the checkpoint's sampler;
    steps_grid: step counts for the quality-vs-steps sweep (None: G/8, G/4, G/2, G).
    """
    started = time.perf_counter()
    # the arguments against the schema, before anything is read
    check_positive(
        {"rows": rows, "gen_rows": gen_rows, "batch_size": batch_size, "gen_batch_size": gen_batch_size}
    )
    check_sampler_overrides(dict(sampler or {}))
    lk_given = {k: v for k, v in dict(likelihood or {}).items() if v is not None}
    if lk_given:
        check_node(ValLikelihoodNode, lk_given)
    im = load_for_inference(ckpt_path, device=device, trust_remote_code=trust_remote_code)
    cfg, tok = im.cfg, im.tokenizer
    seed = int(cfg.get("seed", 0) if seed is None else seed)
    lk = {
        **(cfg.get("val_likelihood") or {}),
        **{k: v for k, v in dict(likelihood or {}).items() if v is not None},
    }
    num_samples, method = int(lk.get("num_samples", 4)), str(lk.get("method", "grid"))
    config = sampler_with_overrides(im.sampler_config, sampler)

    dm = eval_datamodule(cfg, tok, data_path)
    bs = int(batch_size or dm.hparams.eval_batch_size or dm.hparams.batch_size)
    if rows is None:
        rows = len(dm.val_ds) if data_path is not None else validated_rows(cfg, len(dm.val_ds), bs)
    rows = min(int(rows), len(dm.val_ds))
    if rows < 1:
        raise ValueError(f"no validation row to score (rows={rows}, {len(dm.val_ds)} available)")
    scored = dm.val_ds.select(range(rows))

    ar_model = ar_baseline_model(im, device) if ar_baseline else None
    ar_sft = (
        load_ar_sft(ar_ckpt_path, tok, device=device, trust_remote_code=trust_remote_code)
        if ar_ckpt_path is not None
        else None
    )
    models = {"diffusion": im.dlm, "ar_base": ar_model, "ar_sft": ar_sft}
    scores = scoring.score_rows(
        tqdm(
            batches(scored, dm.collate, bs),
            desc="likelihood",
            total=math.ceil(rows / bs),
            disable=not progress,
        ),
        seed=seed,
        device=device,
        num_samples=num_samples,
        method=method,
        end_id=im.eos_id,
        **{k: m for k, m in models.items() if m is not None},
    )
    figures = scoring.likelihood_figures(scores)
    if ar_model is None:  # the headline keys stay, as not-a-number
        figures.update(
            dict.fromkeys(("ar_nll", "ar_nll_se", "ar_nll_no_end", "gap", "gap_se", "ar_ppl"), float("nan"))
        )
    unigram = unigram_cross_entropy(
        _answer_tokens(dm.train_ds, limit=20_000), _answer_tokens(scored), vocab_size=len(tok)
    )

    prompts = dm.sample_prompts(rows if gen_rows is None else int(gen_rows))
    prompt_ids = [p["prompt_ids"] for p in prompts]
    refs = [p["reference"] for p in prompts]
    answers = {"diffusion": diffusion_answers(im, prompt_ids, config, seed=seed, batch_size=gen_batch_size)}
    if ar_sft is not None:
        log.info("AR-SFT greedy: %d prompts", len(prompt_ids))
        answers["ar_sft"] = ARObjective().answers(
            ar_sft, tok, prompt_ids, config, eos_id=im.eos_id, seed=seed, batch_size=gen_batch_size
        )
    if ar_model is not None:
        log.info("AR base greedy: %d prompts", len(prompt_ids))
        answers["ar"] = scoring.ar_answers(
            ar_model, tok, prompt_ids, config.gen_length, eos_id=im.eos_id, batch_size=gen_batch_size
        )
    gen = generation_figures(answers, refs)
    for model, a in answers.items():
        gen[f"{model}_bleu"] = bleu(a.texts, refs)
    if ar_model is None:
        gen.update({f"ar_{k}": float("nan") for k in quality(answers["diffusion"], refs)})
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
    result: dict[str, Any] = {
        "source": str(ckpt_path),
        "ar_ckpt_path": None if ar_ckpt_path is None else str(ar_ckpt_path),
        "data": f"file {data_path}" if data_path is not None else "validation split of the run",
        "rows": rows,
        "gen_rows": len(prompts),
        "likelihood": {
            "num_samples": num_samples,
            "method": method,
            "seed": seed,
            "batch_size": bs,
            "schedule": "linear",
        },
        **figures,
        "unigram_ce": unigram,
        **gen,
        "sampler": dict(vars(config)),
        "length_buckets": buckets,
        "by_task": by_task(
            [p["row"] for p in prompts],
            refs,
            answers["diffusion"].texts,
            answers["ar"].texts if "ar" in answers else None,
            answers["ar_sft"].texts if "ar_sft" in answers else None,
        ),
        "steps_grid": grid,
        "steps_skipped": skipped,
        "examples": [
            {"prompt": p["prompt"], "reference": r, **{m: a.texts[i] for m, a in answers.items()}}
            for i, (p, r) in enumerate(list(zip(prompts, refs))[:NUM_EXAMPLES])
        ],
        "provenance": provenance(device, time.perf_counter() - started, None),
    }
    for key in ("ar",) if ar_model is None else ():
        result["examples"] = [{**e, key: ""} for e in result["examples"]]
    ar_q = {"exact_match": result["ar_exact_match"], "rougeL": result["ar_rougeL"]}
    from diffllm.viz import plot_nll_by_length, plot_quality_vs_steps

    out = Path(out_dir) if out_dir is not None else default_out_dir(ckpt_path)
    files = write_outputs(
        result,
        out,
        plot_nll_by_length(buckets, unigram),
        plot_quality_vs_steps(grid, ar_q),
    )
    result["files"] = {k: str(v) for k, v in files.items()}
    return result


# ----------------------------------------------------------------------------------- the CLI


def run(cfg: DictConfig) -> dict[str, Any]:
    """The CLI body (``conf/evaluate.yaml``); ``sampler.*`` keys left at ??? keep the checkpoint's value."""
    overrides = {k: cfg.sampler[k] for k in cfg.sampler if not OmegaConf.is_missing(cfg.sampler, k)}
    result = evaluate(
        cfg.ckpt_path,
        data_path=cfg.data_path,
        rows=cfg.rows,
        gen_rows=cfg.gen_rows,
        out_dir=cfg.out_dir,
        device=cfg.device,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        gen_batch_size=cfg.gen_batch_size,
        likelihood=OmegaConf.to_container(cfg.likelihood),
        sampler=overrides,
        steps_grid=None if cfg.steps_grid is None else list(cfg.steps_grid),
        ar_baseline=cfg.ar_baseline,
        ar_ckpt_path=cfg.ar_ckpt_path,
        progress=cfg.progress,
        trust_remote_code=bool(cfg.trust_remote_code),
    )
    print("\n" + format_report(result), flush=True)
    cols = [k for k in ("diffusion", "ar_sft", "ar") if f"{k}_bleu" in result]
    print(f"  {'BLEU-4 (corpus)':26s}" + "".join(f"{result[f'{k}_bleu']:>18.3f}" for k in cols), flush=True)
    print("\n" + "\n".join(f"  {name:18s} {path}" for name, path in result["files"].items()), flush=True)
    return result


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ModelLoadError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from diffllm.config import register_resolvers

    register_resolvers()
    main()
