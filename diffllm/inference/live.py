"""Watching an answer denoise: the frames of ``generate(..., on_step=fn)`` as a live canvas.

One view, two front ends. ``LiveCanvas`` folds the frames (``StepFrame``) of one answer into
cells: each answer position's token, its text, and the step that committed it (None while it is
[MASK]). ``canvas_html`` renders it for the browser app (``python -m diffllm.app``,
``diffllm.inference.webapp``); ``canvas_text`` for the terminal, where ``LiveTerminal`` redraws a rich
``Live`` display at every step (``python -m diffllm.generate ... live=true``).

A token's colour is the step s that committed it, on a viridis scale from dark violet (step 1)
to yellow (step S): S is the sampler's step budget in schedule mode (``steps``), and with a
threshold (data-dependent, at most ``gen_length`` steps) the latest step shown, so the newest
commits are always the yellow ones. Tokens committed at the step on screen are outlined (underlined
in the terminal); the EOS padding after the answer's first EOS is faded.
(``diffllm.inference.stream`` feeds the browser app from a worker thread.)
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from diffllm.diffusion.sampler import SamplerConfig
from diffllm.diffusion.trajectory import MASK_GLYPH, StepFrame, Trajectory, TrajectoryStep
from diffllm.inference.loading import InferenceModel

MASK_TEXT = "[MASK]"

# viridis at 0, 1/8, ..., 1 (matplotlib's table, rounded): early steps dark, late ones bright
_VIRIDIS = [
    (68, 1, 84),
    (71, 44, 122),
    (59, 81, 139),
    (44, 113, 142),
    (33, 144, 141),
    (39, 173, 129),
    (92, 200, 99),
    (170, 220, 50),
    (253, 231, 37),
]


def step_colour(step: int, scale: int) -> tuple[int, int, int]:
    """The (r, g, b) of commit step ``step`` (1-based) on a scale of ``scale`` steps: viridis at
    t = (step - 1) / (scale - 1), clipped to [0, 1] (t = 0 when scale is 1)."""
    t = min(max((step - 1) / (scale - 1), 0.0), 1.0) if scale > 1 else 0.0
    x = t * (len(_VIRIDIS) - 1)
    i = min(int(x), len(_VIRIDIS) - 2)
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return tuple(round(u + (x - i) * (v - u)) for u, v in zip(a, b))  # type: ignore[return-value]


def text_colour(rgb: tuple[int, int, int]) -> str:
    """Black on a light background, white on a dark one (relative luminance > 0.5)."""
    r, g, b = rgb
    return "#000000" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 127.5 else "#ffffff"


def scale_steps(config: SamplerConfig) -> int | None:
    """The colour scale's length: the schedule's step budget, or None with a threshold (the latest step)."""
    return config.resolved_steps if config.threshold is None else None


@dataclass
class Cell:
    """One answer position as shown: its token, the text, and when it was committed."""

    position: int
    token_id: int
    text: str  # the decoded token, or MASK_TEXT while masked
    step: int | None  # the frame index that committed it; None while masked
    confidence: float | None  # the strategy's confidence at that commit (None for EOS fill)
    new: bool  # committed by the frame on screen
    after_eos: bool  # EOS padding: after the answer's first EOS


class LiveCanvas:
    """One answer's canvas as it denoises: ``update`` it with every frame's row, read ``cells``.

    ``decode(id)`` gives a token's text; ``scale`` the colour scale's length (``scale_steps``).
    """

    def __init__(
        self,
        decode: Callable[[int], str],
        mask_id: int,
        gen_length: int,
        eos_id: int | None = None,
        scale: int | None = None,
    ) -> None:
        self.decode, self.mask_id, self.eos_id, self.scale_steps = decode, mask_id, eos_id, scale
        self.canvas = [mask_id] * gen_length  # (G,) token ids on screen
        self.commit_step: dict[int, int] = {}  # position -> frame index of its commit
        self.confidence: dict[int, float] = {}
        self.frame = 0  # index of the frame on screen
        self.block = 0
        self.new: set[int] = set()

    def update(self, index: int, step: TrajectoryStep | None) -> None:
        """Show frame ``index``; ``step`` is this row's record of it (None: the row took no part)."""
        self.frame = index
        if step is None:
            self.new = set()
            return
        self.canvas, self.block = list(step.canvas), step.block
        self.new = set(step.committed) | set(step.filled)
        for pos, c in zip(step.committed, step.confidences):
            self.commit_step[pos], self.confidence[pos] = index, c
        for pos in step.filled:
            self.commit_step[pos] = index
            self.confidence.pop(pos, None)
        for pos, token in enumerate(self.canvas):  # a remasked position is [MASK] again
            if token == self.mask_id:
                self.commit_step.pop(pos, None)
                self.confidence.pop(pos, None)

    @property
    def scale(self) -> int:
        return self.scale_steps or max(self.frame, 1)

    @property
    def committed(self) -> int:
        return sum(token != self.mask_id for token in self.canvas)

    def cells(self) -> list[Cell]:
        eos_at = self.canvas.index(self.eos_id) if self.eos_id in self.canvas else len(self.canvas)
        out = []
        for pos, token in enumerate(self.canvas):
            masked = token == self.mask_id
            out.append(
                Cell(
                    position=pos,
                    token_id=token,
                    text=MASK_TEXT if masked else _shown(self.decode(token)),
                    step=None if masked else self.commit_step.get(pos),
                    confidence=None if masked else self.confidence.get(pos),
                    new=pos in self.new,
                    after_eos=pos > eos_at,
                )
            )
        return out

    def header(self) -> str:
        budget = f"/{self.scale_steps}" if self.scale_steps else ""
        return (
            f"step {self.frame}{budget} · block {self.block} · "
            f"{self.committed}/{len(self.canvas)} positions committed"
        )


