"""The project's config schema: one typed node per config group, its valid ranges, and the check
of files written by someone else.

Every node is a dataclass whose fields are the constructor arguments of the object it builds
(``_target_`` included), so the defaults live here and nowhere else. The composed Hydra config is
checked against it before anything is loaded (``check_run_config``): types (OmegaConf's structured
merge), then ranges (each node's ``__post_init__``), every error one line naming the key, the value
and the valid range (``ConfigError``).

Files are data. A checkpoint's hyperparameters or an export card (``diffllm.json``) name classes by
``_target_``; ``hydra.utils.instantiate`` would import and call whatever they name. ``check_untrusted``
walks such a file before anything is built: a ``_target_`` is accepted only if the project's own
registry holds it (``ALLOWED_TARGETS``: the targets of ``conf/``'s groups), an interpolation
(``${...}``, which runs resolvers) is refused, and ``model.trust_remote_code: true`` is refused
unless the user passed it on the command line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffllm.config.paths import CONF_DIR
from diffllm.data.prompt_fit import PROMPT_OVERFLOW
from diffllm.data.template import TEMPLATES, TemplateError, get_format
from diffllm.diffusion.loss import NORMALISATIONS, RENAMED_NORMALISATIONS, WEIGHTINGS
from diffllm.diffusion.strategies import STRATEGIES
from diffllm.model.attention import attention_mode


class ConfigError(ValueError):
    """A config value outside its valid range: one line naming key, value and range."""


def _bad(key: str, value: Any, valid: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is out of range; valid: {valid}")


def _require(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise _bad(key, value, valid)


# -- model -------------------------------------------------------------------------------------------
ATTENTION_MODES = ("causal", "bidirectional", "prefix_lm", "block_causal")
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")


@dataclass
class MaskTokenNode:
    """How the [MASK] token is added (``diffllm.model.load.add_mask_token``)."""

    mode: str = "add"  # add | reuse
    token: str = "[MASK]"
    init: str = "mean"  # mean | random | token:<text>

    def __post_init__(self) -> None:
        _require(self.mode in ("add", "reuse"), "model.mask_token.mode", self.mode, "add | reuse")
        _require(
            self.init in ("mean", "random") or self.init.startswith("token:"),
            "model.mask_token.init",
            self.init,
            "mean | random | token:<text>",
        )


@dataclass
class ModelNode:
    """``diffllm.model.load.build_diffusion_model`` arguments (the ``model`` group)."""

    pretrained: str = MISSING
    attn_implementation: str = "sdpa"
    dtype: str = "float32"
    shift: bool = True
    # causal | bidirectional | prefix_lm | block_causal (legacy files: prefix_lm: true/false); a node
    # without either key has always been built bidirectional (the loader's default)
    attention: str = "bidirectional"
    block_size: int | None = None  # block_causal only
    mask_token: MaskTokenNode = field(default_factory=MaskTokenNode)
    train_mask_row: bool = False
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    from_scratch: bool = False
    # the architecture (a transformers config dict), for a dry run on the meta device
    config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _require(
            self.attention in ATTENTION_MODES, "model.attention", self.attention, " | ".join(ATTENTION_MODES)
        )
        _require(self.dtype in DTYPES, "model.dtype", self.dtype, " | ".join(DTYPES))
        _require(
            self.attn_implementation in ATTN_IMPLEMENTATIONS,
            "model.attn_implementation",
            self.attn_implementation,
            " | ".join(ATTN_IMPLEMENTATIONS),
        )
        if self.block_size is not None:
            _require(self.block_size >= 1, "model.block_size", self.block_size, "an integer >= 1 or null")
        _require(
            self.attention != "block_causal" or self.block_size is not None,
            "model.block_size",
            self.block_size,
            "an integer >= 1 with model.attention=block_causal",
        )


# -- lora --------------------------------------------------------------------------------------------
@dataclass
class LoraNode:
    """PEFT ``LoraConfig`` keyword arguments (the ``lora`` group); attention projections only."""

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    bias: str = "none"

    def __post_init__(self) -> None:
        _require(self.r >= 1, "lora.r", self.r, "an integer >= 1")
        _require(self.lora_alpha > 0, "lora.lora_alpha", self.lora_alpha, "a number > 0")
        _require(0 <= self.lora_dropout < 1, "lora.lora_dropout", self.lora_dropout, "0 <= lora_dropout < 1")
        _require(len(self.target_modules) > 0, "lora.target_modules", self.target_modules, "a non-empty list")
        _require(self.bias in ("none", "all", "lora_only"), "lora.bias", self.bias, "none | all | lora_only")


# -- data --------------------------------------------------------------------------------------------
# The filters of the self-generated data's instructions (``diffllm.assets.self_generated.REASONS``).
# ``empty`` and ``too_long`` always apply; these are optional.
INSTRUCTION_FILTERS = ("not_plain", "too_short", "repetitive", "not_a_request", "duplicate")


@dataclass
class SelfGeneratedNode:
    """How ``data=self_generated`` is built (``diffllm.assets.self_generated``): instructions sampled
    from the chat model itself, then its own greedy answers. Every key (with ``data.max_length`` and
    the model's content hash in place of its path, ``cache`` aside) is part of the build's cache key."""

    model: str = MISSING  # the chat model folder (conf/data/self_generated.yaml: ${model.pretrained})
    rows: int = 1500  # rows in all, train + val
    val_rows: int = 200
    seed: int = 0
    temperature: float = 1.0  # instruction sampling (answers are greedy)
    top_p: float = 0.95
    max_instruction_tokens: int = 64  # a sample without the end of the user turn by then: too_long
    min_instruction_words: int = 3  # fewer words: too_short
    # the instruction filters applied, in this order (each rejection counted under its name)
    filters: list[str] = field(default_factory=lambda: list(INSTRUCTION_FILTERS))
    batch_size: int = 64  # prompts per generate call (changes the sampled instructions: keyed)
    cache: str | None = None  # null: $DIFFLLM_CACHE (default ~/.cache/diffllm)

    def __post_init__(self) -> None:
        k = "data.self_generated"
        _require(self.rows >= 2, f"{k}.rows", self.rows, "an integer >= 2 (train and val rows)")
        _require(
            1 <= self.val_rows < self.rows, f"{k}.val_rows", self.val_rows, f"1 .. {self.rows - 1} (rows - 1)"
        )
        _require(self.temperature > 0, f"{k}.temperature", self.temperature, "> 0 (instructions are sampled)")
        _require(0 < self.top_p <= 1, f"{k}.top_p", self.top_p, "0 < top_p <= 1")
        for key in ("max_instruction_tokens", "batch_size"):
            _require(getattr(self, key) >= 1, f"{k}.{key}", getattr(self, key), "an integer >= 1")
        _require(
            self.min_instruction_words >= 0, f"{k}.min_instruction_words", self.min_instruction_words, ">= 0"
        )
        unknown = [f for f in self.filters if f not in INSTRUCTION_FILTERS]
        _require(not unknown, f"{k}.filters", self.filters, f"a list of {', '.join(INSTRUCTION_FILTERS)}")


@dataclass
class DataNode:
    """``diffllm.data.datamodule.AlpacaDataModule`` arguments (the ``data`` group), tokenizer aside."""

    _target_: str = "diffllm.data.datamodule.AlpacaDataModule"
    path: str = "tatsu-lab/alpaca"
    split: str = "train"
    val_path: str | None = None
    val_size: float = 0.02  # a fraction (< 1) or a row count (>= 1)
    template: str = "alpaca"
    max_length: int = 512
    answer_pad_to: int | None = None
    batch_size: int = 16
    group_by_length: bool = False
    eval_batch_size: int | None = None
    num_workers: int = 0
    seed: int = 0
    limit_train_rows: int | None = None
    limit_val_rows: int | None = None
    num_sample_prompts: int = 4
    strict: bool = False
    report_dir: str | None = None
    pad_to_multiple_of: int | None = None
    # data=self_generated: how its rows are built (the path and val_path resolvers read it)
    self_generated: SelfGeneratedNode | None = None

    def __post_init__(self) -> None:
        _require(self.max_length >= 1, "data.max_length", self.max_length, "an integer >= 1")
        if self.self_generated is not None:  # answers are the model's continuations of chat prompts
            _require(
                self.template == "chat",
                "data.template",
                self.template,
                "chat with data=self_generated (its answers continue the chat template's prompt)",
            )
        _require(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")
        for key in (
            "eval_batch_size",
            "answer_pad_to",
            "limit_train_rows",
            "limit_val_rows",
            "pad_to_multiple_of",
        ):
            value = getattr(self, key)
            _require(value is None or value >= 1, f"data.{key}", value, "an integer >= 1 or null")
        _require(
            self.val_size > 0, "data.val_size", self.val_size, "a fraction in (0, 1) or a row count >= 1"
        )
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "an integer >= 0")
        _require(
            self.num_sample_prompts >= 0,
            "data.num_sample_prompts",
            self.num_sample_prompts,
            "an integer >= 0",
        )

        try:
            get_format(self.template)
        except TemplateError:
            raise _bad(
                "data.template",
                self.template,
                f"chat | {' | '.join(TEMPLATES)} | a format string with {{instruction}}",
            ) from None


# -- optimisation ------------------------------------------------------------------------------------
@dataclass
class OptimizerNode:
    """AdamW + linear warm-up then cosine decay (``diffllm.training.module.lr_factor``)."""

    lr: float = 3.0e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optimizer.lr", self.lr, "a number > 0")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "a number >= 0")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optimizer.betas",
            self.betas,
            "two numbers in [0, 1)",
        )
        _require(self.warmup_steps >= 0, "optimizer.warmup_steps", self.warmup_steps, "an integer >= 0")
        _require(
            0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio", self.min_lr_ratio, "0 <= min_lr_ratio <= 1"
        )


# -- sampler -----------------------------------------------------------------------------------------
# strategies whose confidence is a probability-like score in [0, 1], so a threshold tau in (0, 1]
# can be compared with it; `entropy` gives c = -H <= 0 and `random` a uniform draw.
THRESHOLD_STRATEGIES = ("low_confidence", "margin")
# the sampler's KV-cache modes and what a block sees of the blocks after it (SamplerConfig)
CACHE_MODES = ("none", "prefix", "dual", "block")
FUTURE_MODES = ("visible", "hidden")


@dataclass
class SamplerNode:
    """``diffllm.diffusion.sampler.SamplerConfig`` (the ``sampler`` group); see its docstring."""

    _target_: str = "diffllm.diffusion.sampler.SamplerConfig"
    gen_length: int = 64
    steps: int | None = None
    block_length: int | None = None
    strategy: str = "low_confidence"
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    threshold: float | None = None
    cache: str = "none"
    cfg_scale: float = 0.0
    eos_penalty: float = 0.0
    stop_early: bool = True
    fill_after_eos: bool = False
    future_blocks: str = "visible"
    remask: bool = False
    remask_bound: float = 0.1
    remask_steps: int = 4

    def __post_init__(self) -> None:
        check_sampler(self, "sampler")


def check_sampler(node: Any, prefix: str = "sampler") -> None:
    """Ranges of the sampler settings (the consistency between them is ``SamplerConfig``'s)."""
    _require(node.gen_length >= 1, f"{prefix}.gen_length", node.gen_length, "an integer >= 1")
    _require(node.steps is None or node.steps >= 1, f"{prefix}.steps", node.steps, "an integer >= 1 or null")
    _require(
        node.block_length is None or node.block_length >= 1,
        f"{prefix}.block_length",
        node.block_length,
        "an integer >= 1 or null",
    )
    _require(node.strategy in STRATEGIES, f"{prefix}.strategy", node.strategy, " | ".join(STRATEGIES))
    _require(node.cache in CACHE_MODES, f"{prefix}.cache", node.cache, " | ".join(CACHE_MODES))
    _require(
        node.future_blocks in FUTURE_MODES,
        f"{prefix}.future_blocks",
        node.future_blocks,
        " | ".join(FUTURE_MODES),
    )
    _require(node.temperature >= 0, f"{prefix}.temperature", node.temperature, "a number >= 0 (0 = greedy)")
    _require(node.top_k is None or node.top_k >= 0, f"{prefix}.top_k", node.top_k, "an integer >= 0 or null")
    _require(
        node.top_p is None or 0 < node.top_p <= 1, f"{prefix}.top_p", node.top_p, "0 < top_p <= 1 or null"
    )
    _require(node.cfg_scale >= 0, f"{prefix}.cfg_scale", node.cfg_scale, "a number >= 0")
    _require(
        0 < node.remask_bound <= 1, f"{prefix}.remask_bound", node.remask_bound, "a probability in (0, 1]"
    )
    _require(node.remask_steps >= 1, f"{prefix}.remask_steps", node.remask_steps, "an integer >= 1")
    if node.threshold is not None:
        _require(0 < node.threshold <= 1, f"{prefix}.threshold", node.threshold, "0 < threshold <= 1 or null")
        if node.strategy not in THRESHOLD_STRATEGIES:
            raise ConfigError(
                f"{prefix}.strategy={node.strategy!r} cannot take {prefix}.threshold={node.threshold}: its "
                "confidence is not a probability (entropy's is <= 0, random's a uniform draw), so the threshold "
                f"would never fire; valid: strategy {' | '.join(THRESHOLD_STRATEGIES)}, or threshold=null"
            )
        _require(
            node.steps is None,
            f"{prefix}.steps",
            node.steps,
            f"null with {prefix}.threshold={node.threshold} (a threshold block ends when it has no [MASK] left)",
        )


# -- the diffusion objective's parts -----------------------------------------------------------------
@dataclass
class TargetNode:
    """A node that only names a class of its group (``schedule=linear``, ``objective=ar``)."""

    _target_: str = MISSING


@dataclass
class ScheduleNode:
    """A schedule without arguments (``schedule=linear``, ``schedule=cosine``)."""

    _target_: str = "diffllm.diffusion.schedule.LinearSchedule"


@dataclass
class LogLinearScheduleNode:
    """``schedule=loglinear``: alpha(t) = 1 - (1 - eps) t."""

    _target_: str = "diffllm.diffusion.schedule.LogLinearSchedule"
    eps: float = 1.0e-3

    def __post_init__(self) -> None:
        _require(0 <= self.eps < 1, "schedule.eps", self.eps, "0 <= eps < 1")


@dataclass
class PolynomialScheduleNode:
    """``schedule=polynomial``: alpha(t) = 1 - t^exponent."""

    _target_: str = "diffllm.diffusion.schedule.PolynomialSchedule"
    exponent: float = 2.0

    def __post_init__(self) -> None:
        _require(self.exponent > 0, "schedule.exponent", self.exponent, "a number > 0")


# the schedule node of each schedule class (the group's targets take different arguments)
SCHEDULE_NODES: dict[str, type] = {
    "diffllm.diffusion.schedule.LinearSchedule": ScheduleNode,
    "diffllm.diffusion.schedule.CosineSchedule": ScheduleNode,
    "diffllm.diffusion.schedule.LogLinearSchedule": LogLinearScheduleNode,
    "diffllm.diffusion.schedule.PolynomialSchedule": PolynomialScheduleNode,
}


@dataclass
class TimeSamplerNode:
    """``diffllm.diffusion.time`` (the ``time_sampler`` group): t in [eps, 1)."""

    _target_: str = "diffllm.diffusion.time.UniformTimeSampler"
    eps: float = 1.0e-3

    def __post_init__(self) -> None:
        _require(0 <= self.eps < 1, "time_sampler.eps", self.eps, "0 <= eps < 1")


@dataclass
class LossNode:
    """``diffllm.diffusion.loss.MaskedDiffusionLoss`` (the ``loss`` group)."""

    _target_: str = "diffllm.diffusion.loss.MaskedDiffusionLoss"
    weighting: str = "elbo"
    normalisation: str = "supervised_tokens"
    # recipe options (issue 18; cross-checks in check_loss_recipe): each row also trained with the
    # complement of its mask (linear schedule only), and KL(base || converted) at the masked scored
    # positions (block_causal only)
    complementary: bool = False
    distill_weight: float = 0.0

    def __post_init__(self) -> None:
        _require(
            self.distill_weight >= 0, "loss.distill_weight", self.distill_weight, "a number >= 0 (0 = off)"
        )
        _require(self.weighting in WEIGHTINGS, "loss.weighting", self.weighting, " | ".join(WEIGHTINGS))
        _require(
            # an old name (RENAMED_NORMALISATIONS) is read by the loss, with a warning
            self.normalisation in NORMALISATIONS or self.normalisation in RENAMED_NORMALISATIONS,
            "loss.normalisation",
            self.normalisation,
            " | ".join(NORMALISATIONS),
        )


@dataclass
class AnnealNode:
    """``diffllm.diffusion.annealing.AttentionAnnealing`` (the ``anneal`` group)."""

    _target_: str = "diffllm.diffusion.annealing.AttentionAnnealing"
    steps: int = 0

    def __post_init__(self) -> None:
        _require(self.steps >= 0, "anneal.steps", self.steps, "an integer >= 0 (0 = no annealing)")


@dataclass
class ValLikelihoodNode:
    """The ELBO estimator of ``val/nll_bound``: a t-grid (``grid``) or Monte Carlo (``stratified``)."""

    num_samples: int = 4
    method: str = "grid"

    def __post_init__(self) -> None:
        _require(self.num_samples >= 1, "val_likelihood.num_samples", self.num_samples, "an integer >= 1")
        _require(
            self.method in ("grid", "stratified"), "val_likelihood.method", self.method, "grid | stratified"
        )


@dataclass
class QualityNode:
    """Reference-free answer quality and the quality-vs-compute table (``diffllm.evaluation.quality``)."""

    enabled: bool = True
    rows: int = 16
    tokens_per_step: list[int] = field(default_factory=lambda: [1, 2, 4, 8])

    def __post_init__(self) -> None:
        _require(self.rows >= 1, "quality.rows", self.rows, "an integer >= 1")
        _require(
            all(int(k) >= 1 for k in self.tokens_per_step),
            "quality.tokens_per_step",
            self.tokens_per_step,
            "integers >= 1",
        )


@dataclass
class ReportNode:
    """The end-of-run report (``diffllm.evaluation.report``)."""

    enabled: bool = True
    num_rows: int = 64
    likelihood_samples: int = 8
    ar_ckpt_path: str | None = None
    # prompts longer than the model's positions minus gen_length (diffllm.data.prompt_fit)
    prompt_overflow: str = "truncate_left"
    # the gap decomposed: the diffusion model's left-to-right NLL (diffllm.diffusion.order)
    order_nll: bool = True
    # reference-free quality and quality vs compute (diffllm.evaluation.quality): enabled, rows, tokens_per_step
    quality: QualityNode = field(default_factory=lambda: QualityNode())

    def __post_init__(self) -> None:
        _require(self.num_rows >= 1, "report.num_rows", self.num_rows, "an integer >= 1")
        _require(
            self.prompt_overflow in PROMPT_OVERFLOW,
            "report.prompt_overflow",
            self.prompt_overflow,
            " | ".join(PROMPT_OVERFLOW),
        )
        _require(
            self.likelihood_samples >= 1,
            "report.likelihood_samples",
            self.likelihood_samples,
            "an integer >= 1",
        )


@dataclass
class ModuleNode:
    """``diffllm.training.module.DiffusionLitModule``: its constructor arguments are exactly these keys."""

    _target_: str = "diffllm.training.module.DiffusionLitModule"
    _recursive_: bool = False
    model: ModelNode = MISSING
    lora: LoraNode | None = None
    data: DataNode = field(default_factory=DataNode)
    objective: TargetNode = field(
        default_factory=lambda: TargetNode("diffllm.training.objectives.DiffusionObjective")
    )
    schedule: Any = field(default_factory=lambda: {"_target_": ScheduleNode._target_})  # SCHEDULE_NODES
    time_sampler: TimeSamplerNode = field(default_factory=TimeSamplerNode)
    loss: LossNode = field(default_factory=LossNode)
    anneal: AnnealNode = field(default_factory=AnnealNode)
    sampler: SamplerNode = field(default_factory=SamplerNode)
    optimizer: OptimizerNode = field(default_factory=OptimizerNode)
    val_likelihood: ValLikelihoodNode = field(default_factory=ValLikelihoodNode)
    seed: int = 0


MODULE_ARGS = tuple(f.name for f in fields(ModuleNode) if not f.name.startswith("_"))


@dataclass
class TrainNode:
    """``conf/train.yaml`` composed: the module's nodes plus the run's own keys.

    ``trainer``, ``callbacks`` and ``logger`` are nodes of Lightning objects (checked by Lightning
    and by ``check_trainer``); ``module`` wires the groups into ``DiffusionLitModule``.
    """

    model: ModelNode = MISSING
    lora: LoraNode | None = None
    data: DataNode = field(default_factory=DataNode)
    objective: TargetNode = field(
        default_factory=lambda: TargetNode("diffllm.training.objectives.DiffusionObjective")
    )
    schedule: Any = field(default_factory=lambda: {"_target_": ScheduleNode._target_})  # SCHEDULE_NODES
    time_sampler: TimeSamplerNode = field(default_factory=TimeSamplerNode)
    loss: LossNode = field(default_factory=LossNode)
    anneal: AnnealNode = field(default_factory=AnnealNode)
    sampler: SamplerNode = field(default_factory=SamplerNode)
    optimizer: OptimizerNode = field(default_factory=OptimizerNode)
    val_likelihood: ValLikelihoodNode = field(default_factory=ValLikelihoodNode)
    report: ReportNode = field(default_factory=ReportNode)
    module: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] | None = None
    logger: dict[str, Any] | None = None
    seed: int = 0
    dry_run: bool = False
    ckpt_path: str | None = None
    output_dir: str | None = None
    optimized_metric: str | None = None


def check_trainer(trainer: dict[str, Any]) -> None:
    """The step counts of the ``trainer`` node (its other keys are Lightning's to check)."""
    steps = trainer.get("max_steps", -1)
    _require(
        isinstance(steps, int) and (steps >= 1 or steps == -1),
        "trainer.max_steps",
        steps,
        "an integer >= 1 (or -1)",
    )
    for key in ("val_every_n_steps", "accumulate_grad_batches"):
        value = trainer.get(key)
        _require(
            value is None or (isinstance(value, int) and value >= 1),
            f"trainer.{key}",
            value,
            "an integer >= 1",
        )


# -- legacy files ------------------------------------------------------------------------------------
def upgrade_model(node: dict[str, Any]) -> dict[str, Any]:
    """A model node of an older file: ``prefix_lm: true|false`` -> ``attention: prefix_lm|bidirectional``."""
    node = dict(node)
    if "prefix_lm" in node:  # diffllm.model.attention.attention_mode: the mapping, its FutureWarning
        legacy = node.pop("prefix_lm")
        try:
            node["attention"] = attention_mode(
                node.get("attention"), None if legacy is None else bool(legacy)
            )
        except ValueError as err:
            raise ConfigError(str(err).splitlines()[0]) from None
    node.setdefault("attention", ModelNode.attention)
    return node


# -- checking the run config -------------------------------------------------------------------------
def check_node(schema: type, values: dict[str, Any], source: str | Path | None = None) -> Any:
    """``values`` merged into ``schema`` (types, unknown keys) and built (ranges): the schema's object.

    ``source``: the file the values were read from, named in the error (None: the command line).
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(getattr(err, "msg", None) or err).splitlines()[0]
        if " not in '" in msg:  # an unknown key: a typo, or a key the schema must learn
            msg += " (the keys and their ranges: diffllm/config/schema.py)"
        raise ConfigError(f"refused {source}: {key}: {msg}" if source else f"{key}: {msg}") from None
    except ConfigError as err:
        raise ConfigError(f"refused {source}: {err}" if source else str(err)) from None


def plain_for_check(cfg: Any) -> dict[str, Any]:
    """The run config as plain values, without running resolvers that fetch models (``${smollm2:}``)."""
    raw = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=False)
    cfg = OmegaConf.create(raw)
    for node in (cfg.get("model"), (cfg.get("module") or {}).get("model")):
        # the cache folder ${smollm2:} would build is not needed to check ranges
        if isinstance(node, DictConfig) and "${smollm2:" in str(
            OmegaConf.to_container(node).get("pretrained")
        ):
            node.pretrained = "<smollm2>"
    data = cfg.get("data")
    if isinstance(data, DictConfig):  # ${self_generated:...} would build the data set
        raw_data = OmegaConf.to_container(data, resolve=False)
        for key in ("path", "val_path"):
            if "${self_generated:" in str(raw_data.get(key)):
                data[key] = f"<self_generated {key}>"
    if OmegaConf.is_interpolation(cfg, "output_dir"):
        try:
            cfg.output_dir  # noqa: B018 - resolvable inside @hydra.main only
        except Exception:
            cfg.output_dir = "<run folder>"
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def check_run_config(cfg: Any) -> TrainNode:
    """The composed ``train`` config checked against the schema; raises ``ConfigError`` (one line)."""
    values = plain_for_check(cfg)
    if isinstance(values.get("model"), dict):
        values["model"] = upgrade_model(values["model"])
    if isinstance(values.get("module"), dict) and isinstance(values["module"].get("model"), dict):
        values["module"]["model"] = upgrade_model(values["module"]["model"])
    node = check_node(TrainNode, values)
    check_schedule(node.schedule)
    check_trainer(node.trainer)
    check_loss_recipe(node)
    return node


def check_loss_recipe(node: Any) -> None:
    """The loss's recipe options against the keys they depend on (a ``TrainNode``/``ModuleNode`` or the
    module's plain arguments); ``objective=ar`` ignores the loss node, so nothing is checked for it.

    ``loss.complementary``: the linear schedule (the complement of ``u < t`` is the mask at 1 - t) and
    ``time_sampler.eps < 0.5`` (t is drawn in [eps, 1 - eps]). ``loss.distill_weight > 0``:
    ``model.attention=block_causal`` (the student sees the teacher's clean left context) and LoRA
    adapters (the teacher is the model with its adapters off).
    """

    def get(owner: Any, key: str, default: Any = None) -> Any:
        return owner.get(key, default) if isinstance(owner, dict) else getattr(owner, key, default)

    objective = str(get(get(node, "objective") or {}, "_target_") or "")
    if objective.rsplit(".", 1)[-1] == "ARObjective":
        return
    loss = get(node, "loss") or {}
    if get(loss, "complementary", False):
        schedule = get(get(node, "schedule") or {}, "_target_")
        _require(
            schedule == ScheduleNode._target_,
            "schedule._target_",
            schedule,
            f"{ScheduleNode._target_} with loss.complementary=true (the complement of the mask u < t is the "
            "mask at 1 - t under the linear schedule only): set schedule=linear or loss.complementary=false",
        )
        eps = get(get(node, "time_sampler") or {}, "eps", TimeSamplerNode.eps)
        _require(
            eps < 0.5,
            "time_sampler.eps",
            eps,
            "0 <= eps < 0.5 with loss.complementary=true (t is drawn in [eps, 1 - eps])",
        )
    weight = get(loss, "distill_weight", 0.0)
    if weight:
        attention = get(get(node, "model") or {}, "attention")
        _require(
            attention == "block_causal",
            "model.attention",
            attention,
            f"block_causal with loss.distill_weight={weight} (the student must see the clean left context "
            "the base model sees): set model.attention=block_causal model.block_size=B, or loss.distill_weight=0",
        )
        _require(
            get(node, "lora") is not None,
            "lora",
            None,
            f"LoRA adapters with loss.distill_weight={weight} (the teacher is the model with its adapters off)",
        )


def check_schedule(node: Any, source: str | None = None) -> None:
    """The schedule node against the node of the class it names."""
    target = node.get("_target_") if isinstance(node, dict) else None
    _require(target in SCHEDULE_NODES, "schedule._target_", target, " | ".join(SCHEDULE_NODES))
    check_node(SCHEDULE_NODES[target], node, source)


def max_positions(model: ModelNode | dict[str, Any]) -> int | None:
    """The model's position limit from its config only (``model.config`` or ``config.json``), or None."""
    get = model.get if isinstance(model, dict) else lambda k, d=None: getattr(model, k, d)
    path = Path(str(get("pretrained") or "")) / "config.json"
    # the folder that will be loaded is the truth; model.config (the dry run's architecture) else
    arch = json.loads(path.read_text()) if path.is_file() else get("config")
    if not arch:
        return None
    value = arch.get("max_position_embeddings") or arch.get("n_positions")
    return int(value) if value else None


def check_lengths(model: ModelNode | dict[str, Any], data: Any, sampler: Any) -> None:
    """``data.max_length`` and the sampler's canvas within the model's positions (config.json only)."""
    limit = max_positions(model)
    if limit is None:
        return
    max_length = data["max_length"] if isinstance(data, dict) else data.max_length
    _require(
        max_length <= limit,
        "data.max_length",
        max_length,
        f"1 .. {limit} (the model's max_position_embeddings)",
    )
    gen = sampler["gen_length"] if isinstance(sampler, dict) else sampler.gen_length
    _require(
        gen < limit, "sampler.gen_length", gen, f"1 .. {limit - 1} (the model's positions, prompt included)"
    )


# -- untrusted files ---------------------------------------------------------------------------------
# the groups whose _target_ a file may name, and where the module finds them
TARGET_GROUPS = (
    "objective", "schedule", "time_sampler", "loss", "anneal", "sampler", "data",
    "trainer", "callbacks", "logger",
)  # fmt: skip


@lru_cache(maxsize=1)
def allowed_targets() -> dict[str, frozenset[str]]:
    """{group: the ``_target_`` values its ``conf/<group>/*.yaml`` options name}: the registry of what
    a file may ask to build. ``module`` holds the LightningModule itself."""
    out: dict[str, set[str]] = {"module": {"diffllm.training.module.DiffusionLitModule"}}
    for group in TARGET_GROUPS:
        targets: set[str] = set()
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            _collect_targets(OmegaConf.to_container(OmegaConf.load(path), resolve=False), targets)
        out[group] = targets
    return {k: frozenset(v) for k, v in out.items()}


def _collect_targets(node: Any, into: set[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_" and isinstance(v, str):
                into.add(v)
            else:
                _collect_targets(v, into)
    elif isinstance(node, list):
        for v in node:
            _collect_targets(v, into)


def ALLOWED_TARGETS() -> frozenset[str]:  # noqa: N802 - reads as the constant it is
    return frozenset().union(*allowed_targets().values())


def check_targets(node: Any, source: str, key: str = "") -> None:
    """Every ``_target_`` in ``node`` must be one the registry holds for its group (the first key of
    its path), or the module's; any interpolation (``${...}``) is refused: it would run a resolver."""
    registry = allowed_targets()
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{key}.{k}" if key else str(k)
            if k == "_target_":
                # the deepest key of the path naming a group (module.data._target_ -> data)
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


# Modules that moved (the layout by layer): a ``_target_`` written under an old path names the same
# class under its new one. Files keep their old meaning; the registry only holds today's paths.
MOVED_MODULES = {
    "diffllm.lit_module": "diffllm.training.module",
    "diffllm.objectives": "diffllm.training.objectives",
    "diffllm.callbacks": "diffllm.training.callbacks",
    "diffllm.trainer": "diffllm.training.trainer",
    "diffllm.validation_samples": "diffllm.training.samples",
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


def check_untrusted(
    cfg: dict[str, Any], source: str | Path, *, trust_remote_code: bool = False
) -> dict[str, Any]:
    """A config read from a file (checkpoint hyperparameters, an export card's ``run_config``) ->
    the same values, upgraded (legacy ``prefix_lm``, targets under moved modules) and checked before
    anything is built.

    Refuses (``ConfigError``, naming key and value): a ``_target_`` outside the registry, an
    interpolation, ``model.trust_remote_code: true`` unless ``trust_remote_code`` (the user's own
    command-line choice), and values outside the schema's ranges.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(
            f"refused {source}: its config is a {type(cfg).__name__}, not a mapping of plain values"
        )
    _plain_only(cfg, str(source))
    out = upgrade_targets(cfg)
    check_targets(out, str(source))
    if isinstance(out.get("model"), dict):
        out["model"] = upgrade_model(out["model"])
        if out["model"].get("trust_remote_code") and not trust_remote_code:
            raise ConfigError(
                f"refused {source}: model.trust_remote_code={out['model']['trust_remote_code']!r} would run "
                "code shipped with the model; pass trust_remote_code=true on the command line if you trust it"
            )
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


def node_defaults(node: type) -> dict[str, Any]:
    """A schema node's defaults as plain values (for docs and tests)."""
    assert is_dataclass(node)
    return OmegaConf.to_container(OmegaConf.structured(node))  # type: ignore[return-value]


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
    config), whose nodes are picked; a node an old run config lacks takes the schema's default
    (``objective``: diffusion, ``anneal``: none, ``val_likelihood``: grid of 4, ``seed``: 0).
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


# -- the CLIs (generate, evaluate, export) -----------------------------------------------------------
def check_sampler_overrides(overrides: dict[str, Any], prefix: str = "sampler") -> None:
    """The ``sampler.*`` keys given on a command line, checked alone (before the checkpoint is read):
    the schema's types and ranges of those keys; the combination with the checkpoint's sampler is
    ``SamplerConfig``'s to check."""
    if not overrides:
        return
    names = {f.name for f in fields(SamplerNode)} - {"_target_"}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]} is not a sampler setting; the keys are {sorted(names)}")
    # each key on top of values that accept it: a threshold goes with steps=null
    base = {"steps": None} if overrides.get("threshold") is not None else {}
    check_node(SamplerNode, {**base, **overrides})


def check_positive(values: dict[str, Any]) -> None:
    """Command-line counts that must be >= 1 when set (``batch_size``, ``rows`` ...)."""
    for key, value in values.items():
        if value is None:
            continue
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        _require(ok, key, value, "an integer >= 1" + (" or null" if key != "gen_batch_size" else ""))


def check_card(
    card: dict[str, Any], source: str | Path, *, trust_remote_code: bool = False
) -> dict[str, Any]:
    """An export card (``diffllm.json``) read as data -> the card with targets under moved modules
    upgraded: plain values, registry targets only, its ``run_config`` / ``model`` / ``lora`` /
    ``sampler`` against the schema, and its ``model.trust_remote_code`` refused unless the user
    passed ``trust_remote_code``."""
    if not isinstance(card, dict):
        raise ConfigError(f"refused {source}: its card is a {type(card).__name__}, not a mapping")
    _plain_only(card, str(source))
    card = upgrade_targets(card)
    check_targets(card, str(source))
    if isinstance(card.get("run_config"), dict) and card["run_config"]:
        check_untrusted(card["run_config"], source, trust_remote_code=trust_remote_code)
    model = card.get("model")
    if isinstance(model, dict):
        if model.get("trust_remote_code") and not trust_remote_code:
            raise ConfigError(
                f"refused {source}: model.trust_remote_code={model['trust_remote_code']!r} would run code "
                "shipped with the model; pass trust_remote_code=true on the command line if you trust it"
            )
        check_node(
            ModelNode, {**upgrade_model(model), "pretrained": str(model.get("pretrained") or "")}, str(source)
        )
    if isinstance(card.get("lora"), dict):
        check_node(LoraNode, card["lora"], str(source))
    if isinstance(card.get("sampler"), dict):
        check_node(SamplerNode, card["sampler"], str(source))
    return card
