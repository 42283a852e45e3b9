"""Plots behind the denoising-trajectory notebook and the evaluation report.

The numbers they draw come from ``diffllm.diffusion.trajectory`` (commit order, Kendall tau) and
``diffllm.cli.evaluate`` (NLL by length, quality vs steps); the notebook's own helpers are in
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


def plot_nll_by_length(buckets: Sequence[Mapping[str, Any]], unigram_ce: float | None = None) -> Figure:
    """Grouped bars of the diffusion NLL bound and the AR NLL per answer-length bucket, gap on top."""
    fig = Figure(figsize=(max(5.0, 1.1 * len(buckets) + 2), 3.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(buckets))
    nll = [b["nll_bound"] for b in buckets]
    ar = [b["ar_nll"] for b in buckets]
    ax.bar(x - 0.2, nll, 0.4, label="diffusion NLL bound")
    ax.bar(x + 0.2, ar, 0.4, label="AR NLL (base)")
    for xi, b in zip(x, buckets):
        top = np.nanmax([b["nll_bound"], b["ar_nll"]])
        if np.isfinite(top):
            ax.annotate(f"gap {b['gap']:+.2f}", (xi, top), ha="center", va="bottom", fontsize=7)
    if unigram_ce is not None and math.isfinite(unigram_ce):
        ax.axhline(unigram_ce, color="grey", linestyle="--", linewidth=1, label="unigram CE")
    ax.set_xticks(x, [f"{b['label']}\n({b['rows']} rows)" for b in buckets], fontsize=8)
    ax.margins(y=0.12)
    ax.set_xlabel("answer length (tokens, EOS included)")
    ax.set_ylabel("nats / token")
    ax.set_title("answer NLL by length: diffusion bound vs AR base", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def plot_quality_vs_steps(grid: Sequence[Mapping[str, Any]], ar: Mapping[str, Any] | None = None) -> Figure:
    """Exact match and ROUGE-L of the diffusion sampler against its number of steps; AR greedy as lines."""
    fig = Figure(figsize=(5.0, 3.4), layout="constrained")
    ax = fig.add_subplot()
    steps = [g["steps"] for g in grid]
    ax.plot(steps, [g["exact_match"] for g in grid], "o-", label="diffusion exact match")
    ax.plot(steps, [g["rougeL"] for g in grid], "s--", label="diffusion ROUGE-L")
    if ar is not None:
        if math.isfinite(ar.get("exact_match", float("nan"))):
            ax.axhline(ar["exact_match"], color="C0", linestyle=":", label="AR greedy exact match")
        if math.isfinite(ar.get("rougeL", float("nan"))):
            ax.axhline(ar["rougeL"], color="C1", linestyle=":", label="AR greedy ROUGE-L")
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
