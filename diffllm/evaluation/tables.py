"""The one table renderer: every table the project prints or writes, as text or markdown.

A ``Table`` is a title, a header and rows of cells; ``render`` lays tables out for a terminal or for
markdown. The builders below read a report (``report.json``, ``eval.json``: the figures of
``compare.compare``) and take their rows, columns and labels from ``names``; so the end-of-run
report (``format_report``), ``evaluate``'s terminal view and ``eval.md`` (``format_markdown``) and
the multirun comparison (``format_comparison``) show one figure under one name, ± its SE
(``plus_minus``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffllm.evaluation.names import (
    FIGURES,
    GAPS,
    GENERATION,
    MODELS,
    REFERENCE_FREE,
    SHORT,
    models_in,
    reference_model,
    with_current_keys,
)


@dataclass
class Table:
    """A title, a header and rows of cells (strings); ``numeric``: columns after the first right-aligned."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    numeric: bool = True


def plus_minus(r: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """``value ± se`` of ``key`` in a report (``<key>_se``), the value alone without a finite SE, or an
    em dash when absent / not finite."""
    value, se = r.get(key), r.get(f"{key}_se")
    if value is None or not math.isfinite(value):
        return "—"
    if se is None or not math.isfinite(se):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {se:.{digits}f}"


def _md(cell: str) -> str:
    return str(cell).replace("\n", "⏎").replace("|", "\\|")


def render(tables: Sequence[Table], markdown: bool = False) -> list[str]:
    """The lines of ``tables``: a ``## title`` and a pipe table each (markdown), or a title line and
    aligned columns indented by two spaces (text); each table preceded by an empty line."""
    lines: list[str] = []
    for t in tables:
        if markdown:
            lines += ["", f"## {t.title}", ""] if t.title else [""]
            align = "---:|" if t.numeric else "---|"
            lines.append("| " + " | ".join(_md(h) for h in t.header) + " |")
            lines.append("|---|" + align * (len(t.header) - 1))
            lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in t.rows]
            lines += ["", *t.notes] if t.notes else []
            continue
        lines += ["", t.title] if t.title else [""]
        grid = [t.header, *t.rows]
        widths = [max(len(str(row[i])) for row in grid) for i in range(len(t.header))]
        for row in grid:
            cells = [str(row[0]).ljust(widths[0])]
            cells += [
                str(c).rjust(max(w, 8)) if t.numeric else str(c).ljust(w) for c, w in zip(row[1:], widths[1:])
            ]
            lines.append(("  " + "   ".join(cells)).rstrip())
        lines += [f"  {note}" for note in t.notes]
    return lines


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------- one report


def likelihood_table(r: Mapping[str, Any]) -> Table:
    """Answer NLL of every model scored, the unigram reference, the paired differences."""
    rows = []
    for name, label in FIGURES.values():
        if name in r:
            tokens = r.get("answer_tokens_no_end") if name == "ar_nll_no_end" else r.get("answer_tokens")
            rows.append([label, plus_minus(r, name), str(tokens)])
    if "unigram_ce" in r:
        rows.append(["unigram CE of the answers (no-context reference)", _num(r["unigram_ce"]), ""])
    rows += [[label, plus_minus(r, name), "paired"] for name, _, _, label in GAPS if name in r]
    return Table(
        "answer NLL (nats/token), ± SE over rows; differences paired over the same rows",
        ["figure", "nats/token", "tokens"],
        rows,
    )


def generation_table(r: Mapping[str, Any]) -> Table:
    """Every generation metric (``names.GENERATION``) of every model that generated, ± SE, and the
    exact-match differences against AR-SFT (else the base)."""
    cols = models_in(r)
    rows = [
        [label, *(plus_minus(r, f"{m}_{metric}", digits) for m, _ in cols)]
        for metric, (label, digits) in GENERATION.items()
        if any(f"{m}_{metric}" in r for m, _ in cols)
    ]
    ref = reference_model(m for m, _ in cols)
    if any(f"{m}_minus_{ref}_exact_match" in r for m, _ in cols):
        rows.append(
            [
                f"exact match - {MODELS[ref]}",
                *(plus_minus(r, f"{m}_minus_{ref}_exact_match") for m, _ in cols),
            ]
        )
    cut = f" ({r['prompts_truncated']} cut from the left)" if r.get("prompts_truncated") else ""
    return Table(
        f"generation, {r.get('gen_rows', r.get('rows'))} prompts{cut}",
        ["metric", *(label for _, label in cols)],
        rows,
        [
            "± SE: binomial for exact match and EOS rate, sd/sqrt(n) otherwise; differences paired over prompts"
        ],
    )


