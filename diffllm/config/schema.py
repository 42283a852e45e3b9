"""The project's config schema: one typed node per config group, the one home of every default and
range, and the checks of a run's config before anything loads.

Every node is a dataclass whose fields are the constructor arguments of the object it builds
(``_target_`` included; the classes it may name are its ``TARGETS``, which is also the registry a
file is checked against: ``diffllm.config.trust``). ``diffllm.config.store`` registers the nodes
with Hydra as ``schema/<group>``; each ``conf/<group>/<option>.yaml`` names its node first in its
defaults list and holds only what differs from it. The sampler's node is derived from the sampler's
own dataclass (``diffllm.diffusion.sampler.SamplerConfig``), where its fields, defaults and ranges
are written once; ``MaskTokenSpec`` (``diffllm.model.load``) likewise.

A composed run config is checked by ``check_run_config`` before anything is loaded: types and
unknown keys (OmegaConf's structured merge), each field's range (each node's ``__post_init__``), then
how the groups go together (``check_combination``). Every error is one line naming the key, the value
and the fix (``ConfigError``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffllm.config.upgrade import upgrade_model
from diffllm.data.prompt_fit import PROMPT_OVERFLOW
from diffllm.data.template import TEMPLATES, TemplateError, get_format
from diffllm.diffusion.likelihood import TIME_GRIDS
from diffllm.diffusion.loss import NORMALISATIONS, RENAMED_NORMALISATIONS, WEIGHTINGS
from diffllm.diffusion.sampler import SamplerConfig, check_field, check_threshold_strategy
from diffllm.model.attention import ATTENTION_MODES
from diffllm.model.blocks import CLEAN_STREAMS, check_block_schedule, check_block_size
from diffllm.model.load import DTYPES, MaskTokenSpec, attention_options, check_attention

# where a key that no node knows is pointed to (the error of an unknown key names it)
SCHEMA_FILE = "diffllm/config/schema.py"


class ConfigError(ValueError):
    """A config value outside its valid range: one line naming key, value and range."""


def _bad(key: str, value: Any, valid: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is out of range; valid: {valid}")


def _require(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise _bad(key, value, valid)


def _check_target(node: Any, group: str) -> None:
    """A node's ``_target_`` is one of the classes its group builds (``TARGETS``)."""
    _require(node._target_ in node.TARGETS, f"{group}._target_", node._target_, " | ".join(node.TARGETS))


def _config_error(check: Any, *args: Any, **kwargs: Any) -> None:
    """``check(*args, **kwargs)``, a lower layer's ValueError (it names the key) as a ``ConfigError``."""
    try:
        check(*args, **kwargs)
    except ValueError as err:
        raise ConfigError(str(err).splitlines()[0]) from None


# -- model -------------------------------------------------------------------------------------------
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")


