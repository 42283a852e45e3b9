"""The browser app's feed: one answer streamed step by step from a worker thread, and the AR answer.

``stream_answer`` runs the sampler (``generate_answers``) in a worker thread and yields its frames
(``StepFrame``) as they come, then the answer row with its time (the time spent in the callback, a
per-step ``delay`` included, left out); ``ar_answer`` is the AR model's answer to the same prompt
ids, timed the same way.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from diffllm.diffusion.sampler import SamplerConfig
from diffllm.diffusion.trajectory import StepFrame
from diffllm.evaluation.scoring import ar_answers
from diffllm.inference.generation import generate_answers
from diffllm.inference.live import frames_of
from diffllm.inference.loading import InferenceModel


class StopStream(Exception):
    """Raised inside the sampler's callback when the viewer went away (the stream was closed)."""


def stream_answer(
    model: InferenceModel,
    instruction: str,
    input: str = "",
    sampler_overrides: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    delay: float = 0.0,
    prompt_overflow: str = "error",
) -> Iterator[StepFrame | dict[str, Any]]:
    """Answer one instruction, yielding every ``StepFrame`` as the sampler hands it over, then the
    answer row of ``generate_answers`` (trajectory included) with ``seconds``: the sampler's wall
    time without the time spent in the callback (the per-step ``delay`` sleeps there).

    The sampler runs in a worker thread; closing the iterator stops it at its next step. Errors
    (an ``InputError`` for bad settings) are raised here. A sampler mode that calls no ``on_step``
    gets its frames replayed from the trajectory (``frames_of``) once it is done.
    """
    frames: queue.Queue = queue.Queue()
    stop = threading.Event()
    in_callback = [0.0]

    def on_step(frame: StepFrame) -> None:
        entered = time.perf_counter()
        if stop.is_set():
            raise StopStream
        frames.put(("frame", frame))
        if delay:
            time.sleep(delay)
        in_callback[0] += time.perf_counter() - entered

    def work() -> None:
        try:
            began = time.perf_counter()
            rows = generate_answers(
                model,
                [instruction],
                [input],
                sampler_overrides=sampler_overrides,
                seed=seed,
                trajectory=True,
                prompt_overflow=prompt_overflow,
                on_step=on_step,
            )
            row = dict(rows[0], seconds=time.perf_counter() - began - in_callback[0])
            frames.put(("done", row))
        except BaseException as err:  # handed to the reader, raised there
            frames.put(("error", err))

    worker = threading.Thread(target=work, name="diffllm-sampler", daemon=True)
    worker.start()
    seen = 0
    try:
        while True:
            kind, item = frames.get()
            if kind == "error":
                raise item
            if kind == "frame":
                seen += 1
                yield item
                continue
            if not seen:  # a mode without the callback: replay its trajectory
                for frame in frames_of(item["trajectory"]):
                    yield frame
                    if delay:
                        time.sleep(delay)
            yield item
            return
    finally:
        stop.set()


def ar_answer(
    model: InferenceModel,
    ar_model: nn.Module,
    prompt_ids: list[int],
    config: SamplerConfig,
    seed: int = 0,
) -> dict[str, Any]:
    """The AR model's answer to ``prompt_ids`` (``scoring.ar_answers``: adapters off, causal, KV cache;
    the sampler's temperature / top-k / top-p, at most ``gen_length`` tokens): ``answer``,
    ``answer_ids``, ``nfe``, ``seconds``. ``ar_model``: ``loading.ar_baseline_model`` (the base of a
    merged export)."""
    out = ar_answers(
        ar_model,
        model.tokenizer,
        [list(prompt_ids)],
        config.gen_length,
        eos_id=model.eos_id,
        batch_size=1,
        temperature=config.temperature,
        seed=seed,
        top_k=config.top_k,
        top_p=config.top_p,
    )
    return {"answer": out.texts[0], "answer_ids": out.tokens[0], "nfe": out.nfe, "seconds": out.seconds}
