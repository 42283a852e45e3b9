"""The browser app's page (Gradio, the optional ``app`` extra): ``serve`` loads a model and serves it.

A prompt box; the answer canvas as it denoises, streamed step by step from the sampler's
``on_step`` callback (the first frame all [MASK], every token coloured by the step that committed
it); the AR model's answer beside it (the base: adapters off, causal attention, KV cache) with both
timings; the sampler's settings as controls, built from ``SamplerConfig``'s fields (a new field
appears without a change here: a dropdown where its ``FIELD_RANGES`` entry lists the values, else a
box of its type); the trajectory as a JSON download (``trajectories_to_json``). ``delay`` seconds
per step make the stream easy to follow (the timings leave it out).

Gradio is the optional ``app`` extra (``pip install -e '.[app]'``). Offline: analytics off
(``GRADIO_ANALYTICS_ENABLED=False``, Hugging Face telemetry off), system fonts only (no web
fonts), no share link, no server-side rendering, no MCP server; the page loads nothing but from
the app's own address (``tests/test_app.py`` watches its network requests in headless Chromium).
"""

from __future__ import annotations

import os

# before gradio is imported: no usage statistics, no version check, no telemetry from the hub client
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import dataclasses
import tempfile
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffllm.data.reader import parse_file
from diffllm.diffusion.sampler import FIELD_RANGES, SamplerConfig
from diffllm.diffusion.trajectory import StepFrame, trajectories_to_json
from diffllm.inference.generation import load_checked
from diffllm.inference.inputs import InputError
from diffllm.inference.live import LiveCanvas, canvas_html, scale_steps
from diffllm.inference.loading import InferenceModel, ar_baseline_model, newest_checkpoint
from diffllm.inference.stream import ar_answer, stream_answer

try:  # the optional `app` extra
    import gradio as gr
except ImportError:  # pragma: no cover - exercised without the extra
    gr = None

# shown first (the rest under "more settings"), in this order where they exist
PRIMARY = ("strategy", "steps", "threshold", "block_length", "cache", "mode")
HELP = {
    "gen_length": "answer positions G",
    "steps": "denoising steps in all (empty = gen_length); schedule mode",
    "block_length": "semi-autoregressive block size (empty = one block); divides gen_length",
    "strategy": "how a masked position's confidence is scored",
    "temperature": "0 = greedy",
    "threshold": "commit every position above τ (empty = the schedule); needs steps empty",
    "cache": "KV cache: prefix / dual (full attention), block (block models)",
    "cfg_scale": "classifier-free guidance (0 = off)",
    "eos_penalty": "subtracted from the confidence of EOS proposals",
    "stop_early": "skip a block's remaining steps once it is full",
    "fill_after_eos": "every [MASK] after a committed EOS becomes EOS",
    "future_blocks": "what a block sees of the later ones",
    "remask": "hide a committed token of the block again when its probability drops below remask_bound",
    "remask_steps": "steps a block may take beyond what it needs without remasking",
}

CSS = """
#dl-live .dl-canvas {font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 15px;}
#dl-live .dl-head {font-size: 13px; opacity: .75; margin-bottom: 8px;}
#dl-live .dl-tokens {display: flex; flex-wrap: wrap; gap: 4px; line-height: 1.7;}
#dl-live .dl-tok {padding: 1px 6px; border-radius: 5px; white-space: pre;}
#dl-live .dl-mask {background: #e5e7eb; color: #6b7280;}
#dl-live .dl-new {box-shadow: 0 0 0 2px #f97316;}
#dl-live .dl-pad {opacity: .45;}
#dl-live .dl-legend {display: block; font-size: 12px; opacity: .75; margin-top: 10px;}
#dl-live .dl-ramp {display: inline-block; width: 90px; height: 10px; border-radius: 3px; vertical-align: middle;}
"""
# system fonts only: the default theme's fonts would be fetched by the page
FONTS = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]


# ----------------------------------------------------------------------------------- the controls


@dataclasses.dataclass(frozen=True)
class Control:
    """One sampler field as a form control: its name, its Python type, and whether null is allowed."""

    name: str
    kind: type  # bool | int | float | str
    optional: bool
    choices: tuple[str, ...] | None = None