@dataclass
class ModelNode:
    """``diffllm.model.load.build_diffusion_model`` arguments (the ``model`` group)."""

    pretrained: str = MISSING  # a local Hugging Face folder or a hub id
    attn_implementation: str = "sdpa"
    dtype: str = "float32"
    shift: bool = True  # the logit at position i - 1 predicts token i (the AR head's alignment kept)
    # causal | bidirectional | prefix_lm | block_causal (diffllm.model.attention). prefix_lm: prompt
    # positions attend to the prompt only (bidirectionally), never to the answer canvas; the canvas
    # attends to everything, so the sampler's prefix KV cache is exact (README: the cache costs 9.4
    # exact-match points without it, 0 with it). bidirectional: every position sees every position
    # (LLaDA). block_causal: block diffusion in blocks of block_size. Composes with anneal=linear.
    # (Files written before this key: diffllm.config.upgrade.)
    attention: str = "prefix_lm"
    block_size: int | None = (
        None  # block_causal only: the answer's (final) block size; divides data.answer_pad_to
    )
    # block_causal only: how a clean token attends inside its block, block (whole block) | causal
    # (token-causal, the AR model's attention; needed by loss.ar_weight > 0)
    clean_stream: str = "block"
    # block_causal only, training: [[optimizer_step, block_size], ...] from step 0, ending at block_size
    # (a curriculum from AR: [[0, 1], [150, 2], [300, 4]]); null: block_size throughout. Validation,
    # the sampler and the export use block_size.
    block_schedule: list[list[int]] | None = None
    # add: a new [MASK] row (mean | random | token:<text> init) | reuse: an existing special token
    mask_token: MaskTokenSpec = field(default_factory=MaskTokenSpec)
    train_mask_row: bool = False  # train the [MASK] embedding row beside the adapters
    trust_remote_code: bool = False  # never read from a file: the user's command line only
    # Recompute each decoder block in the backward pass: less activation memory for one more forward
    # pass per step (+50 % compute with a frozen base: 6N instead of 4N FLOPs per token).
    gradient_checkpointing: bool = False
    from_scratch: bool = False  # control run: the same architecture with random weights
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
        # what the loader refuses, refused here, before it loads: a custom attention mask on an
        # implementation that takes none (flash_attention_2), a block size without blocks
        _config_error(check_attention, self.attention, self.attn_implementation)
        _config_error(attention_options, self.attention, self.block_size)
        _require(
            self.clean_stream in CLEAN_STREAMS,
            "model.clean_stream",
            self.clean_stream,
            " | ".join(CLEAN_STREAMS) + " (causal with model.attention=block_causal only)",
        )
        _require(
            self.attention == "block_causal" or self.clean_stream == "block",
            "model.clean_stream",
            self.clean_stream,
            "block unless model.attention=block_causal (set model.attention=block_causal or model.clean_stream=block)",
        )


# -- lora --------------------------------------------------------------------------------------------
@dataclass
class LoraNode:
    """PEFT ``LoraConfig`` keyword arguments (the ``lora`` group); attention projections only
    (``diffllm.model.load`` refuses MLP targets)."""

    r: int = 8
    lora_alpha: int = 16  # the adapters' scale is lora_alpha / r (PEFT's LoraConfig: an int)
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
    # the instruction filters applied, in this order (each rejection counted under its name; empty
    # and too_long always apply); not_a_request is an English heuristic: drop it for a model that
    # chats in another language
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

    TARGETS: ClassVar[tuple[str, ...]] = ("diffllm.data.datamodule.AlpacaDataModule",)
    _target_: str = TARGETS[0]
    path: str = "tatsu-lab/alpaca"  # a hub data set or a local JSON/JSONL file of Alpaca rows
    split: str = "train"
    val_path: str | None = None  # null: the validation rows are split off `path` (val_size)
    val_size: int | float = 500  # a row count (>= 1) or a fraction (< 1) of `path`
    template: str = "alpaca"  # alpaca | short | chat (the model's own chat template) | a format string
    max_length: int = 512
    # EOS padding of every answer to a multiple of this many positions (LLaDA SFT): the model
    # learns to end inside the sampler's canvas. null trains on answer + EOS only.
    answer_pad_to: int | None = None
    batch_size: int = 16
    # Training batches of rows of similar length (transformers' LengthGroupedSampler: shuffled
    # mega-batches of 50 batches, each sorted by length); validation keeps its fixed order.
    group_by_length: bool = False
    eval_batch_size: int | None = None  # null: batch_size
    num_workers: int = 0
    seed: int = 0
    limit_train_rows: int | None = None
    limit_val_rows: int | None = None
    num_sample_prompts: int = 4  # fixed validation prompts the sampler answers (val/exact_match)
    strict: bool = False  # refuse the data on the first unusable row instead of counting it
    report_dir: str | None = None  # where the data report (rows rejected, truncated) is written
    pad_to_multiple_of: int | None = None
    # data=self_generated: how its rows are built (the path and val_path resolvers read it)
    self_generated: SelfGeneratedNode | None = None

    def __post_init__(self) -> None:
        _check_target(self, "data")
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
    """AdamW on the trainable parameters only, linear warm-up then cosine decay to ``min_lr_ratio * lr``
    (``diffllm.training.module.lr_factor``)."""

    lr: float = 3.0e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1

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
@dataclass
class SamplerNode(SamplerConfig):
    """The ``sampler`` group: ``SamplerConfig``'s fields, defaults and ranges (written there, once; see
    its docstring) and the ``_target_`` that builds it."""

    TARGETS: ClassVar[tuple[str, ...]] = ("diffllm.diffusion.sampler.SamplerConfig",)
    _target_: str = TARGETS[0]

    def __post_init__(self) -> None:
        _check_target(self, "sampler")
        _config_error(super().__post_init__)


