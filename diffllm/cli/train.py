"""``python -m diffllm.train [overrides]`` / ``diffllm-train``: Hydra composes ``conf/train.yaml``,
``diffllm.training.run.train`` runs it; this module maps errors to exit codes and returns the metric a
sweeper optimises."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from diffllm.config.paths import CONF_DIR
from diffllm.config.resolvers import register_resolvers
from diffllm.training.callbacks import Interrupted
from diffllm.training.run import USER_ERRORS, train


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
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


def main() -> float | None:
    """``python -m diffllm.train`` / ``diffllm-train``: the resolvers first (the default run folder
    is one: ``${fresh_dir:...}``), then Hydra."""
    register_resolvers()
    return _hydra_main()


if __name__ == "__main__":
    main()
