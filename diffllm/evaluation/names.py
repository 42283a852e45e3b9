"""The one name map of the comparison: model keys, figure keys, their labels, and renamed keys.

Every table (``tables``: the end-of-run report, ``evaluate``'s terminal view and ``eval.md``, the
multirun comparison) and every plot (``plots``) takes its rows, columns and labels from here, and
so does validation (``training.module``: ``val/<figure>``).

Models, in the order every table shows them (``MODELS``):

    diffusion   the converted model (the sampler; the ELBO bound)
    ar_sft      an AR-SFT model trained at equal budget (``objective=ar``)
    ar_base     the unadapted base (adapters off, causal attention)

Per-row scores of the scoring core (``scoring.score_batch``) and the per-token figure each becomes
(``FIGURES``): the figure names are the validation metric names (``val/nll_bound``, ``val/ar_nll``
...), kept stable. Generation figures are ``<model>_<metric>`` (``ar_base_exact_match``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# model key -> label, in table and plot order
MODELS: dict[str, str] = {"diffusion": "diffusion", "ar_sft": "AR-SFT", "ar_base": "AR base"}

# per-row score (scoring.score_batch) -> (per-token figure, label); the figure is val/<figure> too
FIGURES: dict[str, tuple[str, str]] = {
    "diffusion": ("nll_bound", "diffusion, ELBO upper bound"),
    "ar_base": ("ar_nll", "AR base, unadapted"),
    "ar_base_no_end": ("ar_nll_no_end", "AR base, without the end token"),
    "ar_sft": ("ar_sft_nll", "AR-SFT, same budget"),
    "l2r_nll": ("l2r_nll", "diffusion, left to right (one order)"),
}

# (figure, minuend score, subtrahend score, label): per-token differences paired over rows;
# order_cost + conversion_loss = gap
GAPS: tuple[tuple[str, str, str, str], ...] = (
    ("gap", "diffusion", "ar_base", "bound - AR base"),
    ("gap_sft", "diffusion", "ar_sft", "bound - AR-SFT: the price of the conversion"),
    ("order_cost", "diffusion", "l2r_nll", "bound - L2R: cost of averaging over orders"),
    ("conversion_loss", "l2r_nll", "ar_base", "L2R - AR base: lost by the conversion"),
    ("conversion_loss_sft", "l2r_nll", "ar_sft", "L2R - AR-SFT"),
)

# generation metric -> (label, digits); a model's figure is <model>_<metric>
GENERATION: dict[str, tuple[str, int]] = {
    "exact_match": ("exact match", 3),
    "rougeL": ("ROUGE-L", 3),
    "bleu": ("BLEU-4 (corpus)", 3),
    "answer_length": ("answer tokens (mean)", 2),
    "eos_rate": ("EOS rate", 3),
    "seconds": ("generation seconds", 2),
    "nfe": ("forward passes", 0),
    "tokens_per_pass": ("tokens per forward pass", 2),
}

# reference-free figure (quality.reference_free) -> (label, digits)
REFERENCE_FREE: dict[str, tuple[str, int]] = {
    "ar_scored_nll": ("AR-scored NLL (nats/token)", 3),
    "ar_agreement": ("agreement with AR greedy", 3),
    "answer_length": ("answer tokens (mean)", 2),
    "eos_rate": ("EOS rate", 3),
    "repetition": ("repeated bigrams", 3),
}


# figure -> short column name (the length buckets, the sweeps, the multirun comparison)
SHORT: dict[str, str] = {
    "nll_bound": "NLL bound",
    "l2r_nll": "L2R NLL",
    "ar_sft_nll": "AR-SFT NLL",
    "ar_nll": "AR NLL",
    "gap": "bound - AR",
    "gap_sft": "bound - AR-SFT",
    "diffusion_exact_match": "exact match",
    "diffusion_rougeL": "ROUGE-L",
    "ar_scored_nll": "AR-scored NLL",
    "tokens_per_step": "tokens per step",
    "steps": "steps",
    "nfe": "forward passes",
    "exact_match": "exact match",
    "rougeL": "ROUGE-L",
    "bleu": "BLEU-4",
    "seconds": "seconds",
}


def models_in(r: Mapping[str, Any], metric: str = "exact_match") -> list[tuple[str, str]]:
    """(model, label) of every model with a ``<model>_<metric>`` figure in ``r``, in table order: the
    columns of the generation table and the lines of the quality-vs-steps plot alike."""
    return [(m, label) for m, label in MODELS.items() if f"{m}_{metric}" in r]


def reference_model(models: Iterable[str]) -> str:
    """The model exact-match differences are taken against: AR-SFT when among ``models``, else the base."""
    return "ar_sft" if "ar_sft" in set(models) else "ar_base"


# ----------------------------------------------------------------------------------- renamed keys

# Keys renamed in report.json and eval.json in 0.1.0 (the base model was ``ar`` in answers and
# ``ar_base`` in scores; it is ``ar_base`` everywhere now): the generation figures ``ar_<metric>``,
# the differences ``<model>_minus_ar_exact_match``, the ``ar`` entries of ``reference_free``,
# ``examples`` and ``by_task``. Deprecated: for one release the old key is written beside the new
# one with the same value (``with_deprecated_keys``); read the new key. A report written before
# the rename reads with today's names (``with_current_keys``, every table does it).
RENAMED_MODELS = {"ar_base": "ar"}
# eval.json's per-row scores (``per_row.scored``) are keyed by score row, always ``ar_base``; their one
# renamed row is the left-to-right NLL (``diffusion_l2r`` before)
SCORE_PATH = "per_row.scored"
PER_ROW = ("match", "length", "ended")  # per_row.generated: <model>_match, <model>_length, <model>_ended
RENAMED_SCORES = {"l2r_nll": "diffusion_l2r"}


def deprecated_name(key: str) -> str | None:
    """The old name of a renamed key (``ar_base_exact_match`` -> ``ar_exact_match``), or None."""
    for new, old in RENAMED_MODELS.items():
        if key == new:
            return old
        if key.startswith(f"{new}_"):
            return old + key[len(new) :]
        if f"_minus_{new}_" in key:
            return key.replace(f"_minus_{new}_", f"_minus_{old}_")
    return None


def with_deprecated_keys(r: Any, path: str = "") -> Any:
    """``r`` (a report, nested dicts and lists) with every renamed key's old name written right after
    it, same value; keys that already exist are left alone. ``path``: where ``r`` sits in the report."""
    if isinstance(r, list):
        return [with_deprecated_keys(v, path) for v in r]
    if not isinstance(r, dict):
        return r
    out: dict[str, Any] = {}
    for key, value in r.items():
        out[key] = with_deprecated_keys(value, f"{path}.{key}" if path else str(key))
        if path == SCORE_PATH:
            old = RENAMED_SCORES.get(key)
        else:
            old = deprecated_name(key) if isinstance(key, str) else None
        if old is not None and old not in r:
            out[old] = out[key]
    return out


def current_name(key: str) -> str | None:
    """Today's name of a key a report written before the rename holds (``ar_exact_match`` ->
    ``ar_base_exact_match``), or None when the key was not renamed (``ar_nll``, ``ar_scored_nll``)."""
    for new, old in RENAMED_MODELS.items():
        if key == old:
            return new
        if any(key in (f"{old}_{metric}", f"{old}_{metric}_se") for metric in (*GENERATION, *PER_ROW)):
            return new + key[len(old) :]
        if key.startswith(f"{old}_minus_"):
            return new + key[len(old) :]
        if key.endswith(f"_minus_{old}_exact_match") or key.endswith(f"_minus_{old}_exact_match_se"):
            return key.replace(f"_minus_{old}_", f"_minus_{new}_")
    return None


def with_current_keys(r: Any, path: str = "") -> Any:
    """``r`` (a report, nested dicts and lists) with today's name added for every key an older
    version wrote under its old name (the old key kept); keys already present are left alone.
    ``path``: where ``r`` sits in the report."""
    if isinstance(r, list):
        return [with_current_keys(v, path) for v in r]
    if not isinstance(r, dict):
        return r
    out: dict[str, Any] = {}
    for key, value in r.items():
        out[key] = with_current_keys(value, f"{path}.{key}" if path else str(key))
        if path == SCORE_PATH:
            new = {old: new for new, old in RENAMED_SCORES.items()}.get(key)
        else:
            new = current_name(key) if isinstance(key, str) else None
        if new is not None and new not in r:
            out[new] = out[key]
    return out