SAMPLER_FIELDS = tuple(f.name for f in fields(SamplerConfig))


# -- the diffusion objective's parts -----------------------------------------------------------------
@dataclass
class ObjectiveNode:
    """What a training step minimises (``diffllm.training.objectives``; the ``objective`` group)."""

    TARGETS: ClassVar[tuple[str, ...]] = (
        "diffllm.training.objectives.DiffusionObjective",
        "diffllm.training.objectives.ARObjective",
    )
    _target_: str = TARGETS[0]

    def __post_init__(self) -> None:
        _check_target(self, "objective")


AR_OBJECTIVE = ObjectiveNode.TARGETS[1]


@dataclass
class ScheduleNode:
    """A schedule without arguments (``schedule=linear``: alpha(t) = 1 - t; ``schedule=cosine``)."""

    TARGETS: ClassVar[tuple[str, ...]] = (
        "diffllm.diffusion.schedule.LinearSchedule",
        "diffllm.diffusion.schedule.CosineSchedule",
    )
    _target_: str = TARGETS[0]

    def __post_init__(self) -> None:
        _check_target(self, "schedule")


@dataclass
class LogLinearScheduleNode:
    """``schedule=loglinear`` (MDLM): alpha(t) = 1 - (1 - eps) t."""

    TARGETS: ClassVar[tuple[str, ...]] = ("diffllm.diffusion.schedule.LogLinearSchedule",)
    _target_: str = TARGETS[0]
    eps: float = 1.0e-3

    def __post_init__(self) -> None:
        _check_target(self, "schedule")
        _require(0 <= self.eps < 1, "schedule.eps", self.eps, "0 <= eps < 1")


@dataclass
class PolynomialScheduleNode:
    """``schedule=polynomial``: alpha(t) = 1 - t^exponent, w(t) = exponent / t."""

    TARGETS: ClassVar[tuple[str, ...]] = ("diffllm.diffusion.schedule.PolynomialSchedule",)
    _target_: str = TARGETS[0]
    exponent: float = 2.0

    def __post_init__(self) -> None:
        _check_target(self, "schedule")
        _require(self.exponent > 0, "schedule.exponent", self.exponent, "a number > 0")


# the schedule node of each schedule class (the group's targets take different arguments)
SCHEDULE_NODES: dict[str, type] = {
    target: node
    for node in (ScheduleNode, LogLinearScheduleNode, PolynomialScheduleNode)
    for target in node.TARGETS
}


@dataclass
class TimeSamplerNode:
    """``diffllm.diffusion.time`` (the ``time_sampler`` group): t ~ U(eps, 1) i.i.d. per row, or one t
    per stratum of width (1 - eps)/B in random row order (MDLM antithetic sampling)."""

    TARGETS: ClassVar[tuple[str, ...]] = (
        "diffllm.diffusion.time.UniformTimeSampler",
        "diffllm.diffusion.time.AntitheticTimeSampler",
    )
    _target_: str = TARGETS[0]
    eps: float = 1.0e-3

    def __post_init__(self) -> None:
        _check_target(self, "time_sampler")
        _require(0 <= self.eps < 1, "time_sampler.eps", self.eps, "0 <= eps < 1")