def reference_free_table(r: Mapping[str, Any]) -> Table | None:
    rf = r.get("reference_free") or {}
    models = [(m, label) for m, label in MODELS.items() if m in rf]
    if not models:
        return None
    return Table(
        f"reference-free answer quality, {r.get('quality_rows', '?')} prompts (scored by the AR base)",
        ["metric", *(label for _, label in models)],
        [
            [label, *(plus_minus(rf[m], key, digits) for m, _ in models)]
            for key, (label, digits) in REFERENCE_FREE.items()
        ],
    )


SWEEP_COLUMNS = (
    "tokens_per_step",
    "steps",
    "nfe",
    "exact_match",
    "rougeL",
    "bleu",
    "ar_scored_nll",
    "seconds",
)


def sweep_table(rows: Sequence[Mapping[str, Any]], title: str) -> Table | None:
    """A step-count sweep (``sweep.steps_sweep`` rows): the columns some row has; a skipped count keeps
    its row, its reason in the notes."""
    if not rows:
        return None
    columns = [c for c in SWEEP_COLUMNS if any(c in row for row in rows)]

    def cell(row: Mapping[str, Any], c: str) -> str:
        if c in ("tokens_per_step", "steps"):
            return str(row.get(c, "—"))
        if "skipped" in row:
            return "skipped" if c == "exact_match" else "—"
        if c not in row:
            return "—"
        if c == "seconds":
            return f"{row[c]:.2f}"
        return _num(row[c]) if c in ("nfe", "bleu") else plus_minus(row, c)

    notes = [f"(steps={row['steps']} skipped: {row['skipped']})" for row in rows if "skipped" in row]
    return Table(title, [SHORT[c] for c in columns], [[cell(row, c) for c in columns] for row in rows], notes)


def length_table(r: Mapping[str, Any]) -> Table | None:
    """``length_buckets``: rows and tokens per answer-length bucket, each likelihood figure scored
    (``names.FIGURES`` order, as ``plots.nll_by_length_data``) and the gaps."""
    buckets = r.get("length_buckets") or []
    if not buckets:
        return None
    figures = [name for name, _ in FIGURES.values() if name in buckets[0]]
    figures += [name for name, _, _, _ in GAPS if name in buckets[0]]
    return Table(
        "answer NLL by answer length (nats/token)",
        ["answer tokens", "rows", "tokens", *(SHORT[k] for k in figures)],
        [[b["label"], str(b["rows"]), str(b["tokens"]), *(_num(b[k]) for k in figures)] for b in buckets],
    )


def task_table(r: Mapping[str, Any]) -> Table | None:
    tasks = r.get("by_task") or []
    models = [(m, label) for m, label in MODELS.items() if tasks and f"{m}_exact_match" in tasks[0]]
    if not tasks:
        return None
    return Table(
        "exact match by task",
        ["task", "rows", *(label for _, label in models)],
        [[t["task"], str(t["rows"]), *(_num(t.get(f"{m}_exact_match")) for m, _ in models)] for t in tasks],
    )


def _clip(text: Any, limit: int = 80) -> str:
    s = str(text).replace("\n", "⏎")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def examples_table(r: Mapping[str, Any]) -> Table | None:
    examples = r.get("examples") or []
    models = [(m, label) for m, label in MODELS.items() if examples and m in examples[0]]
    if not examples:
        return None
    return Table(
        "examples",
        ["prompt", "reference", *(label for _, label in models)],
        [
            [_clip(e["prompt"]), _clip(e["reference"]), *(_clip(e.get(m, "")) for m, _ in models)]
            for e in examples
        ],
        numeric=False,
    )


def agreement_with_base_table(r: Mapping[str, Any]) -> Table | None:
    """``evaluate``'s ``agreement`` (``evaluation.agreement``): each model's agreement with the base
    model's greedy answers (± SE), the paired difference, the base's answer length."""
    a = r.get("agreement")
    if not a:
        return None
    rows = [
        [
            label,
            plus_minus(a["models"][m], "exact_match"),
            plus_minus(a["models"][m], "first_difference", 2),
            _num(a["models"][m].get("answer_length"), 2),
        ]
        for m, label in MODELS.items()
        if m in a["models"]
    ]
    if "diffusion_minus_ar_sft" in a:
        d = a["diffusion_minus_ar_sft"]
        rows.append(
            [
                "diffusion - AR-SFT (paired)",
                plus_minus(d, "exact_match"),
                plus_minus(d, "first_difference", 2),
                "",
            ]
        )
    rows.append(
        [f"{MODELS['ar_base']} (its own greedy answers)", "", "", _num(a.get("base_answer_length"), 2)]
    )
    return Table(
        f"Agreement with the base model: its greedy answers on {a['rows']} prompts of {a['file']} "
        f"(at most {a['gen_length']} tokens; first difference: leading tokens shared, ± SE)",
        ["model", "exact match with base", "first difference (tokens)", "answer tokens"],
        rows,
    )