def _shown(text: str) -> str:
    return text.replace("\n", "⏎").replace("\t", "⇥") or "∅"


def frames_of(trajectory: Trajectory, gen_length: int | None = None) -> list[StepFrame]:
    """The frames ``generate(on_step=...)`` hands over for one row, rebuilt from its trajectory: the
    all-[MASK] start, then one per recorded step (a replay for a sampler mode without the callback)."""
    length = gen_length if gen_length is not None else len(trajectory.final_canvas)
    start = TrajectoryStep(block=0, canvas=[trajectory.mask_id] * length, committed=[], confidences=[])
    return [StepFrame(0, [start])] + [StepFrame(i + 1, [s]) for i, s in enumerate(trajectory.steps)]


# ----------------------------------------------------------------------------------- the browser view


def canvas_html(canvas: LiveCanvas) -> str:
    """The canvas as HTML (the app's live panel; styles in ``diffllm.inference.webapp.CSS``).

    The outer ``div.dl-canvas`` carries ``data-frame`` (the frame index) and ``data-ids`` (the
    canvas's token ids, comma-separated), so a page script can record exactly what was shown.
    """
    spans = []
    for cell in canvas.cells():
        classes = ["dl-tok"]
        style = ""
        if cell.step is None:
            classes.append("dl-mask")
            title = f"position {cell.position}: still [MASK]"
        else:
            rgb = step_colour(cell.step, canvas.scale)
            style = f' style="background:rgb{rgb};color:{text_colour(rgb)}"'
            conf = "EOS fill" if cell.confidence is None else f"confidence {cell.confidence:.3f}"
            title = f"position {cell.position}: committed at step {cell.step} ({conf})"
        if cell.new:
            classes.append("dl-new")
        if cell.after_eos:
            classes.append("dl-pad")
        spans.append(
            f'<span class="{" ".join(classes)}" data-step="{cell.step if cell.step is not None else ""}"'
            f'{style} title="{html.escape(title)}">{html.escape(cell.text)}</span>'
        )
    ids = ",".join(str(t) for t in canvas.canvas)
    ramp = ", ".join(f"rgb{rgb}" for rgb in _VIRIDIS)
    legend = (
        f'<span class="dl-legend">colour = the step that committed the token: 1 <span class="dl-ramp" '
        f'style="background:linear-gradient(90deg, {ramp})"></span> {canvas.scale}'
        " · outlined: committed at this step · faded: padding after the first EOS</span>"
    )
    return (
        f'<div class="dl-canvas" data-frame="{canvas.frame}" data-ids="{ids}">'
        f'<div class="dl-head">{html.escape(canvas.header())}</div>'
        f'<div class="dl-tokens">{"".join(spans)}</div>{legend}</div>'
    )


# ----------------------------------------------------------------------------------- the terminal view


def canvas_text(canvas: LiveCanvas) -> Text:
    """The canvas as rich ``Text``: a header line, then the tokens (``░`` for [MASK]) on their colours."""
    text = Text(canvas.header() + "\n", style="bold")
    for i, cell in enumerate(canvas.cells()):
        if i:
            text.append(" ")
        if cell.step is None:
            text.append(MASK_GLYPH, style="grey50")
            continue
        rgb = step_colour(cell.step, canvas.scale)
        style = f"{text_colour(rgb)} on rgb({rgb[0]},{rgb[1]},{rgb[2]})"
        if cell.new:
            style += " underline"
        if cell.after_eos:
            style += " dim"
        text.append(cell.text, style=style)
    return text


class LiveTerminal:
    """The terminal view of ``generate answers``: one canvas per prompt, redrawn at every step.

    Use as a context manager and pass ``on_step`` to ``generate_answers``; ``delay`` seconds are
    slept after each redraw. On a console that is not a terminal rich prints only the last view.
    """

    def __init__(
        self,
        model: InferenceModel,
        config: SamplerConfig,
        labels: list[str],
        console: Console | None = None,
        delay: float = 0.0,
    ) -> None:
        tok = model.tokenizer
        decode = lambda token: tok.decode([token])  # noqa: E731
        mask_id = int(model.dlm.mask_id)
        self.labels = labels
        self.canvases = [
            LiveCanvas(decode, mask_id, config.gen_length, model.eos_id, scale_steps(config)) for _ in labels
        ]
        self.console = console or Console()
        self.delay = delay
        self.live: Live | None = None

    def render(self) -> Group:
        parts = []
        for label, canvas in zip(self.labels, self.canvases):
            parts += [Text(label, style="bold cyan"), canvas_text(canvas)]
        return Group(*parts)

    def on_step(self, frame: StepFrame) -> None:
        for r, step in enumerate(frame.rows):
            self.canvases[frame.first_row + r].update(frame.index, step)
        if self.live is not None:
            self.live.update(self.render(), refresh=True)
        if self.delay:
            time.sleep(self.delay)

    def __enter__(self) -> LiveTerminal:
        self.live = Live(self.render(), console=self.console, auto_refresh=False, transient=False)
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