@dataclass
class LossNode:
    """``diffllm.diffusion.loss.MaskedDiffusionLoss`` (the ``loss`` group): weight w(t) (``elbo``:
    -alpha'(t) / (1 - alpha(t)); ``uniform``: 1), divided by the ``normalisation``'s count
    (``supervised_tokens``: answer + end token + EOS padding, LLaDA SFT; ``hidden_tokens``;
    ``batch_tokens``: every non-pad token, prompt included)."""

    TARGETS: ClassVar[tuple[str, ...]] = ("diffllm.diffusion.loss.MaskedDiffusionLoss",)
    _target_: str = TARGETS[0]
    weighting: str = "elbo"
    normalisation: str = "supervised_tokens"
    # w of loss = L_diffusion + w * L_AR, L_AR the next-token CE of the clean copy's scored tokens
    # (model.attention=block_causal with model.clean_stream=causal only); 0 = off
    ar_weight: float = 0.0
    # recipe options (issue 18; cross-checks in check_loss_recipe): each row also trained with the
    # complement of its mask (linear schedule only), and KL(base || converted) at the masked scored
    # positions (block_causal only)
    complementary: bool = False
    distill_weight: float = 0.0

    def __post_init__(self) -> None:
        _check_target(self, "loss")
        _require(self.ar_weight >= 0, "loss.ar_weight", self.ar_weight, "a number >= 0 (0 = off)")
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
    """``diffllm.diffusion.annealing.AttentionAnnealing`` (the ``anneal`` group): causal ->
    ``model.attention`` over the first ``steps`` optimizer steps (DiffuLLaMA); 0 = no annealing."""

    TARGETS: ClassVar[tuple[str, ...]] = ("diffllm.diffusion.annealing.AttentionAnnealing",)
    _target_: str = TARGETS[0]
    steps: int = 0

    def __post_init__(self) -> None:
        _check_target(self, "anneal")
        _require(self.steps >= 0, "anneal.steps", self.steps, "an integer >= 0 (0 = no annealing)")


@dataclass
class ValLikelihoodNode:
    """The ELBO estimator of ``val/nll_bound``: a t-grid (``grid``) or Monte Carlo (``stratified``)."""

    num_samples: int = 4
    method: str = "grid"

    def __post_init__(self) -> None:
        _require(self.num_samples >= 1, "val_likelihood.num_samples", self.num_samples, "an integer >= 1")
        _require(self.method in TIME_GRIDS, "val_likelihood.method", self.method, " | ".join(TIME_GRIDS))


@dataclass
class QualityNode:
    """Reference-free answer quality (AR-scored NLL, agreement with AR greedy, length, EOS rate,
    repetition) and quality vs compute: the sampler at ``tokens_per_step`` tokens per step on the first
    ``rows`` prompts (``diffllm.evaluation.quality``)."""

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
    """The end-of-run report (``diffllm.evaluation.report``): NLL bound vs AR NLL, the sampler vs AR
    greedy exact match on ``num_rows`` validation rows."""

    enabled: bool = True
    num_rows: int = 64
    likelihood_samples: int = 8
    # An AR-SFT checkpoint (a run with objective=ar on the same base and data): adds its row, the
    # real price of the conversion. `make train` trains one first and passes it here.
    ar_ckpt_path: str | None = None
    # Validation prompts longer than the model's positions minus sampler.gen_length: truncate_left
    # (cut, counted in the report as prompts_truncated) or error (refuse; the checkpoint is kept).
    prompt_overflow: str = "truncate_left"
    # The gap decomposed: the diffusion model's left-to-right NLL beside the bound and the AR NLL
    # (one forward pass per answer token of each of the num_rows rows; diffllm.diffusion.order).
    l2r_nll: bool = True
    # reference-free quality and quality vs compute (diffllm.evaluation.quality): enabled, rows, tokens_per_step
    quality: QualityNode = field(default_factory=QualityNode)

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

    TARGETS: ClassVar[tuple[str, ...]] = ("diffllm.training.module.DiffusionLitModule",)
    _target_: str = TARGETS[0]
    _recursive_: bool = False
    model: ModelNode = MISSING
    lora: LoraNode | None = None
    data: DataNode = field(default_factory=DataNode)
    objective: ObjectiveNode = field(default_factory=ObjectiveNode)
    schedule: Any = field(default_factory=lambda: {"_target_": ScheduleNode.TARGETS[0]})  # SCHEDULE_NODES
    time_sampler: TimeSamplerNode = field(default_factory=TimeSamplerNode)
    loss: LossNode = field(default_factory=LossNode)
    anneal: AnnealNode = field(default_factory=AnnealNode)
    sampler: SamplerNode = field(default_factory=SamplerNode)
    optimizer: OptimizerNode = field(default_factory=OptimizerNode)
    val_likelihood: ValLikelihoodNode = field(default_factory=ValLikelihoodNode)
    seed: int = 0


