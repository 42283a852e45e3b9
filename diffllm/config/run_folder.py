"""Run folders: one per run, never shared by accident.

* ``${fresh_dir:outputs/<date>/<time>}`` (the default ``hydra.run.dir``) claims a folder that no
  other run holds: ``os.mkdir`` is atomic, so of two runs started in the same second the first gets
  ``<time>`` and the second ``<time>-1`` (then ``-2``, ...), on one machine or on a shared
  filesystem. The claim is made once per process (Hydra may resolve the key more than once).
  An explicit ``hydra.run.dir=...`` is used as given.
* ``check_run_folder``: a folder that already holds a ``config.yaml`` belongs to another run and is
  refused, unless this run resumes it (``ckpt_path`` inside it, or a Lightning hpc checkpoint in it:
  a requeued SLURM job). ``write_config`` then writes ``config.yaml`` (the folder is created if
  needed). Both on global rank 0 only: the other ranks of a DDP run share rank 0's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

_claimed: dict[str, str] = {}


class RunFolderError(RuntimeError):
    """The run folder holds another run."""


def fresh_dir(base: str) -> str:
    """``base``, or ``base-1``, ``base-2``, ...: the first that this call could create (module docstring)."""
    if base in _claimed:
        return _claimed[base]
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        candidate = base if n == 0 else f"{base}-{n}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        _claimed[base] = candidate
        return candidate
    raise RunFolderError(f"no free run folder next to {base} after 10000 tries: set hydra.run.dir=...")


def _inside(path: str | os.PathLike | None, folder: Path) -> bool:
    if not path:
        return False
    try:
        Path(path).resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def check_run_folder(out_dir: str | os.PathLike, ckpt_path: str | None, rank: int = 0) -> Path:
    """Refuse a folder holding another run's ``config.yaml`` unless this run resumes it (module docstring).

    rank: the process's global rank; only rank 0 checks (the other ranks share its folder).
    """
    out = Path(out_dir)
    existing = out / "config.yaml"
    if rank == 0 and existing.exists():
        resuming = _inside(ckpt_path, out) or any(out.glob("hpc_ckpt_*.ckpt"))
        if not resuming:
            raise RunFolderError(
                f"run folder {out} already holds another run ({existing}); give this run its own folder "
                f"(drop hydra.run.dir= or pick a new one), or resume that run with "
                f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"
            )
    return out


def write_config(out_dir: str | os.PathLike, cfg: DictConfig | dict[str, Any], rank: int = 0) -> None:
    """``config.yaml`` (resolved) into ``out_dir``, created if needed; rank 0 only; atomic."""
    if rank != 0:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".config.yaml.{os.getpid()}.tmp"
    OmegaConf.save(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg), tmp, resolve=True)
    os.replace(tmp, out / "config.yaml")
