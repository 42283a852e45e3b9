"""Plots behind the denoising-trajectory notebook and the evaluation report.

The numbers they draw come from ``diffllm.diffusion.trajectory`` (commit order, Kendall tau) and
``evaluate``'s report (NLL by length, quality vs steps: ``*_data(r)`` picks from the report what the
plot draws, named and ordered by ``names`` as the tables are); the notebook's own helpers are in
``diffllm.inference.notebook``. Plots are drawn on ``matplotlib.figure.Figure`` objects, never through
``pyplot``, so no global backend is touched: ``fig.savefig`` renders with Agg, and a notebook shows
a returned figure through its inline backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from diffllm.diffusion.trajectory import Trajectory, commit_grid, order_tau
from diffllm.evaluation.names import FIGURES, models_in, with_current_keys

# ----------------------------------------------------------------------------------------- plots


def token_labels(traj: Trajectory, tokenizer: Any | None = None) -> list[str]:
    """One short label per answer position: the decoded final token (ids without a tokenizer)."""
    if tokenizer is None:
        return [str(t) for t in traj.final_canvas]
    return [(tokenizer.decode([t]).replace("\n", "\\n").strip() or "·") for t in traj.final_canvas]


_KNOWN = ListedColormap(["white", "#d9d9d9"])  # still [MASK] / committed at an earlier step


def _heatmap_size(n_steps: int, length: int) -> tuple[float, float]:
    """Figure inches for one (steps x positions) heatmap: grows with the canvas, within bounds."""
    return float(np.clip(0.3 * length + 1.5, 3.5, 10.0)), float(np.clip(0.2 * n_steps + 1.4, 2.6, 7.0))


def plot_commit_heatmap(
    traj: Trajectory,
    tokenizer: Any | None = None,
    ax: Any | None = None,
    title: str | None = None,
    colorbar: bool = True,
) -> Figure:
    """Step x position heatmap: the cell where a token was committed, coloured by its confidence.

    Grey: the position already holds a token; white: still [MASK]. The x labels are the final
    tokens, so the picture reads as the answer being written.
    """
    grid, known = commit_grid(traj)
    if ax is None:
        fig = Figure(figsize=_heatmap_size(*grid.shape), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    ax.imshow(known, cmap=_KNOWN, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        cmap="viridis",
        vmin=vmin,
        vmax=vmax,
        aspect="auto",
        interpolation="nearest",
    )
    labels = token_labels(traj, tokenizer)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(grid.shape[0]), [str(s + 1) for s in range(grid.shape[0])], fontsize=7)
    ax.set_xlabel("answer position (final token)")
    ax.set_ylabel("step")
    ax.set_title(title or f"commit order (Kendall tau {order_tau(traj):+.2f})", fontsize=9)
    if colorbar:
        fig.colorbar(image, ax=ax, label="confidence at commit", shrink=0.8)
    return fig


def plot_strategies(trajectories: Mapping[str, Trajectory], tokenizer: Any | None = None) -> Figure:
    """One commit heatmap per strategy, side by side, each titled with its (whole-canvas) Kendall tau."""
    names = list(trajectories)
    length = len(trajectories[names[0]].final_canvas)
    n_steps = max(len(t.steps) for t in trajectories.values())
    ncols = len(names) if length <= 16 else min(2, len(names))  # long canvases: a 2-column grid
    nrows = math.ceil(len(names) / ncols)
    width, height = _heatmap_size(n_steps, length)
    fig = Figure(figsize=(ncols * width, nrows * height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    for ax, name in zip(axes, names):
        traj = trajectories[name]
        plot_commit_heatmap(traj, tokenizer, ax=ax, title=f"{name}: tau {order_tau(traj):+.2f}")
    return fig


def nll_by_length_data(r: Mapping[str, Any]) -> dict[str, Any]:
    """What ``nll_by_length.png`` draws, from ``evaluate``'s ``length_buckets``: a bar per likelihood
    figure the length table shows (``names.FIGURES`` order), the bound's gap to the AR base on top,
    the unigram reference line."""
    buckets = r.get("length_buckets") or []
    figures = [name for name, _ in FIGURES.values() if buckets and name in buckets[0]]
    return {
        "labels": [f"{b['label']}\n({b['rows']} rows)" for b in buckets],
        "bars": {label: [b[name] for b in buckets] for name, label in FIGURES.values() if name in figures},
        "gaps": [b.get("gap", float("nan")) for b in buckets],
        "unigram_ce": r.get("unigram_ce"),
    }


def plot_nll_by_length(data: Mapping[str, Any]) -> Figure:
    """Grouped bars of every model's answer NLL per answer-length bucket (``nll_by_length_data``), the
    bound's gap to the AR base on top."""
    labels, bars = data["labels"], data["bars"]
    fig = Figure(figsize=(max(5.0, 1.1 * len(labels) * max(len(bars), 2) / 2 + 2), 3.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    width = 0.8 / max(len(bars), 1)
    for i, (label, values) in enumerate(bars.items()):
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, label=label)
    for xi, gap, *values in zip(x, data["gaps"], *bars.values()):
        top = np.nanmax(values) if values and np.isfinite(values).any() else float("nan")
        if np.isfinite(top) and math.isfinite(gap):
            ax.annotate(f"gap {gap:+.2f}", (xi, top), ha="center", va="bottom", fontsize=7)
    unigram = data.get("unigram_ce")
    if unigram is not None and math.isfinite(unigram):
        ax.axhline(unigram, color="grey", linestyle="--", linewidth=1, label="unigram CE")
    ax.set_xticks(x, labels, fontsize=8)
    ax.margins(y=0.12)
    ax.set_xlabel("answer length (tokens, EOS included)")
    ax.set_ylabel("nats / token")
    ax.set_title("answer NLL by length (gap: bound - AR base)", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def quality_vs_steps_data(r: Mapping[str, Any]) -> dict[str, Any]:
    """What ``quality_vs_steps.png`` draws: the diffusion sampler's exact match and ROUGE-L at each
    step count of ``steps_grid`` (skipped counts left out), and a horizontal line per metric for
    every other model of the generation table (``names.models_in``: AR-SFT whenever it is in the
    table) with a finite value."""
    r = with_current_keys(r)
    done = [g for g in r.get("steps_grid") or [] if "skipped" not in g]
    metrics = {"exact_match": "exact match", "rougeL": "ROUGE-L"}
    return {
        "steps": [g["steps"] for g in done],
        "lines": {f"diffusion {name}": [g[m] for g in done] for m, name in metrics.items()},
        "references": {
            f"{label} {name}": float(r[f"{model}_{m}"])
            for model, label in models_in(r)
            if model != "diffusion"
            for m, name in metrics.items()
            if f"{model}_{m}" in r and math.isfinite(r[f"{model}_{m}"])
        },
    }


def plot_quality_vs_steps(data: Mapping[str, Any]) -> Figure:
    """The diffusion sampler's quality against its number of steps, the other models as horizontal
    lines (``quality_vs_steps_data``)."""
    fig = Figure(figsize=(5.0, 3.4), layout="constrained")
    ax = fig.add_subplot()
    steps = data["steps"]
    for (label, values), style in zip(data["lines"].items(), ("o-", "s--")):
        ax.plot(steps, values, style, color="C0" if style == "o-" else "C1", label=label)
    linestyles = (":", "-.", (0, (1, 3)))
    for i, (label, value) in enumerate(data["references"].items()):
        ax.axhline(value, color=f"C{2 + i // 2}", linestyle=linestyles[i % 2], label=label)
    if steps and min(steps) > 0:
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("score")
    ax.set_title("generation quality vs number of denoising steps", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG with the Agg renderer (no pyplot, no display needed)."""
    FigureCanvasAgg(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def plot_tau_by_strategy(taus: Mapping[str, Sequence[float]]) -> Figure:
    """Kendall tau (position vs commit step) of several prompts per strategy: one dot per prompt."""
    fig = Figure(figsize=(max(4.0, 1.3 * len(taus) + 1.5), 3.2), layout="constrained")
    ax = fig.add_subplot()
    for i, values in enumerate(taus.values()):
        values = np.asarray(values, dtype=np.float64)
        jitter = np.linspace(-0.12, 0.12, values.size) if values.size > 1 else np.zeros(1)
        ax.scatter(i + jitter, values, s=14, alpha=0.7)
        if np.isfinite(values).any():
            ax.hlines(np.nanmean(values), i - 0.25, i + 0.25, color="black", linewidth=1.5)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(taus)), list(taus))
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("Kendall tau (1 = left to right)")
    ax.set_title("unmasking order per strategy, whole canvas (bar: mean)", fontsize=9)
    return fig
