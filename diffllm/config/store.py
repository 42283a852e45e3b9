"""The typed nodes registered with Hydra, and the command line checked against them.

``register_configs`` fills Hydra's ``ConfigStore`` with the nodes of ``diffllm.config.schema``:

* ``schema/<group>`` (``schema/model``, ``schema/sampler`` ...): each ``conf/<group>/<option>.yaml``
  names its node first in its defaults list (``- /schema/model@_here_``) and holds only what differs
  from it; ``conf/train.yaml`` names ``schema/train`` (``TrainNode``);
* ``cli/sampler_keep``: the ``sampler`` node of the generate and evaluate command lines, every
  ``SamplerConfig`` field ``???`` ("keep the checkpoint's value"), generated from the sampler's fields.

It must run before Hydra composes: ``diffllm.config.resolvers.hydra_main`` (every command line) and
``compose`` (tests, notebooks, benchmarks) call it. Both also check the command line's keys against
the typed nodes first (``check_overrides``), so a typo or a value of the wrong type is one line
naming the key and the node, not Hydra's message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field, fields, is_dataclass, make_dataclass
from functools import cache
from typing import Any, get_type_hints

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import MISSING

from diffllm.config.paths import CONF_DIR
from diffllm.config.schema import (
    SAMPLER_FIELDS,
    SCHEMA_FILE,
    AnnealNode,
    ConfigError,
    DataNode,
    LogLinearScheduleNode,
    LoraNode,
    LossNode,
    ModelNode,
    ObjectiveNode,
    OptimizerNode,
    PolynomialScheduleNode,
    SamplerNode,
    ScheduleNode,
    TimeSamplerNode,
    TrainNode,
    merge_node,
)

# schema/<name> -> node: what each conf/ YAML names first in its defaults list
NODES: dict[str, type] = {
    "train": TrainNode,
    "model": ModelNode,
    "lora": LoraNode,
    "data": DataNode,
    "objective": ObjectiveNode,
    "schedule": ScheduleNode,
    "schedule_loglinear": LogLinearScheduleNode,
    "schedule_polynomial": PolynomialScheduleNode,
    "time_sampler": TimeSamplerNode,
    "loss": LossNode,
    "anneal": AnnealNode,
    "sampler": SamplerNode,
    "optimizer": OptimizerNode,
}

# The typed node of each primary config's keys (what ``check_overrides`` walks); a key it does not
# reach (trainer.*, callbacks.*, a CLI's own keys) is Hydra's and Lightning's to check.
COMMAND_LINE_NODES: dict[str, Any] = {
    "train": TrainNode,
    "generate": {"sampler": SamplerNode},
    "evaluate": {"sampler": SamplerNode},
    "export": {},
}


def sampler_keep_node() -> dict[str, Any]:
    """Every sampler field ``???``: a command line's ``sampler`` node that keeps the checkpoint's values
    and replaces the ones given (``sampler.steps=16``)."""
    return {name: MISSING for name in SAMPLER_FIELDS}


@cache
def register_configs() -> None:
    """The typed nodes in Hydra's ``ConfigStore`` (``schema/*``, ``cli/sampler_keep``), once a process."""
    store = ConfigStore.instance()
    for name, node in NODES.items():
        store.store(group="schema", name=name, node=node)
    store.store(group="cli", name="sampler_keep", node=sampler_keep_node())


# -- the command line against the nodes --------------------------------------------------------------
def _field_type(node: type, name: str) -> Any:
    return get_type_hints(node)[name]


def _is_group(key: str) -> bool:
    """``model`` in ``model=tiny``: a config group (a folder of conf/, or one the store holds)."""
    return (CONF_DIR / key).is_dir() or ConfigStore.instance().repo.get(key) is not None


def _node_of(root: Any, parts: list[str], key: str) -> tuple[type | None, str]:
    """(the typed node holding the last part of ``key``, its field name) or (None, "") when the walk
    leaves the typed nodes (a plain dict node: Hydra's and Lightning's keys)."""
    node = root
    for i, part in enumerate(parts):
        if isinstance(node, dict):
            if part not in node:
                return None, ""
            node = node[part]
            continue
        if not (isinstance(node, type) and is_dataclass(node)):
            return None, ""
        names = [f.name for f in fields(node)]
        if part not in names:
            where = ".".join(parts[:i]) or "the run config"
            raise ConfigError(
                f"{key}: {part!r} is not a key of {where} ({node.__name__} in {SCHEMA_FILE}); "
                f"its keys: {', '.join(n for n in names if not n.startswith('_'))}"
            )
        if i == len(parts) - 1:
            return node, part
        hint = _field_type(node, part)
        inner = [t for t in getattr(hint, "__args__", ()) if t is not type(None)]
        node = (
            hint if is_dataclass(hint) else (inner[0] if len(inner) == 1 and is_dataclass(inner[0]) else None)
        )
    return None, ""


@cache
def _parser() -> OverridesParser:
    return OverridesParser.create()


def _values(override: Override) -> list[Any]:
    """The values an override sets: one, or each of a sweep's choices (ranges and globs aside)."""
    if not override.is_sweep_override():
        return [override.value()]
    choices = getattr(override.value(), "list", None)
    return list(choices) if isinstance(choices, list) else []


def check_overrides(config_name: str, overrides: Sequence[str]) -> None:
    """The command line's ``key=value`` overrides against the typed nodes of ``config_name``, before
    Hydra composes: a key no node has, or a value its type cannot take, is a ``ConfigError`` naming the
    key and the node (Hydra's own message is several lines). Group choices (``model=tiny``,
    ``+experiment=...``), ``hydra.*`` and keys under plain nodes (``trainer.*``) pass through."""
    root = COMMAND_LINE_NODES.get(config_name)
    if root is None:
        return
    try:
        parsed = _parser().parse_overrides(list(overrides))
    except HydraException:
        return  # a syntax error: Hydra's own message says where
    for override in parsed:
        key = override.key_or_group
        if override.type == OverrideType.DEL or override.package is not None:
            continue
        if key.startswith("hydra") or "/" in key or ("." not in key and _is_group(key)):
            continue
        node, name = _node_of(root, key.split("."), key)
        if node is None:
            continue
        for value in _values(override):
            if isinstance(value, str) and "${" in value:
                continue  # an interpolation: resolved after composing, checked then
            _typed(node, name, value, key)


@cache
def _one_field(node: type, name: str) -> type:
    """A dataclass holding only ``node``'s field ``name`` (its type): checking one value against it costs
    a small structured config, not the whole run config's."""
    return make_dataclass(node.__name__, [(name, _field_type(node, name), field(default=MISSING))])


def _typed(node: type, name: str, value: Any, key: str) -> None:
    """``value`` merged into ``node``'s field ``name``; OmegaConf's type error as one line naming ``key``."""
    try:
        merge_node(_one_field(node, name), {name: value})
    except ConfigError as err:
        message = str(err).split(": ", 1)[-1]
        raise ConfigError(f"{key}: {message}") from None
