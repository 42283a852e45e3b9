"""Sampler benchmark: speed and quality of the diffusion samplers against the AR model.

    python -m diffllm.bench.sampler [--ckpt PATH] [--lengths 64 128 256] [--rows 32] [--out table.md]

For every generation length G, on the same validation prompts, in one process (so the ratios
hold), it times

    naive             one token per step: steps = G, no EOS fill
    schedule          steps = G / 4 (4 tokens per step on the even schedule)
    threshold         commit every position with confidence > τ (at least one; 0.9, or --threshold)
    threshold+cache   the same with the Fast-dLLM prefix KV cache per block
    threshold+dual cache  the same with the dual cache (prefix and suffix, refreshed per block)
    AR + KV cache     the original model, greedy, adapters off, causal (``ar_generate``)

and, with ``--block-ckpt`` (a block-diffusion checkpoint, ``model.block_size``), on that model:

    block: naive                     one token per step, its own blocks
    block: threshold                 τ (0.9, or --threshold) inside each block
    block: threshold+block cache     the same with the exact block KV cache (each committed block's
                                     clean keys/values computed once; a step runs one block)
    block: speculative               self-speculative decoding (``sampler.mode=speculative``): the block
                                     model drafts each block in one pass (block cache), the AR base
                                     verifies it causally on its own KV cache; greedy, the output is
                                     the AR model's, and "accepted / verify" is the mean number of
                                     draft tokens the base accepts per verify pass
    block: speculative (self)        the same verified by the model's own causal clean stream
                                     (``verifier=self``: a ``model.clean_stream=causal`` checkpoint)

All diffusion rows are greedy with low-confidence ordering and decode the same semi-AR blocks of
``--block`` positions (default: the canvas the checkpoint was validated with, ``sampler.gen_length``
of its config: 16 for the embedded default) with ``--future`` blocks hidden (default) or visible
(``SamplerConfig.future_blocks``). Every row but naive uses the settings a user would pick for
short answers on a long canvas: ``fill_after_eos=true`` (once an EOS is committed, the [MASK]s after
it become EOS: they are cut off by the answer's EOS anyway) and ``stop_early=true``. AR stops once
every row of the batch has produced EOS. ``--future visible --block G`` gives LLaDA's plain loop
(one block, the whole canvas in view).

The diffusion rows run a copy of the model with the LoRA adapters merged into the weights (what
``diffllm.inference.export``'s merged folder holds; ``--no-merge`` keeps the adapter layers). The AR row
and the speculative rows' verifier run the base model rebuilt without adapters (``plain_base``: the
original weights, causal, no adapter layers to switch off at every call): both are plain linear
layers in the same eager stack. ``--batch-size 1`` times every method one prompt per call (AR
included); speculative decoding decodes the rows of a call one at a time whatever the batch size.

``--prompts FILE`` answers the instructions of an Alpaca JSON / JSONL file (the shipped 100 Alpaca
records: ``diffllm/assets/alpaca/alpaca_sample.json``) through the checkpoint's template instead of its
validation rows. "agreement" is the share of rows whose answer equals the AR model's greedy answer
token for token (the measure for prompts without checkable references).

Answer tokens/s counts, for every method alike (AR included), each row's answer tokens up to and
including its end token (EOS), or all G when it has none, per second of wall time: the positions
after the EOS (the EOS fill, AR's padding of rows that ended early) count for nothing, whether the
method computed them or not. NFE beside it is the number of forward passes over all batches (AR:
prefill + one per new token). Exact match compares the decoded answers (up to the first EOS) with
the references.

``build_table`` and ``check_goals`` are pure: they turn measurements into the markdown table.
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.profiler import ProfilerActivity, profile

from diffllm.data.reader import describe, parse_file
from diffllm.data.template import get_format
from diffllm.diffusion.sampler import SamplerConfig, generate
from diffllm.diffusion.strategies import STRATEGIES
from diffllm.evaluation.metrics import exact_match
from diffllm.inference.inputs import InputError, check_device
from diffllm.inference.loading import load_quietly, run_datamodule
from diffllm.model.ar_generate import ar_generate
from diffllm.model.attention import set_bidirectional
from diffllm.model.dlm import DiffusionLM
from diffllm.model.load import build_diffusion_model

NAIVE, SCHEDULE, THRESHOLD, CACHED, AR = "naive", "schedule", "threshold", "threshold+cache", "AR + KV cache"
DUAL = "threshold+dual cache"
BLOCK_NAIVE, BLOCK_THRESHOLD, BLOCK_CACHED = (
    "block: naive",
    "block: threshold",
    "block: threshold+block cache",
)
SPECULATIVE, SPECULATIVE_SELF = "block: speculative", "block: speculative (self)"
SPECULATIVE_METHODS = (SPECULATIVE, SPECULATIVE_SELF)
# run on the --block-ckpt model
BLOCK_METHODS = (BLOCK_NAIVE, BLOCK_THRESHOLD, BLOCK_CACHED, *SPECULATIVE_METHODS)
METHODS = (NAIVE, SCHEDULE, THRESHOLD, CACHED, DUAL, *BLOCK_METHODS, AR)
TAU = 0.9
SCHEDULE_TOKENS_PER_STEP = 4
GOAL_SPEEDUP_VS_NAIVE = 4.0
GOAL_MAX_EM_LOSS_POINTS = 1.0
GOAL_SPEEDUP_VS_AR = 1.0
GOAL_LENGTH = 256
GOAL_SPECULATIVE_VS_AR = 1.5  # issue 19: batch 1, answers >= 32 tokens, with the AR model's exact output


@dataclass(frozen=True)
class Measurement:
    """One method at one generation length, over all benchmark rows."""

    method: str
    gen_length: int
    seconds: float  # wall-clock for all rows (best of the repeats)
    tokens: int  # answer tokens over all rows, each up to and including its EOS (G if it has none)
    nfe: int  # forward passes over all batches
    exact_match: float  # fraction in [0, 1]
    settings: str = ""
    batches: int = 1  # sampler / AR calls the rows were split into
    rows: int = 1  # prompts answered
    agreement: float | None = None  # share of rows equal to AR greedy token for token (None: no AR row)
    accepted: float | None = None  # speculative: mean draft tokens accepted per verify pass

    @property
    def tokens_per_forward(self) -> float:
        """Answer tokens per row per forward pass of its batch: (tokens / rows) / (NFE / batches)."""
        return self.tokens * self.batches / (self.rows * self.nfe) if self.nfe else float("inf")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class Goal:
    """A goal and its measured value; ``passed`` None = cannot be judged (said in ``value``)."""

    text: str
    value: str
    passed: bool | None

    def line(self) -> str:
        status = {True: "PASS", False: "MISS", None: "N/A"}[self.passed]
        return f"- {status}: {self.text}: {self.value}"


def answer_tokens(tokens: Sequence[Sequence[int]], ended: Sequence[bool]) -> int:
    """Answer tokens up to and including the end token: len(answer) + 1 for a row that produced its
    EOS, len(answer) (= G) for one that did not. ``tokens`` are the answers with the EOS removed."""
    if len(tokens) != len(ended):
        raise ValueError(f"{len(tokens)} answers but {len(ended)} end flags")
    return sum(len(t) + int(e) for t, e in zip(tokens, ended))


def sampler_settings(
    method: str,
    gen_length: int,
    block: int = 8,
    future: str = "hidden",
    tau: float = TAU,
    strategy: str = "low_confidence",
) -> dict[str, Any]:
    """SamplerConfig fields of a diffusion method at length ``gen_length`` (see the module docstring).

    ``block`` is clipped to ``gen_length``; it must divide it. ``tau``: the threshold methods' τ;
    ``strategy``: every diffusion row's (``strategies.STRATEGIES``; the speculative draft ignores it).
    """
    block = min(block, gen_length)
    if gen_length % block:
        raise ValueError(f"--block {block} must divide every length; {gen_length} is not a multiple")
    blocks = gen_length // block
    common = {"gen_length": gen_length, "strategy": strategy, "temperature": 0.0, "cfg_scale": 0.0}
    common |= {"top_k": None, "top_p": None, "eos_penalty": 0.0, "stop_early": True}
    common |= {"block_length": block, "future_blocks": future}
    if method in (NAIVE, BLOCK_NAIVE):
        return common | {"steps": gen_length, "threshold": None, "cache": "none", "fill_after_eos": False}
    fill = {"fill_after_eos": True}
    if method == SCHEDULE:
        steps = blocks * max(block // SCHEDULE_TOKENS_PER_STEP, 1)
        return common | fill | {"steps": steps, "threshold": None, "cache": "none"}
    if method in (THRESHOLD, BLOCK_THRESHOLD):
        return common | fill | {"steps": None, "threshold": tau, "cache": "none"}
    if method == CACHED:
        return common | fill | {"steps": None, "threshold": tau, "cache": "prefix"}
    if method == DUAL:
        return common | fill | {"steps": None, "threshold": tau, "cache": "dual"}
    if method == BLOCK_CACHED:
        return common | fill | {"steps": None, "threshold": tau, "cache": "block"}
    if method in SPECULATIVE_METHODS:
        verifier = "base" if method == SPECULATIVE else "self"
        speculative = {"mode": "speculative", "verifier": verifier, "draft": "single"}
        return (
            common
            | speculative
            | {"steps": None, "threshold": None, "cache": "block", "fill_after_eos": False}
        )
    raise ValueError(f"unknown diffusion method {method!r}; choose one of {list(METHODS[:-1])}")


def _short(method: str, gen_length: int, settings: dict[str, Any] | None = None) -> str:
    """The table's settings column: ``settings`` (``sampler_settings``' fields; default: its defaults)
    in a few words."""
    if method == AR:
        return f"greedy, max {gen_length} new"
    s = settings or sampler_settings(method, gen_length)
    if method in SPECULATIVE_METHODS:
        return f"single-pass draft, block {s['block_length']}, block cache, verifier {s['verifier']}"
    text = f"steps {s['steps']}" if s["threshold"] is None else f"τ {s['threshold']}"
    text += "" if s["strategy"] == "low_confidence" else f", {s['strategy']}"
    text += f", block {s['block_length']} ({s['future_blocks']} future)"
    if s["cache"] != "none":
        text += f", {s['cache']} cache"
    return text + (", EOS fill" if s["fill_after_eos"] else "")


# -- pure: measurements -> table -----------------------------------------------------------------
def _ratio(x: float, base: float | None) -> str:
    if base is None or base <= 0 or x != x:
        return "–"
    return f"{x / base:.2f}×"


def build_table(
    measurements: Sequence[Measurement], *, rows: int, batch_size: int, threads: int, device: str
) -> str:
    """The markdown table: one line per (length, method), ratios against naive and AR at that length."""
    by_key = {(m.gen_length, m.method): m for m in measurements}
    head = (
        "| G | method | settings | NFE | seconds | answer tokens/s | × naive | × AR | exact match | "
        "tokens / forward | agreement with AR | accepted / verify |\n"
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    title = (
        f"Sampler benchmark: {rows} validation rows, batch size {batch_size}, "
        f"{threads} torch thread(s), device {device}"
    )
    lines = [title, "", head]
    for gen_length in sorted({m.gen_length for m in measurements}):
        naive = by_key.get((gen_length, NAIVE))
        ar = by_key.get((gen_length, AR))
        for method in METHODS:
            m = by_key.get((gen_length, method))
            if m is None:
                continue
            lines.append(
                f"| {gen_length} | {method} | {m.settings or _short(method, gen_length)} | {m.nfe} | "
                f"{m.seconds:.2f} | {m.tokens_per_s:,.0f} | "
                f"{_ratio(m.tokens_per_s, naive.tokens_per_s if naive else None)} | "
                f"{_ratio(m.tokens_per_s, ar.tokens_per_s if ar else None)} | {100 * m.exact_match:.1f} % | "
                f"{m.tokens_per_forward:.2f} | {'–' if m.agreement is None else f'{100 * m.agreement:.1f} %'} | "
                f"{'–' if m.accepted is None else f'{m.accepted:.2f}'} |"
            )
    return "\n".join(lines)


def check_goals(measurements: Sequence[Measurement], length: int = GOAL_LENGTH) -> list[Goal]:
    """The three goals at ``length`` (the largest measured length if ``length`` was not measured)."""
    lengths = {m.gen_length for m in measurements}
    if not lengths:
        return []
    at = length if length in lengths else max(lengths)
    note = "" if at == length else f" (measured at {at}, {length} not run)"
    by = {m.method: m for m in measurements if m.gen_length == at}
    fast, naive, ar = by.get(CACHED), by.get(NAIVE), by.get(AR)
    goals = []
    if fast and naive:
        speed = fast.tokens_per_s / naive.tokens_per_s
        goals.append(
            Goal(
                f"threshold+cache ≥ {GOAL_SPEEDUP_VS_NAIVE:g}× naive tokens/s at G={at}{note}",
                f"{speed:.2f}×",
                speed >= GOAL_SPEEDUP_VS_NAIVE,
            )
        )
        loss = 100 * (naive.exact_match - fast.exact_match)
        value = f"{loss:+.1f} points ({100 * naive.exact_match:.1f} % → {100 * fast.exact_match:.1f} %)"
        passed: bool | None = loss <= GOAL_MAX_EM_LOSS_POINTS + 1e-9
        if naive.exact_match == 0:  # nothing to lose: the goal says nothing about quality here
            passed, value = None, value + "; naive itself gets no answer right at this length"
        goals.append(
            Goal(
                f"threshold+cache loses ≤ {GOAL_MAX_EM_LOSS_POINTS:g} point of exact match vs naive at G={at}{note}",
                value,
                passed,
            )
        )
    if fast and ar:
        speed = fast.tokens_per_s / ar.tokens_per_s
        goals.append(
            Goal(
                f"threshold+cache ≥ {GOAL_SPEEDUP_VS_AR:g}× AR tokens/s at G={at}{note}",
                f"{speed:.2f}×",
                speed >= GOAL_SPEEDUP_VS_AR,
            )
        )
    block, block_naive = by.get(BLOCK_CACHED), by.get(BLOCK_NAIVE)
    if block and ar:
        speed = block.tokens_per_s / ar.tokens_per_s
        goals.append(
            Goal(
                f"{BLOCK_CACHED} ≥ {GOAL_SPEEDUP_VS_AR:g}× AR tokens/s at G={at}{note}",
                f"{speed:.2f}×",
                speed >= 1,
            )
        )
    spec = by.get(SPECULATIVE)
    if spec and ar:
        speed = spec.tokens_per_s / ar.tokens_per_s
        exact = spec.agreement == 1.0
        goals.append(
            Goal(
                f"{SPECULATIVE} ≥ {GOAL_SPECULATIVE_VS_AR:g}× AR answer tokens/s with the AR model's exact "
                f"output at G={at}{note}",
                f"{speed:.2f}×, agreement with AR {100 * (spec.agreement or 0):.1f} %, "
                f"{spec.accepted:.2f} draft tokens accepted per verify pass",
                speed >= GOAL_SPECULATIVE_VS_AR and exact,
            )
        )
    for base in (block_naive, naive):
        if block and base:
            loss = 100 * (base.exact_match - block.exact_match)
            goals.append(
                Goal(
                    f"{BLOCK_CACHED} loses ≤ {GOAL_MAX_EM_LOSS_POINTS:g} point of exact match vs {base.method} at G={at}{note}",
                    f"{loss:+.1f} points ({100 * base.exact_match:.1f} % → {100 * block.exact_match:.1f} %)",
                    loss <= GOAL_MAX_EM_LOSS_POINTS + 1e-9 if base.exact_match > 0 else None,
                )
            )
    return goals


def build_report(
    measurements: Sequence[Measurement],
    *,
    rows: int,
    batch_size: int,
    threads: int,
    device: str,
    command: str = "",
    merged: bool = True,
) -> str:
    """Table, the note on what is counted, and the goals with PASS/MISS."""
    table = build_table(measurements, rows=rows, batch_size=batch_size, threads=threads, device=device)
    notes = [
        "",
        "answer tokens/s counts every row's answer tokens up to and including its end token (all G "
        "if it has none), for every method alike: what follows the EOS (EOS fill, padding) counts for "
        "nothing; tokens / forward = answer tokens per row per forward pass of its batch. NFE = forward "
        "passes over all batches (AR: prefill + one per new token; it stops once every row has "
        "produced EOS). Greedy decoding everywhere; times are the best "
        f"of the repeats after one warm-up; one row is {100 / max(rows, 1):.1f} exact-match points. "
        + (
            "Diffusion rows: LoRA merged into a copy of the weights; AR: the original weights."
            if merged
            else "Diffusion rows: through the LoRA adapter layers (--no-merge); AR: the original weights."
        ),
    ]
    if command:
        notes.append(f"Command: `{command}`")
    goals = check_goals(measurements)
    lines = [table, *notes, "", "Goals:"] + [g.line() for g in goals]
    return "\n".join(lines)


# -- measuring ------------------------------------------------------------------------------------
# `make train` writes to outputs/<date>/<time>/ (conf/train.yaml); a date-shaped pattern keeps
# sweeps and named runs (outputs/ablation/<overrides>/, outputs/<name>/) out of the default choice.
DEFAULT_RUN_CKPT = "outputs/[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]/*/checkpoints/last.ckpt"


def find_checkpoint(roots: Sequence[Path]) -> Path | None:
    """The newest ``outputs/<date>/<time>/checkpoints/last.ckpt`` under the first root that has one."""
    for root in roots:
        found = glob.glob(str(root / DEFAULT_RUN_CKPT))
        if found:
            return Path(max(found, key=os.path.getmtime))
    return None


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def _time_interleaved(
    methods: Sequence[str], gen_length: int, batches: list, run: Callable, repeats: int
) -> dict[str, tuple[float, Any]]:
    """{method: (seconds, outputs)} with the methods taking turns batch by batch: each method's time
    is the sum over the batches of its calls, the best of ``repeats`` such sums. A change of load on a
    shared machine then falls on every method alike (the ratios hold; the seconds stay upper bounds)."""
    best = dict.fromkeys(methods, float("inf"))
    outputs: dict[str, list] = {}
    for _ in range(repeats):
        total = dict.fromkeys(methods, 0.0)
        parts: dict[str, list] = {m: [] for m in methods}
        for batch in batches:
            for method in methods:
                t0 = time.perf_counter()
                parts[method].append(run(method, gen_length, [batch]))
                total[method] += time.perf_counter() - t0
        for method in methods:
            best[method] = min(best[method], total[method])
        outputs = parts
    merged = {}
    for method, chunks in outputs.items():
        tokens = [t for c in chunks for t in c[0]]
        ended = [e for c in chunks for e in c[1]]
        accepted = [a for c in chunks for a in c[3]]
        merged[method] = (best[method], (tokens, ended, sum(c[2] for c in chunks), accepted))
    return merged


def measure(
    model: Any,
    prompt_ids: list[list[int]],
    references: list[str],
    lengths: Sequence[int],
    *,
    batch_size: int,
    block: int = 8,
    future: str = "hidden",
    merge: bool = True,
    repeats: int = 1,
    methods: Sequence[str] = METHODS,
    log: Callable[[str], None] = lambda s: None,
    block_model: Any = None,
    ar_model: Any = None,
    interleave: bool = False,
    tau: float = TAU,
    strategy: str = "low_confidence",
) -> list[Measurement]:
    """Run every method at every length on the same prompts; warm every method up once first.

    ``interleave``: the methods take turns batch by batch (``_time_interleaved``) instead of running
    one after the other, for ratios that a changing load on a shared machine does not bias.

    ``block_model`` (an ``InferenceModel`` of a block-diffusion checkpoint) runs the ``BLOCK_METHODS``
    with its own block size; without it they are skipped. ``ar_model``: the AR model of the AR row
    and the speculative rows' verifier (default: ``model.dlm`` with its adapters off). ``tau``: the
    threshold rows' τ; ``strategy``: the diffusion rows' unmasking strategy.
    """
    tok, dlm = model.tokenizer, model.dlm
    eos, pad = model.eos_id, tok.pad_token_id
    ar_model = dlm if ar_model is None else ar_model
    fast_dlm = dlm.merged_copy().eval() if merge else dlm  # the diffusion rows; AR keeps dlm (adapters off)
    batches = [prompt_ids[i : i + batch_size] for i in range(0, len(prompt_ids), batch_size)]
    block_dlm = None
    if block_model is not None:
        block_dlm = block_model.dlm.merged_copy().eval() if merge else block_model.dlm
    methods = [m for m in methods if m not in BLOCK_METHODS or block_dlm is not None]

    def settings_of(method: str, gen_length: int) -> dict[str, Any]:
        if method in BLOCK_METHODS:
            return sampler_settings(method, gen_length, block_dlm.block_size, "hidden", tau, strategy)
        return sampler_settings(method, gen_length, block, future, tau, strategy)

    def run(
        method: str, gen_length: int, todo: list[list[list[int]]]
    ) -> tuple[list[list[int]], list[bool], int, list[int]]:
        tokens, ended, nfe, accepted = [], [], 0, []
        for batch in todo:
            if method == AR:
                out = ar_generate(ar_model, batch, max_new_tokens=gen_length, eos_id=eos, pad_id=pad)
                ended += out.ended
            else:
                config = SamplerConfig(**settings_of(method, gen_length))
                model_of = block_dlm if method in BLOCK_METHODS else fast_dlm
                verifier = ar_model if method == SPECULATIVE else None
                out = generate(model_of, batch, config, eos_id=eos, pad_id=pad, seed=0, verifier=verifier)
                ended += (out.canvas == eos).any(-1).tolist()
                accepted += [a for row in getattr(out, "accepted", []) for a in row]
            tokens += out.tokens
            nfe += out.nfe
        return tokens, ended, nfe, accepted

    with torch.inference_mode():
        for method in methods:  # warm-up: allocator, kernels, lazy imports
            run(method, min(lengths), batches[:1])
        results = []
        for gen_length in lengths:
            ar_tokens = None  # AR first: the agreement of every other row is measured against it
            order = sorted(methods, key=lambda name: name != AR)
            timed = _time_interleaved(order, gen_length, batches, run, repeats) if interleave else {}
            for method in order:
                if interleave:
                    seconds, (tokens, ended, nfe, accepted) = timed[method]
                else:
                    seconds, (tokens, ended, nfe, accepted) = _time(
                        lambda m=method, g=gen_length: run(m, g, batches), repeats
                    )
                if method == AR:
                    ar_tokens = tokens
                preds = [tok.decode(t, skip_special_tokens=True).strip() for t in tokens]
                m = Measurement(
                    method=method,
                    gen_length=gen_length,
                    seconds=seconds,
                    tokens=answer_tokens(tokens, ended),
                    nfe=nfe,
                    exact_match=exact_match(preds, references),
                    settings=_short(
                        method, gen_length, None if method == AR else settings_of(method, gen_length)
                    ),
                    batches=len(batches),
                    rows=len(prompt_ids),
                    agreement=None if ar_tokens is None else agreement(tokens, ar_tokens),
                    accepted=sum(accepted) / len(accepted) if accepted else None,
                )
                log(
                    f"G={gen_length:<4} {method:<16} {seconds:7.2f} s  nfe {nfe:<5} EM {100 * m.exact_match:5.1f} %"
                )
                results.append(m)
    return results


def agreement(tokens: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> float:
    """The share of rows whose answer ids equal the reference's (AR greedy) token for token."""
    if len(tokens) != len(reference):
        raise ValueError(f"{len(tokens)} answers against {len(reference)} reference answers")
    return sum(list(a) == list(b) for a, b in zip(tokens, reference)) / max(len(tokens), 1)