def report_tables(r: Mapping[str, Any]) -> list[Table]:
    """The tables of the end-of-run report and ``evaluate``'s terminal view (those with figures); a
    report written before a key was renamed reads with today's names."""
    r = with_current_keys(r)
    tables = [
        likelihood_table(r),
        generation_table(r),
        reference_free_table(r),
        sweep_table(
            r.get("quality_vs_compute") or [],
            f"diffusion quality vs compute, {r.get('quality_rows', '?')} prompts (schedule mode)",
        ),
        agreement_with_base_table(r),
    ]
    return [t for t in tables if t is not None]


def format_report(r: Mapping[str, Any]) -> str:
    """A plain-text view of a report (``report.build_report`` or ``evaluate``): every figure ± its SE."""
    head = f"== diffllm report: {r['rows']} validation rows, {r['answer_tokens']} answer tokens (answer + end token) =="
    return "\n".join([head, *render(report_tables(r))])


def format_markdown(r: Mapping[str, Any]) -> str:
    """``eval.md``: the settings, then every table of ``evaluate``'s report, its plots and examples."""
    r = with_current_keys(r)
    lk = r["likelihood"]
    lines = [
        "# diffllm evaluation",
        "",
        f"- model: `{r['source']}`" + (f"; AR-SFT: `{r['ar_ckpt_path']}`" if r.get("ar_ckpt_path") else ""),
        f"- data: {r['data']}; {r['rows']} rows scored ({r['answer_tokens']} answer tokens, EOS included), "
        f"{r['gen_rows']} generated",
        f"- likelihood: ELBO bound, linear schedule, {lk['num_samples']}-point `{lk['method']}` t estimator, "
        f"batch {lk['batch_size']}, seed {lk['seed']} (batch i: validation_seed(seed, i))",
        f"- sampler: {', '.join(f'{k}={v}' for k, v in r['sampler'].items())}",
    ]
    tables = [
        likelihood_table(r),
        generation_table(r),
        length_table(r),
        task_table(r),
        sweep_table(
            sorted(
                [
                    *(r.get("steps_grid") or []),
                    *({"steps": s["steps"], "skipped": s["reason"]} for s in r.get("steps_skipped") or []),
                ],
                key=lambda row: row["steps"],
            ),
            f"diffusion quality vs sampling steps, {r['gen_rows']} prompts (schedule mode)",
        ),
        reference_free_table(r),
        sweep_table(
            r.get("quality_vs_compute") or [],
            f"diffusion quality vs compute, {r.get('quality_rows', '?')} prompts (schedule mode)",
        ),
        agreement_with_base_table(r),
    ]
    lines += render([t for t in tables if t is not None], markdown=True)
    lines += ["", *(f"![{name}]({Path(path).name})" for name, path in (r.get("plots") or {}).items())]
    lines += render([t for t in [examples_table(r)] if t is not None], markdown=True)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- many reports

# the figures of the multirun comparison, in order; reference-free ones are read from
# reference_free["diffusion"]
COMPARISON = (
    "nll_bound",
    "l2r_nll",
    "ar_sft_nll",
    "ar_nll",
    "gap",
    "diffusion_exact_match",
    "diffusion_rougeL",
    "ar_scored_nll",
)


def comparison_table(results: Mapping[str, Mapping[str, Any]]) -> Table:
    """A row per job (``job name -> eval.json content``), each figure ± SE; the figures some job has."""
    results = {job: with_current_keys(r) for job, r in results.items()}
    figures = {
        job: {**r, **(r.get("reference_free") or {}).get("diffusion", {})} for job, r in results.items()
    }
    columns = [k for k in COMPARISON if any(k in f for f in figures.values())]
    return Table(
        "",
        ["job", *(SHORT[k] for k in columns)],
        [[job, *(plus_minus(f, k) for k in columns)] for job, f in figures.items()],
    )


def format_comparison(results: Mapping[str, Mapping[str, Any]], markdown: bool = True) -> str:
    return "\n".join(render([comparison_table(results)], markdown=markdown)).strip("\n")
