"""The denoising trajectory of one generated answer.

For every step at which the row had a [MASK] left in its current block, a ``TrajectoryStep``
holds the answer canvas after the step (``gen_length`` token ids, [MASK] where still hidden),
the canvas positions committed at that step with their confidences, and the positions that
``fill_after_eos`` set to EOS at that step (no confidence: the model did not choose them).
Positions index the answer span: 0 is the first generated token.

Without remasking every answer position appears exactly once across ``committed + filled`` of
all steps, and the last step's canvas is the sampler's output canvas.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

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
        """answer position -> index of the step that committed (or filled) it."""
        out: dict[int, int] = {}
        for i, step in enumerate(self.steps):
            for pos in step.committed + step.filled:
                if pos in out:
                    raise ValueError(f"position {pos} committed twice (steps {out[pos]} and {i})")
                out[pos] = i
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