def field_choices(name: str) -> tuple[str, ...] | None:
    """The values of a sampler field with a fixed set: its ``FIELD_RANGES`` words split at " | "
    (``"none | prefix | dual | block"``) when every part passes the field's own test; else None."""
    if name not in FIELD_RANGES:
        return None
    ok, valid = FIELD_RANGES[name]
    parts = tuple(valid.split(" | "))
    return parts if len(parts) > 1 and all(ok(p) for p in parts) else None


def sampler_controls() -> list[Control]:
    """A control per ``SamplerConfig`` field, the ``PRIMARY`` ones first (from the dataclass: a new
    field needs no change here)."""
    hints = typing.get_type_hints(SamplerConfig)
    out = []
    for f in dataclasses.fields(SamplerConfig):
        args = typing.get_args(hints[f.name]) or (hints[f.name],)
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) != 1 or kinds[0] not in (bool, int, float, str):
            continue  # nothing a form can hold (none today)
        out.append(Control(f.name, kinds[0], type(None) in args, field_choices(f.name)))
    rank = {name: i for i, name in enumerate(PRIMARY)}
    return sorted(out, key=lambda c: rank.get(c.name, len(PRIMARY)))


def read_controls(controls: list[Control], values: list[Any], config: SamplerConfig) -> dict[str, Any]:
    """The form's values -> sampler overrides (the fields that differ from ``config``); an empty box
    is null. Raises ``InputError`` naming the field for a value of the wrong type."""
    overrides = {}
    for control, value in zip(controls, values):
        if isinstance(value, str) and control.kind is not str:
            value = value.strip() or None
        if value is None or value == "":
            if not control.optional:
                raise InputError(f"sampler.{control.name} is empty; it needs a {control.kind.__name__}")
            value = None
        elif control.kind in (int, float):
            try:
                number = float(value)
            except ValueError:
                raise InputError(f"sampler.{control.name}={value!r} is not a number") from None
            if control.kind is int and number != int(number):
                raise InputError(f"sampler.{control.name}={value} is not a whole number")
            value = int(number) if control.kind is int else number
        elif control.kind is bool:
            value = bool(value)
        if value != getattr(config, control.name):
            overrides[control.name] = value
    return overrides


def _component(control: Control, value: Any) -> Any:
    info = HELP.get(control.name)
    if info is None and control.choices is None and control.name in FIELD_RANGES:
        info = FIELD_RANGES[control.name][1]  # a field without its own help: its valid values
    if control.optional and control.kind is not str:
        info = f"{info}; empty = null" if info else "empty = null"
    common = {"label": control.name, "info": info, "elem_id": f"dl-sampler-{control.name}"}
    if control.kind is bool:
        return gr.Checkbox(value=value, **common)
    if control.choices is not None:
        return gr.Dropdown(choices=list(control.choices), value=value, **common)
    if control.kind is str or control.optional:  # a number box cannot be empty (it sends 0): text
        return gr.Textbox(value="" if value is None else str(value), max_lines=1, **common)
    return gr.Number(value=value, precision=0 if control.kind is int else None, **common)


# ----------------------------------------------------------------------------------- the page


def _timings(row: dict[str, Any], ar: dict[str, Any] | None) -> str:
    """Both models' wall time and forward passes, one line each (Markdown)."""
    steps = len(row["trajectory"].steps)
    lines = [f"**diffusion** {row['seconds']:.3f} s · {row['nfe']} forward passes · {steps} steps"]
    if ar is not None:
        lines.append(f"**AR (base)** {ar['seconds']:.3f} s · {ar['nfe']} forward passes")
    lines.append("<small>the models' own time: the per-step delay is left out</small>")
    return "  \n".join(lines)


