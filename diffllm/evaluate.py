"""Evaluate a converted diffusion model against the AR model it came from.

    python -m diffllm.evaluate ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt
    python -m diffllm.evaluate ckpt_path=exports/tiny/merged data_path=rows.jsonl rows=200
    python -m diffllm.evaluate ckpt_path=... sampler.strategy=margin steps_grid=[8,16,32]

On the same answers (the run's validation split by default, or ``data_path``):

* likelihood: the diffusion answer NLL upper bound (ELBO, linear schedule, the run's
  ``val_likelihood`` estimator) vs the base AR model's NLL (adapters off, causal attention),
  perplexities, their gap per answer-length bucket, and the answers' unigram cross-entropy as the
  no-context reference (all nats / answer token, EOS included);
* generation: exact match, ROUGE-L and BLEU against the references for the diffusion sampler (the
  checkpoint's sampler config with ``sampler.*`` overrides) and for the base model's greedy AR
  decoding, their time and forward passes; and diffusion quality against the number of steps.

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

from diffllm.ar_generate import ar_generate
from diffllm.config import CONF_DIR
from diffllm.diffusion.likelihood import ar_nll, elbo_nll, validation_seed
from diffllm.diffusion.sampler import SamplerConfig, generate
from diffllm.diffusion.schedule import LinearSchedule
from diffllm.generate import sampler_with_overrides
from diffllm.inference import InferenceModel, load_for_inference
from diffllm.metrics import bleu, exact_match, rouge_l, unigram_cross_entropy
from diffllm.model.dlm import DiffusionLM
from diffllm.model.load import ModelLoadError, build_diffusion_model
from diffllm.report import _answer_tokens, format_report

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


@torch.no_grad()
def score_rows(
    dlm: DiffusionLM,
    batch_iter: Iterable[dict[str, torch.Tensor]],
    *,
    seed: int,
    num_samples: int,
    method: str,
    ar_model: DiffusionLM | None,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-row answer NLL sums (nats) of the diffusion bound and the AR model, and answer lengths.

    Batch ``i`` draws its masks from ``validation_seed(seed, i)``, as validation does.
    """
    # DiffusionLitModule.eval_schedule: every schedule with alpha(1) = 0 gives this same bound
    schedule = LinearSchedule()
    device = next(dlm.parameters()).device
    nll, ar, count = [], [], []
    for batch_idx, batch in enumerate(tqdm(batch_iter, desc="likelihood", total=total, disable=not progress)):
        batch = {k: v.to(device) for k, v in batch.items()}
        args = (batch["input_ids"], batch["attention_mask"])
        scored = batch.get("score_mask", batch["answer_mask"])  # answer + EOS, never the EOS padding
        s, c = elbo_nll(
            dlm,
            *args,
            batch["answer_mask"],
            schedule,
            num_samples=num_samples,
            method=method,
            seed=validation_seed(seed, batch_idx),
            score_mask=scored,
        )
        a = ar_nll(ar_model, *args, scored)[0] if ar_model is not None else torch.full_like(s, float("nan"))
        nll.append(s.double().cpu().numpy())
        ar.append(a.double().cpu().numpy())
        count.append(c.cpu().numpy())
    return {"nll": np.concatenate(nll), "ar": np.concatenate(ar), "count": np.concatenate(count)}


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
) -> dict[str, Any]:
    """Decoded sampler answers with the time and forward passes they took (all batches)."""
    tok = im.tokenizer
    texts, nfe, t0 = [], 0, time.perf_counter()
    starts = range(0, len(prompt_ids), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress):
        out = generate(
            im.dlm,
            list(prompt_ids[start : start + batch_size]),
            config,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            seed=seed,
        )
        texts += [tok.decode(t, skip_special_tokens=True).strip() for t in out.tokens]
        nfe += out.nfe
    return {"texts": texts, "seconds": time.perf_counter() - t0, "nfe": nfe}


