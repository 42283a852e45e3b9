"""Files written by older versions, read with their old meaning: the one place that knows what an old
checkpoint's hyperparameters or export card meant where today's defaults or names differ.

``upgrade_run_config`` is applied to every file before it is checked (``diffllm.config.trust``):

* ``_target_`` paths under a module that moved (``MOVED_MODULES``, the layout by layer) name the
  same class under its new path;
* a model node with ``prefix_lm: true|false`` (before ``model.attention``) reads as
  ``attention: prefix_lm|bidirectional``; a model node with neither key was built bidirectional
  (the loader's default then), whatever today's default (``ModelNode.attention``) says;
* ``report.order_nll`` reads as ``report.l2r_nll`` (renamed);
* a node a run config of that age did not have takes the value those runs used (``LEGACY_NODES``).

Today's defaults are the typed nodes' (``diffllm.config.schema``); a default that changes there
keeps its old value here for the files that relied on it. Errors are ValueErrors (the callers turn
them into ``ConfigError`` naming the file).
"""

from __future__ import annotations

from typing import Any

from diffllm.model.attention import attention_mode

# Modules that moved (the layout by layer): a ``_target_`` written under an old path names the same
# class under its new one. The registry (``diffllm.config.trust.allowed_targets``) holds only today's.
MOVED_MODULES = {
    "diffllm.lit_module": "diffllm.training.module",
    "diffllm.objectives": "diffllm.training.objectives",
    "diffllm.callbacks": "diffllm.training.callbacks",
    "diffllm.trainer": "diffllm.training.trainer",
    "diffllm.validation_samples": "diffllm.training.samples",
}

# A model node without ``attention`` (nor ``prefix_lm``): what the loader built before the key existed.
LEGACY_ATTENTION = "bidirectional"

# Nodes added to the run config after the first checkpoints: the value a run without them used.
LEGACY_NODES: dict[str, Any] = {
    "objective": {"_target_": "diffllm.training.objectives.DiffusionObjective"},
    "anneal": {"_target_": "diffllm.diffusion.annealing.AttentionAnnealing", "steps": 0},
    "val_likelihood": {"num_samples": 4, "method": "grid"},
    "seed": 0,
}


def upgrade_targets(node: Any) -> Any:
    """``node`` with every ``_target_`` under a moved module rewritten to the module's new path."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "_target_" and isinstance(v, str):
                module, _, name = v.rpartition(".")
                v = f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else v
            out[k] = upgrade_targets(v)
        return out
    if isinstance(node, list):
        return [upgrade_targets(v) for v in node]
    return node


def upgrade_model(node: dict[str, Any]) -> dict[str, Any]:
    """A model node of an older file: ``prefix_lm: true|false`` -> ``attention: prefix_lm|bidirectional``
    (``diffllm.model.attention.attention_mode``: the mapping and its FutureWarning); neither key ->
    ``LEGACY_ATTENTION``."""
    node = dict(node)
    if "prefix_lm" in node:
        legacy = node.pop("prefix_lm")
        node["attention"] = attention_mode(node.get("attention"), None if legacy is None else bool(legacy))
    node.setdefault("attention", LEGACY_ATTENTION)
    return node


def upgrade_run_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run config read from a file (checkpoint hyperparameters, a card's ``run_config``) in today's
    terms, with its old meaning: moved targets, the model's attention, the nodes its age lacked."""
    out = upgrade_targets(cfg)
    if isinstance(out.get("model"), dict):
        out["model"] = upgrade_model(out["model"])
    if isinstance(out.get("report"), dict) and "order_nll" in out["report"]:  # renamed (issue 20, step 7)
        report = dict(out["report"])
        report.setdefault("l2r_nll", report.pop("order_nll"))
        report.pop("order_nll", None)
        out["report"] = report
    for key, value in LEGACY_NODES.items():
        out.setdefault(key, value)
    return out