def plain_base(model: Any, device: str | torch.device) -> DiffusionLM:
    """The base model of ``model``'s run rebuilt without adapters and causal (the AR model as deployed:
    no adapter layer to switch off at every call), with the run's [MASK] row, which AR never emits."""
    model_cfg = {k: v for k, v in (model.cfg.get("model") or {}).items() if k != "config"}
    model_cfg["trust_remote_code"] = False  # the file's own flag never counts (checked on loading)
    base, _ = build_diffusion_model(lora=None, **model_cfg)
    set_bidirectional(base.model, False)
    return base.to(device).eval()


def prompt_rows(model: Any, path: str | Path, rows: int) -> tuple[list[list[int]], list[str]]:
    """The first ``rows`` records of an Alpaca JSON / JSONL file through the checkpoint's template:
    prompt ids and reference outputs (``data.reader.parse_file``: every value checked)."""
    records, rejected = parse_file(path)
    if rejected:
        raise InputError(f"--prompts {path}: {describe(rejected)}")
    fmt = get_format(model.template)
    chosen = records[:rows]
    return [fmt.prompt_ids(r, model.tokenizer) for r in chosen], [r["output"] for r in chosen]


def load_rows(model: Any, rows: int) -> tuple[list[list[int]], list[str]]:
    """The first ``rows`` validation rows of the checkpoint's data config: prompt ids and references."""
    dm = run_datamodule(model.cfg, model.tokenizer, limit_train_rows=1, limit_val_rows=rows, num_workers=0)
    prompts = dm.sample_prompts(rows)
    return [p["prompt_ids"] for p in prompts], [p["reference"] for p in prompts]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m diffllm.bench.sampler",
        description="Speed (tokens/s, forward passes) and exact match of the diffusion samplers vs AR.",
    )
    p.add_argument(
        "--ckpt",
        help="a .ckpt (default: the newest outputs/<date>/<time>/checkpoints/last.ckpt of `make train`)",
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256], help="generation lengths G")
    p.add_argument("--rows", type=int, default=32, help="validation rows (the same prompts for every method)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per sampler / AR call")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell; the best time is kept")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: all cores, os.cpu_count())"
    )
    p.add_argument(
        "--block",
        type=int,
        default=None,
        help="semi-AR block of every diffusion row (default: the checkpoint's sampler.gen_length)",
    )
    p.add_argument(
        "--future",
        choices=["hidden", "visible"],
        default="hidden",
        help="SamplerConfig.future_blocks of every diffusion row (visible = LLaDA / Fast-dLLM canvas)",
    )
    p.add_argument(
        "--no-merge",
        action="store_true",
        help="run the diffusion rows through the LoRA layers instead of a merged copy of the model",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument(
        "--block-ckpt",
        help="a block-diffusion checkpoint (model.block_size) on the same data: adds the 'block:' rows",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=None,
        help="a subset of the rows (default: all)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=TAU,
        help=f"τ of the threshold rows (default {TAU}): commit every position more confident than τ",
    )
    p.add_argument(
        "--strategy",
        choices=list(STRATEGIES),
        default="low_confidence",
        help="the unmasking strategy of every diffusion row (default low_confidence; left_to_right: the "
        "leftmost [MASK] first, its threshold compared with the token's probability)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="time the methods batch by batch in turn (each method's seconds = the sum of its calls), so "
        "that a changing load on a shared machine falls on every method alike",
    )
    p.add_argument(
        "--prompts",
        help="answer the instructions of this Alpaca .json/.jsonl file (e.g. diffllm/assets/alpaca/"
        "alpaca_sample.json) through the checkpoint's template instead of its validation rows",
    )
    p.add_argument(
        "--profile",
        choices=[m for m in METHODS if m not in SPECULATIVE_METHODS],
        default=None,
        help="after the table, profile this method on the first batch at the largest G: time per step, "
        "model calls vs the sampler's own code, torch.profiler's top ops",
    )
    return p.parse_args(argv)


# aten ops that are the model's arithmetic; everything else is framework / Python overhead
COMPUTE_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::matmul",
    "aten::linear",
    "aten::_scaled_dot_product",
    "aten::scaled_dot_product",
    "aten::baddbmm",
)


def profile_summary(fn: Callable[[], Any], rows: int = 12) -> str:
    """Run ``fn`` once under torch.profiler (CPU): top ops by self time, and the share of the wall
    time spent inside matrix products and attention kernels (compute) against everything else."""
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - t0
    averages = prof.key_averages()
    compute = sum(e.self_cpu_time_total for e in averages if e.key.startswith(COMPUTE_OPS)) / 1e6
    ops = sum(e.self_cpu_time_total for e in averages if e.key.startswith("aten::")) / 1e6
    table = averages.table(sort_by="self_cpu_time_total", row_limit=rows)
    return (
        f"{table}\nwall {wall:.2f} s under the profiler; self time in matmul/attention ops {compute:.2f} s "
        f"({100 * compute / wall:.0f} % of wall); in all aten ops {ops:.2f} s ({100 * ops / wall:.0f} %); "
        f"the rest is Python, the sampler loop and the profiler itself (torch {torch.__version__})"
    )


class _ModelClock:
    """Sums the wall time spent inside a DiffusionLM's model calls (``hidden_states`` and ``lm_head``)
    while active: the rest of a sampler call is the sampler's own work (strategy, commits, fills)."""

    def __init__(self, dlm: Any) -> None:
        self.dlm, self.seconds, self.calls = dlm, 0.0, 0

    def __enter__(self) -> _ModelClock:
        inner = self.dlm.hidden_states

        def timed_hidden_states(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        self.dlm.hidden_states = timed_hidden_states  # instance attribute: shadows the method
        started: list[float] = []
        head = self.dlm.lm_head
        self._hooks = [
            head.register_forward_pre_hook(lambda *_: started.append(time.perf_counter())),
            head.register_forward_hook(lambda *_: self._add(time.perf_counter() - started.pop())),
        ]
        return self

    def _add(self, seconds: float) -> None:
        self.seconds += seconds

    def __exit__(self, *_: object) -> None:
        del self.dlm.hidden_states
        for hook in self._hooks:
            hook.remove()


def step_profile(
    dlm: Any,
    prompts: list[list[int]],
    config: SamplerConfig,
    *,
    eos_id: int,
    pad_id: int | None,
    rows: int = 12,
) -> str:
    """Where a sampler call's time goes, on one batch after a warm-up call.

    Without the profiler (best of 3): wall per step, and the share spent inside the model calls
    (``hidden_states`` + LM head, Hugging Face's Python included) against the sampler's own code.
    Then one call under torch.profiler: the top ops and the share of wall time in aten ops; what is
    left is Python (the model's modules and the sampler) and the profiler's own bookkeeping.
    """
    run = lambda: generate(dlm, prompts, config, eos_id=eos_id, pad_id=pad_id, seed=0)  # noqa: E731
    run()
    best = None
    for _ in range(3):
        with _ModelClock(dlm) as clock:
            t0 = time.perf_counter()
            out = run()
            wall = time.perf_counter() - t0
        if best is None or wall < best[0]:
            best = (wall, clock.seconds, out.steps)
    wall, model_s, steps = best
    sampler_s = wall - model_s
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    prof_wall = time.perf_counter() - t0
    averages = prof.key_averages()
    compute = sum(e.self_cpu_time_total for e in averages if e.key.startswith(COMPUTE_OPS)) / 1e6
    ops = sum(e.self_cpu_time_total for e in averages if e.key.startswith("aten::")) / 1e6
    table = averages.table(sort_by="self_cpu_time_total", row_limit=rows)
    return (
        f"batch {len(prompts)}, G={config.gen_length}, {steps} steps; best of 3 without the profiler: "
        f"{1e3 * wall / steps:.2f} ms per step, of which {1e3 * model_s / steps:.2f} ms in the model calls "
        f"({100 * model_s / wall:.0f} %) and {1e3 * sampler_s / steps:.2f} ms in the sampler's own code "
        f"({100 * sampler_s / wall:.0f} %)\n"
        f"{table}\nunder the profiler: wall {1e3 * prof_wall / steps:.2f} ms per step; self time in "
        f"matmul/attention ops {100 * compute / prof_wall:.0f} % of wall, in all aten ops "
        f"{100 * ops / prof_wall:.0f} %; the rest ({100 * (1 - ops / prof_wall):.0f} %) is Python (the "
        f"model's modules, the sampler) and the profiler itself (torch {torch.__version__})"
    )


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    if args.rows < 1 or args.batch_size < 1 or args.repeats < 1:
        _fail(
            f"--rows={args.rows}, --batch-size={args.batch_size}, --repeats={args.repeats}: each must be >= 1"
        )
    if not 0 < args.threshold < 1:
        _fail(f"--threshold {args.threshold}: τ must lie strictly between 0 and 1 (default {TAU})")
    if any(g < 1 for g in args.lengths):
        _fail(f"--lengths {args.lengths}: every length must be >= 1")
    if args.ckpt:
        ckpt = Path(args.ckpt)
        if not ckpt.exists():
            _fail(f"--ckpt {args.ckpt!r} does not exist; pass a run's checkpoints/last.ckpt")
    else:
        found = find_checkpoint([Path.cwd(), Path(__file__).resolve().parents[2]])
        if found is None:
            _fail(
                "no checkpoint: no outputs/<date>/<time>/checkpoints/last.ckpt here; run `make train` first or pass --ckpt"
            )
        ckpt = found

    try:
        check_device(args.device)
    except InputError as err:
        _fail(str(err).replace("device=", "--device "))
    datasets.disable_progress_bars()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)  # the same for every method; reported in the table header
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"checkpoint: {ckpt}")
    model = load_quietly(ckpt, args.device)
    if args.prompts:
        if not Path(args.prompts).is_file():
            _fail(f"--prompts {args.prompts!r} does not exist; pass an Alpaca .json/.jsonl file")
        try:
            prompt_ids, references = prompt_rows(model, args.prompts, args.rows)
        except InputError as err:
            _fail(str(err))
    else:
        prompt_ids, references = load_rows(model, args.rows)
    block = args.block or int(model.cfg["sampler"]["gen_length"])
    bad = [g for g in args.lengths if g > block and g % block]
    if block < 1 or bad:
        _fail(f"--block {block} must be >= 1 and divide every length above it; it does not divide {bad}")
    log(f"block {block}, future blocks {args.future}")
    block_model = None
    if args.block_ckpt:
        if not Path(args.block_ckpt).exists():
            _fail(
                f"--block-ckpt {args.block_ckpt!r} does not exist; pass a block model's checkpoints/last.ckpt"
            )
        block_model = load_quietly(Path(args.block_ckpt), args.device)
        if block_model.dlm.block_size is None:
            _fail(
                f"--block-ckpt {args.block_ckpt!r} is not a block-diffusion model (its model.block_size is null)"
            )
        if block_model.tokenizer.get_vocab() != model.tokenizer.get_vocab():
            _fail("--block-ckpt was trained with another tokenizer than --ckpt; both must share the data")
        log(f"block model: {args.block_ckpt} (block size {block_model.dlm.block_size})")
    measurements = measure(
        model,
        prompt_ids,
        references,
        args.lengths,
        batch_size=args.batch_size,
        block=block,
        future=args.future,
        merge=not args.no_merge,
        repeats=args.repeats,
        log=log,
        block_model=block_model,
        methods=args.methods or METHODS,
        ar_model=plain_base(model, args.device),
        interleave=args.interleave,
        tau=args.threshold,
        strategy=args.strategy,
    )
    command = "python -m diffllm.bench.sampler " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = build_report(
        measurements,
        rows=len(prompt_ids),
        batch_size=args.batch_size,
        threads=threads,
        device=args.device,
        command=command.strip() + f"  (checkpoint {ckpt})",
        merged=not args.no_merge,
    )
    if args.profile:
        g = max(args.lengths)
        first = prompt_ids[: args.batch_size]
        with torch.inference_mode():
            if args.profile == AR:
                summary = profile_summary(
                    lambda: ar_generate(
                        model.dlm,
                        first,
                        max_new_tokens=g,
                        eos_id=model.eos_id,
                        pad_id=model.tokenizer.pad_token_id,
                    )
                )
            else:
                source = block_model if args.profile in BLOCK_METHODS else model
                dlm = source.dlm.merged_copy().eval() if not args.no_merge else source.dlm
                width = dlm.block_size if args.profile in BLOCK_METHODS else block
                future = "hidden" if args.profile in BLOCK_METHODS else args.future
                config = SamplerConfig(
                    **sampler_settings(args.profile, g, width, future, args.threshold, args.strategy)
                )
                summary = step_profile(
                    dlm, first, config, eos_id=model.eos_id, pad_id=model.tokenizer.pad_token_id
                )
        report += f"\n\nProfile of `{args.profile}` at G={g}, the first batch:\n\n```\n{summary}\n```"
    print(report, flush=True)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return report


if __name__ == "__main__":
    main()
