"""Numbers and plots behind the denoising-trajectory notebook and the evaluation report.

The notebook (``notebooks/denoising_trajectories.ipynb``) and ``diffllm.evaluate`` stay thin: the
logic is here and tested. Plots are drawn on ``matplotlib.figure.Figure`` objects, never through
``pyplot``, so no global backend is touched: ``fig.savefig`` renders with Agg, and a notebook shows
a returned figure through its inline backend.

Reading a trajectory (``diffllm.diffusion.trajectory``): step s commits some answer positions p
with a confidence c. ``commit_steps`` gives, per position, the step and confidence of its commit;
``commit_grid`` lays them out as a (steps x positions) matrix for the heatmap; ``order_tau`` is
Kendall's tau-b between position and commit step: +1 when the answer is unmasked strictly left to
right (an AR order), about 0 for an order unrelated to position, -1 right to left.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from diffllm.diffusion.trajectory import Trajectory

# ----------------------------------------------------------------------------- trajectory numbers


def commit_steps(traj: Trajectory) -> tuple[np.ndarray, np.ndarray]:
    """(G,) index of the step that committed each answer position, (G,) its confidence.

    Positions set to EOS by ``fill_after_eos`` get their step and a NaN confidence (the model did
    not choose them). Raises if a position was never committed (an incomplete trajectory).
    """
    length = len(traj.final_canvas)
    step = np.full(length, -1, dtype=np.int64)
    confidence = np.full(length, np.nan)
    for s, st in enumerate(traj.steps):
        for pos, c in zip(st.committed, st.confidences):
            step[pos], confidence[pos] = s, c
        step[st.filled] = s
    if (step < 0).any():
        raise ValueError(
            f"positions {np.flatnonzero(step < 0).tolist()} were never committed in this trajectory"
        )
    return step, confidence


def commit_grid(traj: Trajectory) -> tuple[np.ndarray, np.ndarray]:
    """The heatmap layers, both (S, G): confidence at each (step, committed position), NaN elsewhere;
    and True where the position already held a token before that step (committed earlier).
    """
    step, confidence = commit_steps(traj)
    n_steps = len(traj.steps)
    grid = np.full((n_steps, step.size), np.nan)
    grid[step, np.arange(step.size)] = confidence  # NaN for EOS-filled positions
    known_before = np.arange(n_steps)[:, None] > step[None, :]
    return grid, known_before


def kendall_tau(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Kendall's tau-b of two equal-length sequences (ties in either one allowed).

    tau_b = (C - D) / sqrt((n0 - n1) (n0 - n2)) over all pairs i < j: C concordant, D discordant,
    n0 = n(n-1)/2, n1 / n2 pairs tied in x / in y. NaN when either sequence is constant.
    O(n^2) pairs: fine for answer canvases (hundreds of positions).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"kendall_tau needs two 1-D sequences of one length, got {x.shape} and {y.shape}")
    i, j = np.triu_indices(x.size, k=1)
    dx, dy = np.sign(x[j] - x[i]), np.sign(y[j] - y[i])
    n0 = i.size
    n1, n2 = int((dx == 0).sum()), int((dy == 0).sum())
    denom = math.sqrt((n0 - n1) * (n0 - n2))
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def order_tau(traj: Trajectory, until_eos: int | None = None) -> float:
    """Kendall's tau-b between answer position and commit step (+1 = strictly left to right).

    ``until_eos``: the EOS id; only positions up to the first EOS of the final canvas count (the
    EOS padding after an answer is often filled in one late step and would dominate short answers).
    """
    step, _ = commit_steps(traj)
    length = step.size
    if until_eos is not None and until_eos in traj.final_canvas:
        length = traj.final_canvas.index(until_eos) + 1
    return kendall_tau(np.arange(length), step[:length])


def token_labels(traj: Trajectory, tokenizer: Any | None = None) -> list[str]:
    """One short label per answer position: the decoded final token (ids without a tokenizer)."""
    if tokenizer is None:
        return [str(t) for t in traj.final_canvas]
    return [(tokenizer.decode([t]).replace("\n", "\\n").strip() or "·") for t in traj.final_canvas]


# ----------------------------------------------------------------------------------------- plots

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
    from matplotlib.backends.backend_agg import FigureCanvasAgg

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


# ------------------------------------------------------------------------------ notebook helpers


def answer_text(traj: Trajectory, tokenizer: Any, eos_id: int) -> str:
    """The decoded final answer of a trajectory (up to the first ``eos_id``, special tokens skipped).

    ``eos_id``: the run's end-of-answer id (``InferenceModel.eos_id``).
    """
    ids = traj.final_canvas
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def trajectories(model: Any, prompt_ids: Sequence[list[int]], config: Any, seed: int = 0) -> list[Trajectory]:
    """Sample answers for ``prompt_ids`` with ``config`` (a SamplerConfig), recording every step.

    ``model`` is an ``InferenceModel`` (``diffllm.inference.load_for_inference``).
    """
    from diffllm.diffusion.sampler import generate

    tok = model.tokenizer
    out = generate(
        model.dlm,
        [list(p) for p in prompt_ids],
        config,
        eos_id=model.eos_id,
        pad_id=tok.pad_token_id,
        seed=seed,
        record_trajectory=True,
    )
    return out.trajectories


def strategy_trajectories(
    model: Any,
    prompt_ids: Sequence[list[int]],
    config: Any,
    strategies: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, list[Trajectory]]:
    """{strategy: one trajectory per prompt}, ``config``'s other settings unchanged.

    Prompt i is decoded alone with seed ``seed + i``: in one batch every row would get the same
    seed, so ``random`` would unmask every prompt in the same order and its taus would not be
    independent draws.
    """
    import dataclasses

    from diffllm.diffusion.strategies import STRATEGIES

    names = list(STRATEGIES) if strategies is None else list(strategies)
    out = {}
    for name in names:
        cfg = dataclasses.replace(config, strategy=name)
        out[name] = [trajectories(model, [p], cfg, seed + i)[0] for i, p in enumerate(prompt_ids)]
    return out


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def strategy_table(
    by_strategy: Mapping[str, Sequence[Trajectory]],
    tokenizer: Any,
    eos_id: int,
    index: int = 0,
    reference: str | None = None,
) -> str:
    """A markdown table: per strategy the answer to prompt ``index`` with its taus, and the mean
    whole-canvas tau over all prompts.

    The whole-canvas tau is the unbiased one (``random`` averages 0 on it). The tau up to the first
    EOS looks at the answer only, but where that EOS lands depends on the order, so it is biased
    (``random`` scores well above 0 on it): read it for one answer, not as an average.
    """
    lines = [
        "| strategy | answer | tau (canvas) | tau (to EOS) | mean tau (canvas, all prompts) | steps |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, trajs in by_strategy.items():
        traj = trajs[index]
        taus = np.array([order_tau(t) for t in trajs])
        mean = float(np.nanmean(taus)) if np.isfinite(taus).any() else float("nan")
        lines.append(
            f"| {name} | {_md(answer_text(traj, tokenizer, eos_id))} | {order_tau(traj):+.2f} | "
            f"{order_tau(traj, eos_id):+.2f} | {mean:+.2f} | {len(traj.steps)} |"
        )
    if reference is not None:
        lines.append(f"| *reference* | {_md(reference)} | | | | |")
    return "\n".join(lines)


# The notebook's fallback when no run exists: ~30 s on 2 CPU cores, enough to see an order emerge.
NOTEBOOK_RUN = [
    "trainer.max_steps=100",
    "trainer.val_every_n_steps=100",
    "trainer.enable_progress_bar=false",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "data.limit_val_rows=16",
    "data.num_sample_prompts=2",
    "report.num_rows=8",
]


def latest_checkpoint(outputs: str | Path) -> Path | None:
    """The newest ``<outputs>/*/*/checkpoints/last.ckpt`` (by modification time), or None."""
    found = sorted(Path(outputs).glob("*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def resolve_checkpoint(
    ckpt: str | Path | None, outputs: str | Path, overrides: Sequence[str] = NOTEBOOK_RUN
) -> Path:
    """``ckpt`` if given; else the newest run checkpoint under ``outputs``; else train a short run
    of the embedded default (``overrides``) into ``outputs/notebook/<time>`` and return its checkpoint.
    """
    if ckpt:
        path = Path(ckpt)
        if not path.exists():
            raise FileNotFoundError(
                f"CKPT={str(path)!r} does not exist; set CKPT = None to use the newest run"
            )
        return path
    found = latest_checkpoint(outputs)
    if found is not None:
        return found
    from diffllm.config import compose
    from diffllm.train import train

    out = Path(outputs) / "notebook" / time.strftime("%Y-%m-%d_%H-%M-%S")
    train(compose([*overrides, f"output_dir={out}", "report.enabled=false"]))
    return out / "checkpoints" / "last.ckpt"
