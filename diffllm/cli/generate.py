"""Answers from a trained diffusion model: the ``python -m diffllm.generate`` command line.

    python -m diffllm.generate ckpt_path=RUN/checkpoints/last.ckpt prompt="Reverse these words: a b c"
    python -m diffllm.generate ckpt_path=... prompts_file=prompts.jsonl sampler.threshold=0.9 sampler.cache=prefix
    python -m diffllm.generate ckpt_path=... prompt="..." ar=true trajectory=traj.json show_trajectory=true
    python -m diffllm.generate ckpt_path=... prompt="..." live=true live_delay=0.2   # watch it denoise

Node (``conf/generate.yaml``) -> ``diffllm.inference.generation.generate_from_checkpoint`` -> print.
Every instruction is rendered through the run's own prompt template and tokenised as in training;
the sampler is the checkpoint's with the given ``sampler.*`` fields replaced. Bad input (no
checkpoint, an unreadable or malformed prompts file, inconsistent sampler settings) is one line
that names the value and the fix, with exit status 2. Writes nothing unless ``trajectory=path``.
"""

from __future__ import annotations

import shutil
import sys
from typing import Any

from omegaconf import DictConfig

from diffllm.cli.support import is_set, set_keys
from diffllm.config.resolvers import hydra_main
from diffllm.inference.generation import (
    format_results,
    generate_from_checkpoint,
    summary_lines,
    write_trajectories,
)
from diffllm.inference.inputs import EXIT_BAD_INPUT, InputError, read_requests


def _given(cfg: DictConfig, key: str) -> Any:
    return cfg[key] if is_set(cfg, key) else None


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """The CLI body: read the requests, generate, print, write the trajectory file if asked."""
    requests = read_requests(_given(cfg, "prompt"), _given(cfg, "input"), _given(cfg, "prompts_file"))
    model, config, results = generate_from_checkpoint(
        _given(cfg, "ckpt_path"),
        requests,
        sampler=set_keys(cfg.get("sampler")),
        device=str(cfg.device),
        trust_remote_code=bool(cfg.get("trust_remote_code", False)),
        seed=int(cfg.seed),
        trajectory=bool(cfg.trajectory) or bool(cfg.show_trajectory),
        ar=bool(cfg.ar),
        batch_size=cfg.batch_size,
        prompt_overflow=str(cfg.prompt_overflow),
        live=bool(cfg.get("live", False)),
        live_delay=float(cfg.get("live_delay") or 0.0),
    )
    references = [r.reference for r in requests]
    width = shutil.get_terminal_size((160, 24)).columns
    print(format_results(results, model.tokenizer, bool(cfg.show_trajectory), width, references))
    print("\n".join(summary_lines(results, references, int(cfg.batch_size), config)))
    if cfg.trajectory:
        print(f"# trajectories: {write_trajectories(str(cfg.trajectory), results)}", flush=True)
    return results


@hydra_main("generate", exit_code=EXIT_BAD_INPUT)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
