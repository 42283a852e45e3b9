"""``python -m diffllm.export ckpt_path=... out=...``: a checkpoint -> Hugging Face folders (``conf/export.yaml``).

The writing lives in ``diffllm.inference.export``; this module reads the node and prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from diffllm.config.resolvers import hydra_main
from diffllm.inference.export import export, push_to_hub
from diffllm.model.load import ModelLoadError


def run(cfg: DictConfig) -> dict[str, Path]:
    """The CLI body (``conf/export.yaml``)."""
    written = export(
        cfg.ckpt_path,
        cfg.out,
        tuple(cfg.formats),
        device=cfg.device,
        overwrite=bool(cfg.overwrite),
        trust_remote_code=bool(cfg.trust_remote_code),
        license_=cfg.get("license"),
    )
    for kind, folder in written.items():
        print(f"{kind:8s} {folder}", flush=True)
    print(f"{'card':8s} {Path(cfg.out) / 'README.md'}", flush=True)
    repo = cfg.get("push_to_hub")
    if repo or cfg.get("push_to_hub_dry_run"):
        dry = bool(cfg.get("push_to_hub_dry_run"))
        plan = push_to_hub(
            cfg.out, repo or "<push_to_hub>", private=bool(cfg.get("private", True)), dry_run=dry
        )
        verb = "would upload" if dry else "uploaded"
        print(
            f"{verb} {len(plan)} files, {sum(size for _, size in plan):,} bytes to {repo or '<push_to_hub>'}:"
        )
        for name, size in plan:
            print(f"  {size:>12,}  {name}", flush=True)
    return written


@hydra_main("export")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ModelLoadError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
