"""The scoring core: answer likelihoods and generation quality, each with its standard error.

``DiffusionLitModule.validation_step``, ``report.build_report`` and ``evaluate.evaluate`` all call
it, so the three print the same figures for the same rows and settings.

One convention for all three:

* scored tokens: ``score_mask``, the answer and its end token, never the EOS padding;
* the bound: the ELBO on the linear schedule (``EVAL_SCHEDULE``; every schedule with
  alpha(0) = 1, alpha(1) = 0 has the same bound, the linear one is used whatever trains);
* the seed: batch ``i`` of the scored rows draws its masks and times from
  ``validation_seed(seed, i)``.

Per row (``score_batch``), in nats summed over the row's scored tokens:

    diffusion        the diffusion NLL bound (ELBO) of the converted model;
    ar_base          the unadapted base model (LoRA off, causal), on exactly the same tokens;
    ar_base_no_end   the same without the end token (a base model was not trained to stop there);
    ar_sft           an AR-SFT model (objective=ar: LoRA on, causal) on the same tokens;
    l2r_nll          (``l2r_nll=True``) the diffusion model's left-to-right NLL: the answer revealed one
                     token at a time in order (``diffusion.order``), one forward pass per answer token.
                     bound - L2R is the cost of averaging over orders, L2R - AR what the conversion lost.

The per-token figure of each row and the paired gaps are named in ``names`` (``FIGURES``, ``GAPS``).

Standard errors (rows are the sampling unit: the tokens of one answer are not independent, so a
per-token SE would be too small):

* a per-token NLL R = sum_i s_i / sum_i n_i over m rows (sums s_i, token counts n_i) is a ratio
  estimator; its delta-method SE is  sqrt( sum_i (s_i - R n_i)^2 / (m (m - 1)) ) / mean(n);
* a gap between two models on the same rows is the same ratio of the paired differences
  s_i - s'_i (same n_i), so the rows' shared difficulty cancels;
* exact match, EOS rate: binomial sqrt(p (1 - p) / m) (at m = 64 one row is 1.6 points);
* an exact-match difference on the same prompts: sd(d_i) / sqrt(m), d_i in {-1, 0, 1};
* ROUGE-L and answer length: sd / sqrt(m) of the per-row values.

Decoding speed: ``tokens_per_pass`` = generated tokens (answer + its end token when produced) over
forward passes per row, summed over rows; a batch's forward pass counts once for every row in it
(a row that has finished waits for its batch), so AR greedy decoding scores at most 1.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.text.rouge import rouge_score

from diffllm.diffusion.likelihood import causal_token_ce, elbo_nll, validation_seed
from diffllm.diffusion.order import order_nll
from diffllm.diffusion.sampler import SamplerConfig, generate
from diffllm.diffusion.schedule import LinearSchedule
from diffllm.diffusion.trajectory import StepFrame, Trajectory
from diffllm.evaluation.metrics import exact_match, normalise
from diffllm.evaluation.names import FIGURES, GAPS
from diffllm.model.ar_generate import ar_generate
from diffllm.model.dlm import DiffusionLM

# The schedule every reported bound is computed on (validation, report, evaluate).
EVAL_SCHEDULE = LinearSchedule()

# The per-row likelihood figures and the token count each is per.
TOKENS_OF = {
    "diffusion": "tokens",
    "ar_base": "tokens",
    "ar_base_no_end": "tokens_no_end",
    "ar_sft": "tokens",
    "l2r_nll": "tokens",
}

# ----------------------------------------------------------------------------------- likelihoods


def end_token_mask(input_ids: torch.Tensor, score_mask: torch.Tensor, end_id: int) -> torch.Tensor:
    """(B, L) bool: each row's last scored position when it holds ``end_id`` (a truncated answer has none)."""
    score_mask = score_mask.bool()
    positions = torch.arange(score_mask.shape[1], device=score_mask.device)
    last = torch.where(score_mask, positions, -1).max(dim=1).values  # (B,) -1: nothing scored
    out = torch.zeros_like(score_mask)
    rows = (last >= 0).nonzero()[:, 0]
    out[rows, last[rows]] = True
    return out & (input_ids == end_id)


