"""Bad user input at inference time: the error a command line turns into exit code 2, and the
device check every entry point runs before loading."""

from __future__ import annotations

import torch

EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """Bad user input; a CLI prints the message (no traceback) and exits with ``EXIT_BAD_INPUT``."""


def check_device(device: str) -> None:
    """Refuse a device string torch does not know, or CUDA where there is none."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={device!r} but CUDA is not available here; pass device=cpu")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device={device!r} is not a torch device; pass device=cpu or device=cuda") from None