def ar_answers(
    model: DiffusionLM,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    max_new_tokens: int,
    *,
    batch_size: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy answers of the original AR model (adapters off, causal, KV cache)."""
    texts, nfe, t0 = [], 0, time.perf_counter()
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc="AR greedy", disable=not progress):
        out = ar_generate(
            model,
            list(prompt_ids[start : start + batch_size]),
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
        )
        texts += [tokenizer.decode(t, skip_special_tokens=True).strip() for t in out.tokens]
        nfe += out.nfe
    return {"texts": texts, "seconds": time.perf_counter() - t0, "nfe": nfe}


def quality(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    return {
        "exact_match": exact_match(preds, refs),
        "rougeL": rouge_l(preds, refs),
        "bleu": bleu(preds, refs),
    }


def by_task(
    rows: Sequence[Mapping[str, Any]], refs: Sequence[str], diffusion: Sequence[str], ar: Sequence[str] | None
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
        done.append(
            {"steps": int(steps), **quality(gen["texts"], refs), "seconds": gen["seconds"], "nfe": gen["nfe"]}
        )
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
    lines = [
        "# diffllm evaluation",
        "",
        f"- model: `{r['source']}`",
        f"- data: {r['data']}; {r['rows']} rows scored ({r['answer_tokens']} answer tokens, EOS included), "
        f"{r['gen_rows']} generated",
        f"- likelihood: ELBO bound, linear schedule, {lk['num_samples']}-point `{lk['method']}` t estimator, "
        f"batch {lk['batch_size']}, seed {lk['seed']} (batch i: validation_seed(seed, i))",
        f"- sampler: {', '.join(f'{k}={v}' for k, v in r['sampler'].items())}",
        "",
        "| metric | diffusion | AR base |",
        "|---|---:|---:|",
        f"| answer NLL (nats/token) | {_num(r['nll_bound'])} (bound) | {_num(r['ar_nll'])} |",
        f"| perplexity | {_num(r['ppl_bound'], 2)} | {_num(r['ar_ppl'], 2)} |",
        f"| gap (bound − AR) | {_num(r['gap'])} | |",
        f"| unigram CE of the answers | {_num(r['unigram_ce'])} | (no-context reference) |",
        f"| exact match | {_num(r['diffusion_exact_match'])} | {_num(r['ar_exact_match'])} |",
        f"| ROUGE-L | {_num(r['diffusion_rougeL'])} | {_num(r['ar_rougeL'])} |",
        f"| BLEU-4 (corpus) | {_num(r['diffusion_bleu'])} | {_num(r['ar_bleu'])} |",
        f"| generation seconds | {_num(r['diffusion_seconds'], 2)} | {_num(r['ar_seconds'], 2)} |",
        f"| forward passes | {r['diffusion_nfe']} | {_num(r['ar_nfe'])} |",
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
            "| task | rows | diffusion | AR base |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {t['task']} | {t['rows']} | {_num(t['diffusion_exact_match'])} | {_num(t['ar_exact_match'])} |"
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
    lines += ["## Examples", "", "| prompt | reference | diffusion | AR greedy |", "|---|---|---|---|"]
    lines += [
        f"| {_cell(e['prompt'])} | {_cell(e['reference'])} | {_cell(e['diffusion'])} | {_cell(e['ar'])} |"
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
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a checkpoint or exported folder; writes the report files and returns ``eval.json``'s content.

    rows: rows scored for likelihood (None: the rows training validated on, or all of ``data_path``);
    gen_rows: rows generated (None: as many as scored); likelihood: ``num_samples`` / ``method``
    replacing the run's ``val_likelihood``; sampler: fields replacing the checkpoint's sampler;
    steps_grid: step counts for the quality-vs-steps sweep (None: G/8, G/4, G/2, G).
    """
    im = load_for_inference(ckpt_path, device=device)
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
    scores = score_rows(
        im.dlm,
        batches(scored, dm.collate, bs),
        seed=seed,
        num_samples=num_samples,
        method=method,
        ar_model=ar_model,
        progress=progress,
        total=math.ceil(rows / bs),
    )
    nll, ar = pooled(scores["nll"], scores["count"]), pooled(scores["ar"], scores["count"])
    unigram = unigram_cross_entropy(
        _answer_tokens(dm.train_ds, limit=20_000), _answer_tokens(scored), vocab_size=len(tok)
    )

    prompts = dm.sample_prompts(rows if gen_rows is None else int(gen_rows))
    prompt_ids = [p["prompt_ids"] for p in prompts]
    refs = [p["reference"] for p in prompts]
    diff = diffusion_answers(im, prompt_ids, config, seed=seed, batch_size=gen_batch_size, progress=progress)
    nan_gen = {"texts": [""] * len(prompts), "seconds": float("nan"), "nfe": float("nan")}
    ar_gen = (
        ar_answers(ar_model, tok, prompt_ids, config.gen_length, batch_size=gen_batch_size, progress=progress)
        if ar_model is not None
        else nan_gen
    )
    diff_q = quality(diff["texts"], refs)
    ar_q = quality(ar_gen["texts"], refs) if ar_model is not None else dict.fromkeys(diff_q, float("nan"))
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

    buckets = length_buckets(scores["nll"], scores["ar"], scores["count"])
    result: dict[str, Any] = {
        "source": str(ckpt_path),
        "data": f"file {data_path}" if data_path is not None else "validation split of the run",
        "rows": rows,
        "answer_tokens": int(scores["count"].sum()),
        "gen_rows": len(prompts),
        "likelihood": {
            "num_samples": num_samples,
            "method": method,
            "seed": seed,
            "batch_size": bs,
            "schedule": "linear",
        },
        "nll_bound": nll,
        "ar_nll": ar,
        "gap": nll - ar,
        "ppl_bound": math.exp(nll),
        "ar_ppl": math.exp(ar) if math.isfinite(ar) else float("nan"),
        "unigram_ce": unigram,
        **{f"diffusion_{k}": v for k, v in diff_q.items()},
        **{f"ar_{k}": v for k, v in ar_q.items()},
        "diffusion_seconds": diff["seconds"],
        "ar_seconds": ar_gen["seconds"],
        "diffusion_nfe": diff["nfe"],
        "ar_nfe": ar_gen["nfe"],
        "sampler": dict(vars(config)),
        "length_buckets": buckets,
        "by_task": by_task(
            [p["row"] for p in prompts],
            refs,
            diff["texts"],
            ar_gen["texts"] if ar_model is not None else None,
        ),
        "steps_grid": grid,
        "steps_skipped": skipped,
        "examples": [
            {"prompt": p["prompt"], "reference": r, "diffusion": d, "ar": a}
            for p, r, d, a in list(zip(prompts, refs, diff["texts"], ar_gen["texts"]))[:NUM_EXAMPLES]
        ],
    }
    from diffllm.viz import plot_nll_by_length, plot_quality_vs_steps

    out = Path(out_dir) if out_dir is not None else default_out_dir(ckpt_path)
    files = write_outputs(
        result,
        out,
        plot_nll_by_length(buckets, unigram),
        plot_quality_vs_steps(grid, {"exact_match": ar_q["exact_match"], "rougeL": ar_q["rougeL"]}),
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
        progress=cfg.progress,
    )
    print("\n" + format_report(result), flush=True)
    print(f"{'BLEU-4 (corpus)':28s}{result['diffusion_bleu']:>12.3f}{result['ar_bleu']:>12.3f}", flush=True)
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