MODULE_ARGS = tuple(f.name for f in fields(ModuleNode) if not f.name.startswith("_"))


def _module_wiring() -> dict[str, Any]:
    """``module``: the LightningModule from the run's top-level nodes, handed over as plain values
    (``_recursive_: false``), so that its checkpoint's hyperparameters rebuild the run."""
    return {"_target_": ModuleNode._target_, "_recursive_": False, **{k: f"${{{k}}}" for k in MODULE_ARGS}}


@dataclass
class TrainNode:
    """``conf/train.yaml`` composed: the module's nodes plus the run's own keys.

    ``trainer``, ``callbacks`` and ``logger`` are nodes of Lightning objects (their groups' YAML files
    are the defaults; checked by Lightning and by ``check_trainer``); ``module`` wires the groups into
    ``DiffusionLitModule`` (``MODULE_ARGS``).
    """

    model: ModelNode = MISSING
    lora: LoraNode | None = None
    data: DataNode = field(default_factory=DataNode)
    objective: ObjectiveNode = field(default_factory=ObjectiveNode)
    schedule: Any = field(default_factory=lambda: {"_target_": ScheduleNode.TARGETS[0]})  # SCHEDULE_NODES
    time_sampler: TimeSamplerNode = field(default_factory=TimeSamplerNode)
    loss: LossNode = field(default_factory=LossNode)
    anneal: AnnealNode = field(default_factory=AnnealNode)
    sampler: SamplerNode = field(default_factory=SamplerNode)
    optimizer: OptimizerNode = field(default_factory=OptimizerNode)
    # Validation-time likelihood: t-grid size (or Monte-Carlo samples) for val/nll_bound.
    val_likelihood: ValLikelihoodNode = field(default_factory=ValLikelihoodNode)
    report: ReportNode = field(default_factory=ReportNode)
    module: dict[str, Any] = field(default_factory=_module_wiring)
    trainer: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] | None = None
    logger: dict[str, Any] | None = None
    seed: int = 0
    # Build the model (on the meta device when model.config is given), print PEFT's parameter line, exit.
    dry_run: bool = False
    # Resume: path to a checkpoint written by a previous run (e.g. .../checkpoints/last.ckpt).
    ckpt_path: str | None = None
    # Where everything of this run goes (conf/train.yaml: Hydra's run/sweep folder).
    output_dir: str | None = None
    # The metric `main()` returns to a Hydra sweeper.
    optimized_metric: str | None = "val/nll_bound"


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


# -- checking values against a node ------------------------------------------------------------------
def _omegaconf_error(err: OmegaConfBaseException, source: str | Path | None) -> ConfigError:
    """OmegaConf's error (wrong type, unknown key) as one line naming the key."""
    key = getattr(err, "full_key", None) or "?"
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    if " not in '" in msg:  # an unknown key: a typo, or a key the schema must learn
        msg += f" (the keys and their ranges: {SCHEMA_FILE})"
    return ConfigError(f"refused {source}: {key}: {msg}" if source else f"{key}: {msg}")


def merge_node(schema: type, values: dict[str, Any], source: str | Path | None = None) -> DictConfig:
    """``values`` merged into ``schema``: types and unknown keys checked, ranges not yet."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), values)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, source) from None


def check_node(schema: type, values: dict[str, Any], source: str | Path | None = None) -> Any:
    """``values`` merged into ``schema`` (types, unknown keys) and built (ranges): the schema's object.

    ``source``: the file the values were read from, named in the error (None: the command line).
    """
    merged = merge_node(schema, values, source)
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, source) from None
    except ValueError as err:  # ConfigError, or a lower layer's ValueError naming its key
        msg = str(err).splitlines()[0]
        raise ConfigError(f"refused {source}: {msg}" if source else msg) from None


def node_defaults(node: type) -> dict[str, Any]:
    """A schema node's defaults as plain values (for docs and tests)."""
    assert is_dataclass(node)
    return OmegaConf.to_container(OmegaConf.structured(node))  # type: ignore[return-value]


