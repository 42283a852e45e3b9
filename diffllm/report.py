"""The research question in numbers: converted diffusion model vs the original AR model.

On the same validation answers: the diffusion NLL upper bound vs the AR NLL (nats/token), the
answers' unigram cross-entropy as the no-context reference, and the diffusion sampler's exact
match / ROUGE-L vs the AR model's greedy decoding, with their speeds.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from diffllm.ar_generate import ar_generate
from diffllm.diffusion.likelihood import ar_nll, elbo_nll
from diffllm.metrics import exact_match, rouge_l, unigram_cross_entropy


def _answer_tokens(ds, limit: int | None = None) -> list[int]:
    out: list[int] = []
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        out.extend(t for t, m in zip(row["input_ids"], row.get("score_mask", row["answer_mask"])) if m)
    return out


@torch.no_grad()
def build_report(
    module, datamodule, num_rows: int = 64, likelihood_samples: int = 8, seed: int = 0
) -> dict[str, Any]:
    """Likelihoods and generation quality of ``module`` (a DiffusionLitModule) on ``num_rows`` val rows."""
    module.eval()
    datamodule.setup()
    dlm, tok = module.dlm, module.tokenizer
    device = module.device
    n = min(num_rows, len(datamodule.val_ds))
    val = datamodule.val_ds.select(range(n))

    nll_sum = ar_sum = count = 0.0
    bs = datamodule.hparams.eval_batch_size or datamodule.hparams.batch_size
    for start in range(0, n, bs):
        batch = datamodule.collate([val[i] for i in range(start, min(start + bs, n))])
        batch = {k: v.to(device) for k, v in batch.items()}
        args = (dlm, batch["input_ids"], batch["attention_mask"])
        scored = batch["score_mask"]  # answer + EOS, never the EOS padding
        s, c = elbo_nll(
            *args,
            batch["answer_mask"],
            module.eval_schedule,
            num_samples=likelihood_samples,
            method="grid",
            seed=seed + start,
            score_mask=scored,
        )
        a, _ = ar_nll(*args, scored)
        nll_sum, ar_sum, count = nll_sum + s.sum().item(), ar_sum + a.sum().item(), count + c.sum().item()

    unigram = unigram_cross_entropy(
        _answer_tokens(datamodule.train_ds, limit=20_000), _answer_tokens(val), vocab_size=len(tok)
    )

    prompts = datamodule.sample_prompts(n)
    prompt_ids = [p["prompt_ids"] for p in prompts]
    refs = [p["reference"] for p in prompts]
    cfg = module.sampler_config

    t0 = time.perf_counter()
    diff_preds = module.sample(prompt_ids, seed=seed)
    t_diff = time.perf_counter() - t0
    t0 = time.perf_counter()
    ar_out = ar_generate(
        dlm.model, prompt_ids, max_new_tokens=cfg.gen_length, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id
    )
    t_ar = time.perf_counter() - t0
    ar_preds = [tok.decode(t, skip_special_tokens=True).strip() for t in ar_out.tokens]

    nll, ar = nll_sum / count, ar_sum / count
    return {
        "rows": n,
        "answer_tokens": int(count),
        "nll_bound": nll,
        "ar_nll": ar,
        "gap": nll - ar,
        "ppl_bound": math.exp(nll),
        "ar_ppl": math.exp(ar),
        "unigram_ce": unigram,
        "diffusion_exact_match": exact_match(diff_preds, refs),
        "ar_exact_match": exact_match(ar_preds, refs),
        "diffusion_rougeL": rouge_l(diff_preds, refs),
        "ar_rougeL": rouge_l(ar_preds, refs),
        "diffusion_seconds": t_diff,
        "ar_seconds": t_ar,
        "sampler": {k: v for k, v in vars(cfg).items()},
        "examples": [
            {"prompt": p["prompt"], "reference": r, "diffusion": d, "ar": a}
            for p, r, d, a in list(zip(prompts, refs, diff_preds, ar_preds))[:8]
        ],
    }


def format_report(r: dict[str, Any]) -> str:
    """A short plain-text table of a report."""
    lines = [
        f"== diffllm report: {r['rows']} validation rows, {r['answer_tokens']} answer tokens ==",
        f"{'':28s}{'diffusion':>12s}{'AR base':>12s}",
        f"{'answer NLL (nats/token)':28s}{r['nll_bound']:>12.3f}{r['ar_nll']:>12.3f}   (diffusion: ELBO upper bound)",
        f"{'perplexity':28s}{r['ppl_bound']:>12.2f}{r['ar_ppl']:>12.2f}",
        f"{'gap (bound - AR)':28s}{r['gap']:>12.3f}",
        f"{'unigram CE of answers':28s}{r['unigram_ce']:>12.3f}   (no-context reference)",
        f"{'exact match':28s}{r['diffusion_exact_match']:>12.3f}{r['ar_exact_match']:>12.3f}",
        f"{'ROUGE-L':28s}{r['diffusion_rougeL']:>12.3f}{r['ar_rougeL']:>12.3f}",
        f"{'generation seconds':28s}{r['diffusion_seconds']:>12.2f}{r['ar_seconds']:>12.2f}",
    ]
    return "\n".join(lines)


def write_report(r: dict[str, Any], out_dir: str | Path) -> Path:
    path = Path(out_dir) / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=2, default=str))
    return path
