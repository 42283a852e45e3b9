"""Files are data: checkpoints' hyperparameters and export cards checked before anything is built.

A checkpoint's hyperparameters or an export card (``diffllm.json``) name classes by ``_target_``;
``hydra.utils.instantiate`` would import and call whatever they name. ``check_untrusted`` walks such
a file first: it is upgraded to today's terms with its old meaning (``diffllm.config.upgrade``), a
``_target_`` is accepted only if the project's registry holds it for its group (``allowed_targets``:
the ``TARGETS`` of the typed nodes, ``diffllm.config.schema``, and of the Lightning groups below), an
interpolation (``${...}``, which runs resolvers) is refused, ``model.trust_remote_code: true`` is
refused unless the user passed it on the command line, and the values are checked against the nodes.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch

from diffllm.config.schema import (
    MODULE_ARGS,
    SCHEDULE_NODES,
    AnnealNode,
    ConfigError,
    DataNode,
    LoraNode,
    LossNode,
    ModelNode,
    ModuleNode,
    ObjectiveNode,
    SamplerNode,
    TimeSamplerNode,
    check_node,
    check_schedule,
    node_defaults,
)
from diffllm.config.upgrade import upgrade_model, upgrade_run_config, upgrade_targets

# The Lightning objects of a run config (old checkpoints hold the whole run config): their groups
# are plain nodes (conf/trainer, conf/callbacks, conf/logger), so their classes are listed here.
RUN_TARGETS: dict[str, tuple[str, ...]] = {
    "trainer": ("diffllm.training.trainer.build_trainer", "diffllm.training.trainer.AtomicCheckpointIO"),
    "callbacks": (
        "diffllm.training.callbacks.PeriodicCheckpoint",
        "diffllm.training.callbacks.BestCheckpoint",
        "diffllm.training.callbacks.StopOnSignal",
        "diffllm.training.callbacks.NonFiniteGuard",
        "diffllm.training.callbacks.TokenThroughput",
        "diffllm.training.samples.ValidationSamples",
        "lightning.pytorch.callbacks.LearningRateMonitor",
    ),
    "logger": (
        "diffllm.training.loggers.ResumableCSVLogger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "lightning.pytorch.loggers.WandbLogger",
    ),
}
# Classes conf/ no longer builds that files written before still name (they keep loading).
LEGACY_RUN_TARGETS: dict[str, tuple[str, ...]] = {
    "logger": ("lightning.pytorch.loggers.CSVLogger",),  # logger=csv before the resumable CSV logger
}


@cache
def allowed_targets() -> dict[str, frozenset[str]]:
    """{group: the ``_target_`` values a file may name there}: the typed nodes' ``TARGETS`` (``module``:
    the LightningModule itself), ``RUN_TARGETS`` and ``LEGACY_RUN_TARGETS``. Targets under modules that moved are upgraded
    before they are looked up (``diffllm.config.upgrade.MOVED_MODULES``)."""
    nodes = {
        "module": (ModuleNode,),
        "objective": (ObjectiveNode,),
        "schedule": tuple(SCHEDULE_NODES.values()),
        "time_sampler": (TimeSamplerNode,),
        "loss": (LossNode,),
        "anneal": (AnnealNode,),
        "sampler": (SamplerNode,),
        "data": (DataNode,),
    }
    out = {
        group: frozenset(t for node in group_nodes for t in node.TARGETS)
        for group, group_nodes in nodes.items()
    }
    return out | {
        group: frozenset(targets + LEGACY_RUN_TARGETS.get(group, ()))
        for group, targets in RUN_TARGETS.items()
    }


def check_targets(node: Any, source: str, key: str = "") -> None:
    """Every ``_target_`` in ``node`` must be one the registry holds for its group (the deepest key of
    its path naming a group, else the module's); any interpolation (``${...}``) is refused: it would
    run a resolver."""
    registry = allowed_targets()
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{key}.{k}" if key else str(k)
            if k == "_target_":
                groups = [p for p in path.split(".")[:-1] if p in registry] or ["module"]
                allowed = registry[groups[-1]]
                if not isinstance(v, str) or v not in allowed:
                    raise ConfigError(
                        f"refused {source}: {path}={v!r} is not a class of the project's registry "
                        f"(allowed: {', '.join(sorted(allowed)) or 'none'}); a file may only name them"
                    )
            else:
                check_targets(v, source, path)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            check_targets(v, source, f"{key}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise ConfigError(
            f"refused {source}: {key}={node!r} is an interpolation (it would run a resolver); "
            "a file must hold plain values"
        )


def _refuse_remote_code(model: dict[str, Any], source: str | Path, trust_remote_code: bool) -> None:
    if model.get("trust_remote_code") and not trust_remote_code:
        raise ConfigError(
            f"refused {source}: model.trust_remote_code={model['trust_remote_code']!r} would run code "
            "shipped with the model; pass trust_remote_code=true on the command line if you trust it"
        )


def _upgraded(cfg: dict[str, Any], source: str | Path) -> dict[str, Any]:
    try:
        return upgrade_run_config(cfg)
    except ValueError as err:
        raise ConfigError(f"refused {source}: {str(err).splitlines()[0]}") from None


def check_untrusted(
    cfg: dict[str, Any], source: str | Path, *, trust_remote_code: bool = False
) -> dict[str, Any]:
    """A config read from a file (checkpoint hyperparameters, an export card's ``run_config``) -> the
    same values in today's terms with their old meaning (``diffllm.config.upgrade.upgrade_run_config``),
    checked before anything is built.

    Refuses (``ConfigError``, naming key and value): a ``_target_`` outside the registry, an
    interpolation, ``model.trust_remote_code: true`` unless ``trust_remote_code`` (the user's own
    command-line choice), and values outside the schema's ranges.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(
            f"refused {source}: its config is a {type(cfg).__name__}, not a mapping of plain values"
        )
    _plain_only(cfg, str(source))
    out = _upgraded(cfg, source)
    check_targets(out, str(source))
    if isinstance(out.get("model"), dict):
        _refuse_remote_code(out["model"], source, trust_remote_code)
        out["model"]["trust_remote_code"] = bool(trust_remote_code)
    # the module's nodes against the schema (types, ranges); keys of other groups pass as data
    known = {k: out[k] for k in MODULE_ARGS if k in out and out[k] is not None}
    typed = check_node(ModuleNode, known, str(source))
    check_schedule(typed.schedule, str(source))
    return out


def _plain_only(node: Any, source: str, key: str = "") -> None:
    """Only JSON-like values: a pickled object in the hyperparameters is refused by name."""
    if isinstance(node, dict):
        for k, v in node.items():
            _plain_only(v, source, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _plain_only(v, source, f"{key}[{i}]")
    elif node is not None and not isinstance(node, (str, int, float, bool)):
        raise ConfigError(f"refused {source}: {key} holds a {type(node).__name__}, not a plain value")


# -- checkpoints -------------------------------------------------------------------------------------
def read_hparams(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint's hyperparameters, read as data (``torch.load(weights_only=True)``:
    no pickled object is rebuilt)."""

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # a pickle that asks for a class: refused by weights_only
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"refused {path}: not a plain Lightning checkpoint ({first})") from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"refused {path}: not a Lightning checkpoint (a {type(checkpoint).__name__})")
    return dict(checkpoint.get("hyper_parameters") or {})


def module_args(
    hparams: dict[str, Any], source: str | Path, *, trust_remote_code: bool = False
) -> dict[str, Any]:
    """A checkpoint's hyperparameters -> ``DiffusionLitModule`` keyword arguments, checked.

    Today's checkpoints hold the arguments themselves; older ones one ``cfg`` (the whole run
    config), whose nodes are picked. A node an old run config lacks takes the value those runs used
    (``diffllm.config.upgrade.LEGACY_NODES``: ``objective`` diffusion, ``anneal`` none,
    ``val_likelihood`` grid of 4, ``seed`` 0), any other the schema's default.
    """
    if "cfg" in hparams and "model" not in hparams:
        hparams = dict(hparams["cfg"] or {})
    checked = check_untrusted(hparams, source, trust_remote_code=trust_remote_code)
    defaults = node_defaults(ModuleNode)
    out = {}
    for key in MODULE_ARGS:
        value = checked.get(key, defaults[key]) if key != "lora" else checked.get("lora")
        if key == "model" and value is None:
            raise ConfigError(f"refused {source}: it holds no model node (model.pretrained is needed)")
        out[key] = value
    return out


# -- export cards ------------------------------------------------------------------------------------
def check_card(
    card: dict[str, Any], source: str | Path, *, trust_remote_code: bool = False
) -> dict[str, Any]:
    """An export card (``diffllm.json``) read as data -> the card with its targets and model node
    upgraded (``diffllm.config.upgrade``): plain values, registry targets only, its ``run_config`` /
    ``model`` / ``lora`` / ``sampler`` against the schema, and its ``model.trust_remote_code`` refused
    unless the user passed ``trust_remote_code``."""
    if not isinstance(card, dict):
        raise ConfigError(f"refused {source}: its card is a {type(card).__name__}, not a mapping")
    _plain_only(card, str(source))
    card = upgrade_targets(card)
    check_targets(card, str(source))
    if isinstance(card.get("run_config"), dict) and card["run_config"]:
        check_untrusted(card["run_config"], source, trust_remote_code=trust_remote_code)
    model = card.get("model")
    if isinstance(model, dict):
        _refuse_remote_code(model, source, trust_remote_code)
        try:
            upgraded = upgrade_model(model)
        except ValueError as err:
            raise ConfigError(f"refused {source}: {str(err).splitlines()[0]}") from None
        check_node(ModelNode, {**upgraded, "pretrained": str(model.get("pretrained") or "")}, str(source))
    if isinstance(card.get("lora"), dict):
        check_node(LoraNode, card["lora"], str(source))
    if isinstance(card.get("sampler"), dict):
        check_node(SamplerNode, card["sampler"], str(source))
    return card
