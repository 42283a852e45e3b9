"""``python -m diffllm.train [overrides]`` / ``diffllm-train``: Hydra composes ``conf/train.yaml``,
``diffllm.training.run.train`` runs it; this module maps errors to exit codes and returns the metric a
sweeper optimises."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from diffllm.config.resolvers import hydra_main
from diffllm.training.callbacks import Interrupted
from diffllm.training.run import USER_ERRORS, train


@hydra_main("train")
def main(cfg: DictConfig) -> float | None:
    """``python -m diffllm.train`` / ``diffllm-train``: the resolvers and the typed nodes registered
    and the command line's keys checked (``hydra_main``), then Hydra composes and this runs."""
    try:
        metrics, _ = train(cfg)
    except Interrupted as stop:
        print(f"interrupted: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    value = metrics.get(cfg.get("optimized_metric") or "")
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
