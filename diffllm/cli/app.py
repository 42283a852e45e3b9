"""``python -m diffllm.app``: watch a converted model denoise its answer, in a browser (Gradio).

    python -m diffllm.app                                   # the newest run under outputs/ (after `make train`)
    python -m diffllm.app ckpt_path=RUN/checkpoints/last.ckpt delay=0.2
    python -m diffllm.app ckpt_path=EXPORT_FOLDER sampler.threshold=0.9 port=7861

Node (``conf/app.yaml``) -> ``diffllm.inference.webapp.serve`` -> print the checkpoint and the URL.
No ``ckpt_path``: the newest diffusion run under ``outputs_dir`` (AR-SFT baselines skipped). The
page, its controls and its offline settings: ``diffllm.inference.webapp``; Gradio is the optional
``app`` extra (``pip install -e '.[app]'``).
"""

from __future__ import annotations

import sys
from typing import Any

from omegaconf import DictConfig

from diffllm.cli.support import is_set, set_keys
from diffllm.config.resolvers import hydra_main
from diffllm.inference.inputs import EXIT_BAD_INPUT, InputError
from diffllm.inference.webapp import serve


def run(cfg: DictConfig, block: bool = True) -> tuple[Any, str]:
    """The CLI body (``conf/app.yaml``): node -> ``webapp.serve`` (prints the checkpoint and the URL)."""
    return serve(
        cfg.ckpt_path if is_set(cfg, "ckpt_path") else None,
        outputs_dir=str(cfg.get("outputs_dir") or "outputs"),
        sampler=set_keys(cfg.get("sampler")),
        device=str(cfg.device),
        trust_remote_code=bool(cfg.trust_remote_code),
        host=str(cfg.host),
        port=cfg.port,
        delay=float(cfg.delay),
        seed=int(cfg.seed),
        ar=bool(cfg.ar),
        prompt_overflow=str(cfg.prompt_overflow),
        block=block,
    )


@hydra_main("app", exit_code=EXIT_BAD_INPUT)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
