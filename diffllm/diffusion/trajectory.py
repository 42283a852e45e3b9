"""The denoising trajectory of one generated answer.

For every step at which the row had a [MASK] left in its current block, a ``TrajectoryStep``
holds the answer canvas after the step (``gen_length`` token ids, [MASK] where still hidden),
the canvas positions committed at that step with their confidences, and the positions that
``fill_after_eos`` set to EOS at that step (no confidence: the model did not choose them).
Positions index the answer span: 0 is the first generated token.

Without remasking every answer position appears exactly once across ``committed + filled`` of
all steps, and the last step's canvas is the sampler's output canvas. With remasking
(``sampler.remask``) a step also lists the positions it hid again (``remasked``); such a position is
committed again at a later step of its block, and its last commit is the one that counts.

Statistics of a trajectory (step s commits some answer positions p with a confidence c):
``commit_steps`` gives, per position, the step and confidence of its commit; ``commit_grid`` lays
them out as a (steps x positions) matrix (the heatmap of ``diffllm.evaluation.plots``); ``order_tau`` is
Kendall's tau-b between position and commit step: +1 when the answer is unmasked strictly left to
right (an AR order), about 0 for an order unrelated to position, -1 right to left.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

MASK_GLYPH = "░"


class _Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


@dataclass
class TrajectoryStep:
    """One denoising step of one row."""

    block: int  # index of the block this step worked on
    canvas: list[int]  # (gen_length,) answer ids after the step
    committed: list[int]  # answer positions unmasked by the strategy at this step
    confidences: list[float]  # their confidences, same order
    filled: list[int] = field(default_factory=list)  # positions set to EOS by fill_after_eos
    remasked: list[int] = field(default_factory=list)  # positions hidden again (sampler.remask)


@dataclass
class StepFrame:
    """What ``generate(..., on_step=fn)`` hands to ``fn``: once before the first step, then after each.

    ``index`` 0 is the start: every row's canvas all [MASK], nothing committed, block 0. Index s >= 1
    follows the s-th denoising step of the batch, and ``rows[r]`` is exactly the ``TrajectoryStep``
    that row r's trajectory records for it (the same object), or None where row r took no part in
    that step (its current block was already full). ``first_row``: the batch's first row among the
    caller's prompts (``generate_answers`` decodes in batches).
    """

    index: int
    rows: list[TrajectoryStep | None]
    first_row: int = 0


@dataclass
class Trajectory:
    """All steps of one row, with what is needed to read them back."""

    prompt: list[int]
    mask_id: int
    steps: list[TrajectoryStep] = field(default_factory=list)

    @property
    def final_canvas(self) -> list[int]:
        if not self.steps:
            raise ValueError("empty trajectory: the sampler recorded no step for this row")
        return self.steps[-1].canvas

    def commit_step(self) -> dict[int, int]:
        """answer position -> index of the step that last committed (or filled) it.

        Raises if a position is committed twice without being hidden again (``remasked``) between.
        """
        out: dict[int, int] = {}
        for i, step in enumerate(self.steps):
            for pos in step.committed + step.filled:
                if pos in out:
                    raise ValueError(f"position {pos} committed twice (steps {out[pos]} and {i})")
                out[pos] = i
            for pos in step.remasked:
                del out[pos]
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trajectory:
        steps = [TrajectoryStep(**s) for s in data["steps"]]
        return cls(prompt=list(data["prompt"]), mask_id=int(data["mask_id"]), steps=steps)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Trajectory:
        return cls.from_dict(json.loads(text))

    def render(self, tokenizer: _Decoder | None = None, width: int | None = None) -> str:
        """One line per step: the answer canvas with ``░`` for every still-hidden position.

        Tokens committed at that step are wrapped in ``[...]`` so the eye follows the unmasking;
        with no tokenizer the raw ids are shown. ``width`` truncates long lines.
        """

        def show(token: int) -> str:
            if tokenizer is None:
                return str(token)
            text = tokenizer.decode([token])
            return text.replace("\n", "\\n") or "∅"

        n = len(self.steps)
        lines = []
        for i, step in enumerate(self.steps):
            new = set(step.committed) | set(step.filled)
            pieces = []
            for pos, token in enumerate(step.canvas):
                if token == self.mask_id:
                    pieces.append(MASK_GLYPH)
                elif pos in new:
                    pieces.append(f"[{show(token)}]")
                else:
                    pieces.append(show(token))
            line = f"{i + 1:>{len(str(n))}}/{n} b{step.block} | " + " ".join(pieces)
            if width is not None and len(line) > width:
                line = line[: max(width - 1, 0)] + "…"
            lines.append(line)
        return "\n".join(lines)


def trajectories_to_json(trajectories: list[Trajectory], **kwargs: Any) -> str:
    """A JSON list of trajectories (one per row)."""
    return json.dumps([t.to_dict() for t in trajectories], **kwargs)


def trajectories_from_json(text: str) -> list[Trajectory]:
    return [Trajectory.from_dict(d) for d in json.loads(text)]


# ----------------------------------------------------------------------------- statistics


def commit_steps(traj: Trajectory) -> tuple[np.ndarray, np.ndarray]:
    """(G,) index of the step that (last) committed each answer position, (G,) its confidence.

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


def answer_text(traj: Trajectory, tokenizer: Any, eos_id: int) -> str:
    """The decoded final answer of a trajectory (up to the first ``eos_id``, special tokens skipped).

    ``eos_id``: the run's end-of-answer id (``InferenceModel.eos_id``).
    """
    ids = traj.final_canvas
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
