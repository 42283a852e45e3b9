"""The denoising-trajectory notebook: committed without outputs, runs top to bottom on CPU, and the
``diffllm.evaluation.plots`` functions it stands on."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from diffllm.diffusion.trajectory import (
    Trajectory,
    TrajectoryStep,
    commit_grid,
    commit_steps,
    kendall_tau,
    order_tau,
)
from diffllm.evaluation import plots
from diffllm.inference import notebook

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "denoising_trajectories.ipynb"
MASK = 99


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "DIFFLLM_CKPT" in params[0].source and "CKPT = " in params[0].source


def test_notebook_runs_and_its_trajectory_cells_draw(tiny_run, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("DIFFLLM_CKPT", str(tiny_run[1]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's tiny matmuls: no thread contention
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    assert time.perf_counter() - start < 120

    outputs = {i: c.outputs for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    assert not [o for outs in outputs.values() for o in outs if o.output_type == "error"]
    text = "".join(o.get("text", "") for outs in outputs.values() for o in outs if o.output_type == "stream")
    assert str(tiny_run[1]) in text and "Kendall tau" in text and "\nanswer:" in text
    # the rendered trajectory: its first step (the 6-step tiny run may commit EOS first and fill
    # the rest at once, so the [MASK] glyph itself is only checked in test_trajectory)
    assert re.search(r"^\s*1/\d+ b0 \| ", text, flags=re.M)
    trajectory_cells = [c for c in nb.cells if "trajectory" in c.metadata.get("tags", [])]
    drawing = [c for c in trajectory_cells if "plots.plot_" in c.source]
    assert len(drawing) >= 3
    for cell in drawing:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source[:60]
    tables = [
        o.data["text/markdown"]
        for c in trajectory_cells
        for o in c.outputs
        if "text/markdown" in o.get("data", {})
    ]
    assert tables and all(f"| {s} |" in tables[0] for s in ("random", "low_confidence", "margin", "entropy"))


# ----------------------------------------------------------------------------------- plots logic


def make_trajectory(
    order: list[list[int]], length: int, filled: dict[int, list[int]] | None = None
) -> Trajectory:
    """A trajectory committing ``order[s]`` at step s (token = position + 10, confidence = 0.1 * s)."""
    canvas = [MASK] * length
    traj = Trajectory(prompt=[1, 2], mask_id=MASK)
    for s, positions in enumerate(order):
        fill = (filled or {}).get(s, [])
        for p in positions + fill:
            canvas[p] = p + 10
        traj.steps.append(TrajectoryStep(0, list(canvas), positions, [0.1 * s] * len(positions), fill))
    return traj


def test_kendall_tau_matches_torchmetrics_tau_b_with_ties():
    from torchmetrics.functional import kendall_rank_corrcoef

    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 4, 12).astype(float)  # many ties, as commit steps have
        y = rng.permutation(12).astype(float)
        expected = float(kendall_rank_corrcoef(torch.tensor(x), torch.tensor(y), variant="b"))
        assert kendall_tau(x, y) == pytest.approx(expected, abs=1e-6)
    assert kendall_tau([1, 2, 3], [1, 2, 3]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert np.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))


def test_order_tau_left_to_right_right_to_left_and_until_eos():
    assert order_tau(make_trajectory([[0], [1], [2], [3]], 4)) == 1.0
    assert order_tau(make_trajectory([[3], [2], [1], [0]], 4)) == -1.0
    # two positions per step: 4 concordant pairs, 2 tied in step -> tau_b = 4 / sqrt(6 * 4) < 1
    assert order_tau(make_trajectory([[0, 1], [2, 3]], 4)) == pytest.approx(4 / np.sqrt(24))
    # the tail after the first EOS (token 12 at position 2) committed first is excluded with until_eos
    traj = make_trajectory([[3], [2], [0], [1]], 4)
    assert order_tau(traj) < 0
    assert order_tau(traj, until_eos=12) == pytest.approx(kendall_tau([0, 1, 2], [2, 3, 1]))


def test_commit_grid_marks_each_position_once_with_its_confidence():
    traj = make_trajectory([[2], [0, 3], [1]], 5, filled={1: [4]})
    step, conf = commit_steps(traj)
    assert step.tolist() == [1, 2, 0, 1, 1]
    assert conf[:4].tolist() == pytest.approx([0.1, 0.2, 0.0, 0.1]) and np.isnan(conf[4])
    grid, known = commit_grid(traj)
    assert grid.shape == (3, 5)
    assert (
        np.isfinite(grid).sum(axis=0) == [1, 1, 1, 1, 0]
    ).all()  # the EOS-filled position has no confidence
    assert known[2].tolist() == [True, False, True, True, True] and not known[0].any()
    with pytest.raises(ValueError, match="never committed"):
        commit_steps(make_trajectory([[0]], 2))


def test_plots_return_figures_with_the_expected_artists(tmp_path):
    traj = make_trajectory([[0], [1, 2]], 3)  # steps (0, 1, 1): tau_b = 2 / sqrt(3 * 2)
    fig = plots.plot_commit_heatmap(traj)
    assert len(fig.axes[0].images) == 2 and "tau +0.82" in fig.axes[0].get_title()  # grid + confidence layer
    fig = plots.plot_strategies({"a": traj, "b": make_trajectory([[0], [1], [2]], 3)})
    assert [ax.get_title() for ax in fig.axes if ax.images] == ["a: tau +0.82", "b: tau +1.00"]
    r = {
        "length_buckets": [{"label": "1", "rows": 2, "nll_bound": 3.0, "ar_nll": 1.0, "gap": 2.0}],
        "unigram_ce": 4.0,
    }
    fig = plots.plot_nll_by_length(plots.nll_by_length_data(r))
    assert [len(c.patches) for c in fig.axes[0].containers] == [1, 1] and len(
        fig.axes[0].lines
    ) == 1  # 2 bars, unigram
    path = plots.save_figure(fig, tmp_path / "b.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    r = {"steps_grid": [{"steps": 2, "exact_match": 0.5, "rougeL": 0.7}], "diffusion_exact_match": 0.5}
    r.update(
        {"ar_base_exact_match": 0.9, "ar_base_rougeL": 1.0, "ar_sft_exact_match": 0.8, "ar_sft_rougeL": 0.9}
    )
    fig = plots.plot_quality_vs_steps(plots.quality_vs_steps_data(r))
    assert len(fig.axes[0].lines) == 6  # 2 diffusion lines, 2 per AR model


def test_resolve_checkpoint_prefers_the_argument_then_the_newest_run(tmp_path):
    old = tmp_path / "2024-01-01" / "10-00-00" / "checkpoints" / "last.ckpt"
    new = tmp_path / "2024-01-02" / "09-00-00" / "checkpoints" / "last.ckpt"
    for i, p in enumerate((new, old)):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"")
        os.utime(p, (1_000 + i, 1_000 + i))  # "old" folder written last: mtime decides, not the name
    assert notebook.resolve_checkpoint(None, tmp_path) == old
    assert notebook.resolve_checkpoint(new, tmp_path) == new
    with pytest.raises(FileNotFoundError, match="CKPT"):
        notebook.resolve_checkpoint(tmp_path / "nope.ckpt", tmp_path)


def test_the_bootstrap_trains_into_the_given_folder_or_a_temporary_one(tmp_path, monkeypatch):
    """Without a checkpoint the notebook trains a short run: into ``workdir``, else a new temporary
    folder, never under the outputs folder it searched."""
    runs = []
    monkeypatch.setattr(notebook, "train", lambda cfg: runs.append(cfg.output_dir))
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    given = notebook.resolve_checkpoint(None, outputs, workdir=tmp_path / "mine")
    assert given == tmp_path / "mine" / "checkpoints" / "last.ckpt" and runs[-1] == str(tmp_path / "mine")
    temporary = notebook.resolve_checkpoint(None, outputs)
    assert Path(runs[-1]).name.startswith("diffllm-notebook-") and temporary.parent.parent == Path(runs[-1])
    assert list(outputs.iterdir()) == []
    Path(runs[-1]).rmdir()