def build_app(
    model: InferenceModel,
    ar_model: Any = None,
    *,
    sampler: Mapping[str, Any] | None = None,
    delay: float = 0.0,
    seed: int = 0,
    examples: list[list[str]] | None = None,
    prompt_overflow: str = "error",
) -> Any:
    """The page (``gr.Blocks``) for ``model``. ``ar_model``: the AR base (``ar_baseline_model``;
    None hides the AR column); ``sampler``: the controls' first values on top of the model's sampler."""
    if gr is None:
        raise InputError("the app needs Gradio, the `app` extra: pip install -e '.[app]'")
    start = model.sampler_config.with_overrides(sampler)
    controls = sampler_controls()
    out_dir = Path(tempfile.mkdtemp(prefix="diffllm-app-"))
    tok = model.tokenizer
    mask_id = int(model.dlm.mask_id)

    def answer(instruction: str, input_text: str, delay_s: float, seed_v: float, run_ar: bool, *values: Any):
        try:
            overrides = read_controls(controls, list(values), model.sampler_config)
            config = model.sampler_config.with_overrides(overrides)
        except (InputError, ValueError) as err:
            raise gr.Error(str(err)) from None
        if not (instruction or "").strip():
            raise gr.Error("write an instruction first")
        canvas = LiveCanvas(
            lambda t: tok.decode([t]), mask_id, config.gen_length, model.eos_id, scale_steps(config)
        )
        row = None
        stream = stream_answer(
            model,
            instruction.strip(),
            (input_text or "").strip(),
            overrides,
            seed=int(seed_v or 0),
            delay=max(float(delay_s or 0.0), 0.0),
            prompt_overflow=prompt_overflow,
        )
        try:
            for item in stream:
                if isinstance(item, StepFrame):
                    canvas.update(item.index, item.rows[0])
                    if item.index == 0:  # a new answer: the last one's results cleared
                        yield canvas_html(canvas), "", "", "", gr.File(value=None, visible=False)
                    else:
                        yield canvas_html(canvas), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                else:
                    row = item
        except InputError as err:
            raise gr.Error(str(err)) from None
        handle, name = tempfile.mkstemp(prefix="trajectory-", suffix=".json", dir=out_dir)
        with os.fdopen(handle, "w") as file:
            file.write(trajectories_to_json([row["trajectory"]], indent=1))
        ar_on = bool(run_ar) and ar_model is not None
        waiting = "…" if ar_on else ""
        yield (
            canvas_html(canvas),
            row["answer"],
            waiting,
            _timings(row, None),
            gr.File(value=name, visible=True),
        )
        if ar_on:
            ar = ar_answer(model, ar_model, row["trajectory"].prompt, config, int(seed_v or 0))
            yield gr.skip(), gr.skip(), ar["answer"], _timings(row, ar), gr.skip()

    empty = LiveCanvas(lambda t: "", mask_id, start.gen_length, model.eos_id, scale_steps(start))
    with gr.Blocks(title="diffllm: watch it denoise", analytics_enabled=False) as demo:
        gr.Markdown(
            f"### diffllm: watch a diffusion LLM denoise its answer\n"
            f"model: `{model.source}` · prompt template: `{model.template}` · "
            f"[MASK] id {mask_id}"
        )
        with gr.Row():
            instruction = gr.Textbox(label="instruction", lines=2, scale=3, elem_id="dl-instruction")
            input_box = gr.Textbox(label="input (optional)", lines=2, scale=2, elem_id="dl-input")
        go = gr.Button("Generate", variant="primary", elem_id="dl-go")
        with gr.Row():
            with gr.Column(scale=3):
                live = gr.HTML(canvas_html(empty), elem_id="dl-live", label="answer canvas")
                diffusion = gr.Textbox(label="diffusion answer", interactive=False, elem_id="dl-answer")
            with gr.Column(scale=2):
                ar_box = gr.Textbox(
                    label="AR base answer (adapters off, causal, KV cache)",
                    interactive=False,
                    elem_id="dl-ar-answer",
                    visible=ar_model is not None,
                )
                timings = gr.Markdown(elem_id="dl-timings")
                trajectory = gr.File(
                    label="trajectory (JSON)", interactive=False, visible=False, elem_id="dl-trajectory"
                )
        with gr.Accordion("sampler settings", open=True):
            primary = [c for c in controls if c.name in PRIMARY]
            rest = [c for c in controls if c.name not in PRIMARY]
            with gr.Row():
                components = [_component(c, getattr(start, c.name)) for c in primary]
            with gr.Accordion("more settings", open=False), gr.Row():
                components += [_component(c, getattr(start, c.name)) for c in rest]
            with gr.Row():
                delay_box = gr.Slider(
                    0.0, 2.0, value=delay, step=0.05, label="delay per step (s)", elem_id="dl-delay"
                )
                seed_box = gr.Number(value=seed, precision=0, label="seed", elem_id="dl-seed")
                ar_check = gr.Checkbox(
                    value=ar_model is not None, label="AR answer too", visible=ar_model is not None
                )
        if examples:
            gr.Examples(examples, [instruction, input_box], label="validation prompts")
        inputs = [instruction, input_box, delay_box, seed_box, ar_check, *components]
        outputs = [live, diffusion, ar_box, timings, trajectory]
        # the canvas is the progress: no spinner or pending outline over the outputs
        go.click(answer, inputs, outputs, show_progress="hidden")
        instruction.submit(answer, inputs, outputs, show_progress="hidden")
    return demo