@torch.no_grad()
def score_batch(
    batch: Mapping[str, torch.Tensor],
    *,
    seed: int,
    num_samples: int,
    method: str,
    end_id: int,
    diffusion: DiffusionLM | None = None,
    ar_base: DiffusionLM | None = None,
    ar_sft: DiffusionLM | None = None,
    l2r_nll: bool = False,
) -> dict[str, torch.Tensor]:
    """(B,) per-row NLL sums of the models given (keys as in the module docstring) and token counts.

    ``seed`` is this batch's seed (``validation_seed(run_seed, batch_idx)``); ``ar_base`` is any
    model whose adapters-off causal mode is the original AR model (the converted one is).
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    answer_mask = batch["answer_mask"].bool()
    scored = batch.get("score_mask", answer_mask).bool()  # answer + end token, never the EOS padding
    end = end_token_mask(input_ids, scored, end_id)
    out = {"tokens": scored.sum(dim=1), "tokens_no_end": (scored & ~end).sum(dim=1)}
    if diffusion is not None:
        out["diffusion"], _ = elbo_nll(
            diffusion,
            input_ids,
            attention_mask,
            answer_mask,
            EVAL_SCHEDULE,
            num_samples=num_samples,
            method=method,
            seed=seed,
            score_mask=scored,
        )
        if l2r_nll:  # summed over the whole canvas (answer + any EOS padding), like the bound
            out["l2r_nll"] = order_nll(diffusion, input_ids, attention_mask, answer_mask).to(input_ids.device)
    if ar_base is not None:
        ce = torch.zeros(scored.shape, device=input_ids.device)
        ce[scored] = causal_token_ce(ar_base, input_ids, attention_mask, scored, adapters=False)
        out["ar_base"], out["ar_base_no_end"] = ce.sum(dim=1), (ce * ~end).sum(dim=1)
    if ar_sft is not None:
        ce = torch.zeros(scored.shape, device=input_ids.device)
        ce[scored] = causal_token_ce(ar_sft, input_ids, attention_mask, scored, adapters=True)
        out["ar_sft"] = ce.sum(dim=1)
    return out


def score_rows(
    batches: Iterable[Mapping[str, torch.Tensor]], *, seed: int, device: torch.device | str, **kwargs: Any
) -> dict[str, np.ndarray]:
    """``score_batch`` over consecutive batches (batch i seeded ``validation_seed(seed, i)``), rows concatenated."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch_idx, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        for key, value in score_batch(batch, seed=validation_seed(seed, batch_idx), **kwargs).items():
            parts.setdefault(key, []).append(value.double().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def ratio_mean_se(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """Per-token mean R = sum(sums) / sum(counts) over rows with a token, and its delta-method SE."""
    sums, counts = np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    m = len(counts)
    if m == 0:
        return float("nan"), float("nan")
    ratio = float(sums.sum() / counts.sum())
    if m < 2:
        return ratio, float("nan")
    resid = sums - ratio * counts
    return ratio, float(math.sqrt((resid**2).sum() / (m * (m - 1))) / counts.mean())


def likelihood_figures(scores: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Per-token figures with SEs: ``nll_bound``, ``ar_nll``, ``ar_nll_no_end``, ``ar_sft_nll``, ``l2r_nll``
    (those scored, ``names.FIGURES``), the gaps of ``names.GAPS`` paired over rows, perplexities."""
    out: dict[str, Any] = {
        "answer_tokens": int(scores["tokens"].sum()),
        "answer_tokens_no_end": int(scores["tokens_no_end"].sum()),
    }
    for key, (name, _) in FIGURES.items():
        if key in scores:
            out[name], out[f"{name}_se"] = ratio_mean_se(scores[key], scores[TOKENS_OF[key]])
    for gap, one, other, _ in GAPS:
        if one in scores and other in scores:
            out[gap], out[f"{gap}_se"] = ratio_mean_se(scores[one] - scores[other], scores["tokens"])
    for name, ppl in (("nll_bound", "ppl_bound"), ("ar_nll", "ar_ppl"), ("ar_sft_nll", "ar_sft_ppl")):
        if name in out:
            out[ppl] = math.exp(out[name]) if math.isfinite(out[name]) else float("nan")
    return out


# ----------------------------------------------------------------------------------- generation


@dataclass
class Answers:
    """Decoded answers of one model on a list of prompts (``decode_answers``)."""

    texts: list[str]  # decoded up to the end token, special tokens skipped, stripped
    lengths: list[int]  # generated tokens before the end token
    ended: list[bool]  # the end token was produced within the budget
    seconds: float
    nfe: int  # forward passes, all batches
    tokens: list[list[int]] | None = None  # the answers' token ids before the end token
    row_passes: int | None = None  # forward passes summed over rows (a batch's pass once per row in it)
    batch_nfe: list[int] | None = None  # per row: forward passes of the batch it was decoded in
    canvas: list[list[int]] | None = None  # per row: the whole answer canvas (diffusion: EOS fill included)
    trajectories: list[Trajectory] | None = None  # per row, when the decoder recorded them


def decode_answers(
    decode: Callable[[list[list[int]]], Any],
    prompt_ids: Sequence[list[int]],
    tokenizer: Any,
    *,
    eos_id: int,
    batch_size: int,
) -> Answers:
    """The one batch-and-decode loop: ``decode`` on consecutive batches of ``batch_size`` prompts, each
    answer decoded to text (special tokens skipped, stripped).

    ``decode(prompts)`` returns the sampler's ``SampleOutput`` or ``ar_generate``'s ``ARSampleOutput``:
    ``tokens`` (answers up to the end token), ``nfe``, and ``ended`` or the ``canvas`` it is read from
    (the end token anywhere on the canvas). Rows never interact in either decoder.
    """
    texts, lengths, ended, batch_nfe, tokens, nfe, t0 = [], [], [], [], [], 0, time.perf_counter()
    canvas: list[list[int]] = []
    trajectories: list[Trajectory] = []
    for start in range(0, len(prompt_ids), batch_size):
        out = decode(list(prompt_ids[start : start + batch_size]))
        rows = len(out.tokens)
        texts += [tokenizer.decode(t, skip_special_tokens=True).strip() for t in out.tokens]
        lengths += [len(t) for t in out.tokens]
        tokens += out.tokens
        batch_nfe += [out.nfe] * rows
        nfe += out.nfe
        row_canvas = getattr(out, "canvas", None)
        if row_canvas is not None:
            canvas += row_canvas.tolist()
        if getattr(out, "ended", None) is not None:
            ended += list(out.ended)
        else:
            ended += [bool((row == eos_id).any()) for row in row_canvas]
        trajectories += getattr(out, "trajectories", None) or []
    return Answers(
        texts,
        lengths,
        ended,
        time.perf_counter() - t0,
        nfe,
        tokens,
        sum(batch_nfe),  # row_passes: each row counts its batch's passes
        batch_nfe,
        canvas if len(canvas) == len(texts) else None,
        trajectories if len(trajectories) == len(texts) else None,
    )


def diffusion_answers(
    dlm: DiffusionLM,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    config: SamplerConfig,
    *,
    eos_id: int,
    seed: int,
    batch_size: int,
    trajectory: bool = False,
    on_step: Callable[[StepFrame], None] | None = None,
    verifier: Any = None,
) -> Answers:
    """The diffusion sampler's answers (each batch seeded ``seed``; rows never interact); with
    ``trajectory`` each row's denoising trajectory too. ``on_step``: the sampler's per-step callback
    (``sampler.generate``), each frame's ``first_row`` set to its batch's first row among ``prompt_ids``.

    ``eos_id``: the end-of-answer id (``diffllm.data.template.end_of_answer_id``). ``verifier``: the AR
    base of ``sampler.mode=speculative`` for a model without adapters to switch off (``generate``).
    """

    decoded = [0]  # prompts decoded before the current batch

    def decode(prompts: list[list[int]]) -> Any:
        first_row, decoded[0] = decoded[0], decoded[0] + len(prompts)
        hook = None
        if on_step is not None:
            hook = lambda frame: on_step(dataclasses.replace(frame, first_row=first_row))  # noqa: E731
        return generate(
            dlm,
            prompts,
            config,
            eos_id=eos_id,
            pad_id=tokenizer.pad_token_id,
            seed=seed,
            record_trajectory=trajectory,
            on_step=hook,
            verifier=verifier,
        )

    return decode_answers(decode, prompt_ids, tokenizer, eos_id=eos_id, batch_size=batch_size)


def ar_answers(
    dlm: DiffusionLM,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    max_new_tokens: int,
    *,
    eos_id: int,
    batch_size: int,
    adapters: bool = False,
    temperature: float = 0.0,
    seed: int = 0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Answers:
    """Causal answers with a KV cache ([MASK] suppressed): the base model (``adapters=False``) or an
    AR-SFT model (``adapters=True``); greedy unless ``temperature`` > 0 (then ``seed``, ``top_k``,
    ``top_p`` as in ``ar_generate``)."""

    def decode(prompts: list[list[int]]) -> Any:
        return ar_generate(
            dlm,
            prompts,
            max_new_tokens=max_new_tokens,
            eos_id=eos_id,
            pad_id=tokenizer.pad_token_id,
            temperature=temperature,
            seed=seed,
            top_k=top_k,
            top_p=top_p,
            adapters=adapters,
        )

    return decode_answers(decode, prompt_ids, tokenizer, eos_id=eos_id, batch_size=batch_size)


def binomial_se(p: float, n: int) -> float:
    """sqrt(p (1 - p) / n): the SE of a proportion over n independent rows."""
    return math.sqrt(p * (1 - p) / n) if n > 0 and math.isfinite(p) else float("nan")


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its SE sd / sqrt(n) (sample sd, ddof 1)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def row_matches(preds: Sequence[str], refs: Sequence[str]) -> list[float]:
    return [float(normalise(p) == normalise(r)) for p, r in zip(preds, refs, strict=True)]


def row_rouge_l(preds: Sequence[str], refs: Sequence[str]) -> list[float]:
    """Per-row ROUGE-L F-measure (torchmetrics; their mean is ``metrics.rouge_l``)."""
    return [
        float(rouge_score(p, r, rouge_keys="rougeL")["rougeL_fmeasure"])
        for p, r in zip(preds, refs, strict=True)
    ]


def tokens_per_pass(answers: Answers) -> float:
    """Generated tokens (answer + end token when produced) per forward pass per row (module docstring);
    NaN when the passes were not counted."""
    if not answers.row_passes:
        return float("nan")
    return (sum(answers.lengths) + sum(bool(e) for e in answers.ended)) / answers.row_passes


def quality(answers: Answers, refs: Sequence[str]) -> dict[str, float]:
    """Exact match, ROUGE-L, mean answer length (tokens), EOS rate, each with its SE; time, NFE and
    tokens per forward pass."""
    n = len(refs)
    em = exact_match(answers.texts, refs)
    rouge, rouge_se = mean_se(row_rouge_l(answers.texts, refs))
    length, length_se = mean_se(answers.lengths)
    eos_rate = float(np.mean(answers.ended)) if n else float("nan")
    return {
        "exact_match": em,
        "exact_match_se": binomial_se(em, n),
        "rougeL": rouge,
        "rougeL_se": rouge_se,
        "answer_length": length,
        "answer_length_se": length_se,
        "eos_rate": eos_rate,
        "eos_rate_se": binomial_se(eos_rate, n),
        "seconds": answers.seconds,
        "nfe": answers.nfe,
        "tokens_per_pass": tokens_per_pass(answers),
    }


def paired_difference(
    preds_a: Sequence[str], preds_b: Sequence[str], refs: Sequence[str]
) -> tuple[float, float]:
    """Exact match of A minus that of B on the same prompts, and its paired SE sd(d) / sqrt(m)."""
    d = np.asarray(row_matches(preds_a, refs)) - np.asarray(row_matches(preds_b, refs))
    return mean_se(d)
