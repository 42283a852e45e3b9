"""The denoising-trajectory notebook's helpers (``notebooks/denoising_trajectories.ipynb``).

Sampling with a recorded trajectory, every strategy side by side, their table, and the bootstrap
that finds or trains a checkpoint. The statistics are in ``diffllm.diffusion.trajectory``, the
plots in ``diffllm.evaluation.plots``. This module imports the training entry point (``diffllm.training.run.train``)
for the bootstrap; no other module imports this one.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffllm.config.resolvers import compose
from diffllm.diffusion.sampler import generate
from diffllm.diffusion.strategies import STRATEGIES
from diffllm.diffusion.trajectory import Trajectory, answer_text, order_tau
from diffllm.inference.loading import newest_checkpoint
from diffllm.training.run import train


def trajectories(model: Any, prompt_ids: Sequence[list[int]], config: Any, seed: int = 0) -> list[Trajectory]:
    """Sample answers for ``prompt_ids`` with ``config`` (a SamplerConfig), recording every step.

    ``model`` is an ``InferenceModel`` (``diffllm.inference.loading.load_for_inference``).
    """
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


# The notebook's fallback when no checkpoint is given: ~30 s on 2 CPU cores, enough to see an order emerge.
NOTEBOOK_RUN = [
    "trainer.max_steps=100",
    "trainer.val_every_n_steps=100",
    "trainer.enable_progress_bar=false",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "data.limit_val_rows=16",
    "data.num_sample_prompts=2",
    "report.enabled=false",
]


def latest_checkpoint(outputs: str | Path) -> Path | None:
    """The newest diffusion run checkpoint under ``outputs`` (``loading.newest_checkpoint``), or None."""
    return newest_checkpoint(outputs)


def resolve_checkpoint(
    ckpt: str | Path | None,
    outputs: str | Path | None = None,
    workdir: str | Path | None = None,
    overrides: Sequence[str] = NOTEBOOK_RUN,
) -> Path:
    """``ckpt`` if given; else the newest run checkpoint under ``outputs`` (read only); else train a
    short run of the embedded default (``overrides``) into ``workdir``, or a new temporary folder
    when None, and return its checkpoint. Nothing is ever written under ``outputs``.
    """
    if ckpt:
        path = Path(ckpt)
        if not path.exists():
            raise FileNotFoundError(
                f"CKPT={str(path)!r} does not exist; set CKPT = None to use the newest run"
            )
        return path
    found = latest_checkpoint(outputs) if outputs is not None else None
    if found is not None:
        return found
    out = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="diffllm-notebook-"))
    train(compose([*overrides, f"output_dir={out}"]))
    return out / "checkpoints" / "last.ckpt"