def launch(demo: Any, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> str:
    """Serve ``demo`` offline (no share link, no SSR, no MCP, system fonts); returns its local URL."""
    theme = gr.themes.Default(font=FONTS, font_mono=MONO_FONTS)
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        share=False,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        quiet=True,
        show_error=True,
        theme=theme,
        css=CSS,
    )
    if block:
        print(f"# serving on {url} (Ctrl+C stops it)", flush=True)
        demo.block_thread()
    return url


def validation_examples(model: InferenceModel, limit: int = 6) -> list[list[str]]:
    """[instruction, input] of the run's validation rows (``data.val_path``), one per task where the
    rows name one (the tiny set's copy, reverse, sort ...); none when the file is not at hand."""
    path = (model.cfg.get("data") or {}).get("val_path")
    if not path or not Path(str(path)).is_file():
        return []
    try:
        rows, _ = parse_file(str(path))
    except (OSError, ValueError):
        return []
    out, tasks = [], set()
    for row in rows:
        task = row.get("task")
        if task is not None and task in tasks:
            continue
        tasks.add(task)
        out.append([row["instruction"], row.get("input") or ""])
        if len(out) == limit:
            break
    return out


def resolve_checkpoint(ckpt_path: str | Path | None, outputs_dir: str | Path = "outputs") -> Path:
    """``ckpt_path``, or the newest diffusion run under ``outputs_dir`` (``newest_checkpoint``)."""
    if ckpt_path is not None:
        path = Path(str(ckpt_path))
        if not path.exists():
            raise InputError(
                f"ckpt_path={str(path)!r} does not exist; pass a .ckpt from a run folder or a folder "
                "written by diffllm.export (or no ckpt_path: the newest run under outputs/)"
            )
        return path
    outputs = Path(str(outputs_dir or "outputs"))
    found = newest_checkpoint(outputs) if outputs.is_dir() else None
    if found is None:
        raise InputError(
            f"no ckpt_path and no run checkpoint under {str(outputs)!r}; run `make train` first, or pass "
            "ckpt_path=outputs/<date>/<time>/diffusion/checkpoints/last.ckpt or an exported folder"
        )
    return found


def serve(
    ckpt_path: str | Path | None = None,
    *,
    outputs_dir: str | Path = "outputs",
    sampler: Mapping[str, Any] | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    host: str = "127.0.0.1",
    port: int | None = None,
    delay: float = 0.0,
    seed: int = 0,
    ar: bool = True,
    prompt_overflow: str = "error",
    block: bool = True,
) -> tuple[Any, str]:
    """``python -m diffllm.app``'s library call: find the checkpoint (``resolve_checkpoint``, printed),
    load it (``load_checked``), build the page and serve it; returns (the page, its URL). With
    ``block`` it serves until Ctrl+C. Bad input is one ``InputError`` line, raised before loading."""
    if gr is None:
        raise InputError("the app needs Gradio, the `app` extra: pip install -e '.[app]'")
    if delay < 0:
        raise InputError(f"delay={delay}; pass seconds >= 0")
    ckpt = resolve_checkpoint(ckpt_path, outputs_dir)
    print(f"# checkpoint: {ckpt}" + ("" if ckpt_path is not None else " (the newest run)"), flush=True)
    overrides = dict(sampler or {})
    model, _ = load_checked(ckpt, overrides, device=device, trust_remote_code=trust_remote_code)
    ar_model = ar_baseline_model(model, device) if ar else None
    demo = build_app(
        model,
        ar_model,
        sampler=overrides,
        delay=delay,
        seed=seed,
        examples=validation_examples(model),
        prompt_overflow=prompt_overflow,
    )
    return demo, launch(demo, host, port, block=block)