# -- checking the run config -------------------------------------------------------------------------
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
    """The composed ``train`` config checked against the schema, each node, then the groups together
    (``check_combination``); raises ``ConfigError`` (one line) before anything loads."""
    values = plain_for_check(cfg)
    try:  # a legacy key given on the command line (+model.prefix_lm=true)
        if isinstance(values.get("model"), dict):
            values["model"] = upgrade_model(values["model"])
        if isinstance(values.get("module"), dict) and isinstance(values["module"].get("model"), dict):
            values["module"]["model"] = upgrade_model(values["module"]["model"])
    except ValueError as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    node = check_node(TrainNode, values)
    check_schedule(node.schedule)
    check_trainer(node.trainer)
    check_combination(node)
    check_block_recipe(node.model, node.data, node.loss, node.trainer.get("max_steps"))
    check_loss_recipe(node)
    return node


def check_block_recipe(model: Any, data: Any, loss: Any, max_steps: int | None = None) -> None:
    """The block-diffusion recipe's keys together (issue 18, options 1 and 2), one line each:

    * ``model.block_schedule``: a block model's, from step 0, steps increasing, every size dividing
      ``data.answer_pad_to``, ending at ``model.block_size``, and reaching it before ``trainer.max_steps``
      (the final size is the one validation, best.ckpt, the sampler and the export use: the run must
      train at it). The sampler never meets a curriculum size (it always decodes at the final one),
      so the sampler's keys are checked against ``model.block_size`` alone;
    * ``loss.ar_weight > 0``: needs ``model.attention=block_causal`` with ``model.clean_stream=causal``
      (the AR loss reads the clean copy, which must not see the token it predicts).

    Checked for ``objective=ar`` too, which ignores all three (it trains the causal model): ``make
    train`` passes the same ARGS to both runs, so a bad recipe stops before the baseline trains.
    ``model``, ``data``, ``loss``: typed nodes or plain dicts (the module's arguments).
    """

    def get(node: Any, key: str, default: Any = None) -> Any:
        return node.get(key, default) if isinstance(node, dict) else getattr(node, key, default)

    attention = get(model, "attention")
    schedule = get(model, "block_schedule")
    block_size = get(model, "block_size") if attention == "block_causal" else None
    try:
        check_block_schedule(schedule, block_size, get(data, "answer_pad_to"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if schedule and max_steps is not None and max_steps > 0 and schedule[-1][0] >= max_steps:
        raise ConfigError(
            f"model.block_schedule={[list(p) for p in schedule]} reaches the final block size at step "
            f"{schedule[-1][0]}, not before trainer.max_steps={max_steps}: the run would never train at the size it "
            "is validated and sampled at; start the last pair earlier or raise trainer.max_steps"
        )
    ar_weight = get(loss, "ar_weight", 0.0) or 0.0
    clean_stream = get(model, "clean_stream", "block")
    if ar_weight > 0 and (attention != "block_causal" or clean_stream != "causal"):
        raise ConfigError(
            f"loss.ar_weight={ar_weight} needs model.attention=block_causal with model.clean_stream=causal "
            f"(got {attention}, {clean_stream}): the AR loss reads the clean copy, which must not see the token "
            "it predicts; set both, or loss.ar_weight=0"
        )


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


def check_combination(run: TrainNode) -> None:
    """How the groups go together, checked before anything loads (one line naming the keys and the fix).

    A block model (``model.attention=block_causal``) is checked by ``check_block_model``: its sampler,
    its answer padding and annealing against its blocks. (A k of the report's quality-vs-compute grid
    whose step count the blocks do not divide is not refused: the sweep keeps it as a ``skipped`` row
    with the reason, ``diffllm.evaluation.sweep``.)
    ``objective=ar`` trains the causal model whatever the model node says, so none of this applies
    to it (``make train`` passes the same ARGS to the AR-SFT run and the diffusion run).
    """
    if run.objective._target_ == AR_OBJECTIVE or run.model.attention != "block_causal":
        return
    check_block_model(
        run.model.block_size, run.sampler, answer_pad_to=run.data.answer_pad_to, anneal_steps=run.anneal.steps
    )


def check_block_model(
    block_size: int,
    sampler: SamplerConfig,
    *,
    answer_pad_to: int | None = None,
    anneal_steps: int = 0,
) -> None:
    """A block model of block size b decodes its own blocks, so:

    * ``sampler.block_length`` is null or b, ``sampler.cache`` none or block (exact);
    * b divides ``sampler.gen_length``, and the blocks divide ``sampler.steps`` (schedule mode);
    * b divides ``data.answer_pad_to`` (``diffllm.model.blocks.check_block_size``);
    * no attention annealing (its mask is over one copy; a block model trains on two).

    Every rule broken is named in one ``ConfigError`` line with its fix. The step rules are the
    sampler's own (``SamplerConfig`` built with ``block_length = b``).
    """
    b, gen = block_size, sampler.gen_length
    values = {f: getattr(sampler, f) for f in SAMPLER_FIELDS}
    problems = []
    if sampler.block_length not in (None, b):
        problems.append(f"sampler.block_length={sampler.block_length}: set null (or {b})")
    if sampler.cache not in ("none", "block"):
        problems.append(f"sampler.cache={sampler.cache}: set block (exact) or none")
    if gen % b:
        problems.append(f"sampler.gen_length={gen} is not a whole number of blocks: set a multiple of {b}")
    elif sampler.threshold is None and sampler.resolved_steps % (gen // b):
        problems.append(
            f"sampler.steps={sampler.resolved_steps} cannot be spread evenly over {gen // b} blocks: "
            f"set a multiple of {gen // b}"
        )
    try:
        check_block_size(b, answer_pad_to)
    except ValueError:
        problems.append(
            f"data.answer_pad_to={answer_pad_to} is not a whole number of blocks: set a multiple of {b}"
        )
    if anneal_steps:
        problems.append(
            f"anneal.steps={anneal_steps}: annealing's mask is over one copy of the answer, a block model "
            "trains on a clean and a noised copy; set anneal=none"
        )

    if problems:
        raise ConfigError(
            f"model.attention=block_causal with model.block_size={b} decodes blocks of {b}: "
            + "; ".join(problems)
        )
    # whatever the rules above let through, the sampler itself must take (its own checks, once)
    _config_error(SamplerConfig, **{**values, "block_length": b})


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


# -- the CLIs (generate, evaluate, export) -----------------------------------------------------------
def check_sampler_overrides(overrides: dict[str, Any], prefix: str = "sampler") -> None:
    """The ``sampler.*`` keys given on a command line, checked alone (before the checkpoint is read):
    known keys, their types, each one's range, and a threshold against a strategy given with it. The
    combination with the checkpoint's sampler is ``SamplerConfig.with_overrides``'s to check."""
    if not overrides:
        return
    unknown = sorted(set(overrides) - set(SAMPLER_FIELDS))
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]} is not a sampler setting; the keys are {sorted(SAMPLER_FIELDS)}"
        )
    typed = merge_node(SamplerNode, overrides)
    for name in overrides:
        _config_error(check_field, name, typed[name])
    if typed.threshold is not None and "strategy" in overrides:
        _config_error(check_threshold_strategy, typed.strategy, typed.threshold)


def check_positive(values: dict[str, Any]) -> None:
    """Command-line counts that must be >= 1 when set (``batch_size``, ``rows`` ...)."""
    for key, value in values.items():
        if value is None:
            continue
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        _require(ok, key, value, "an integer >= 1" + (" or null" if key != "gen_batch_size" else ""))
