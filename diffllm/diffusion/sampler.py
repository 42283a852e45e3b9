"""The denoising sampler: fill an all-[MASK] answer canvas over a number of steps.

Layout of the canvas (B, P + G): left-padded prompts of P columns, then G = ``gen_length`` answer
positions, all [MASK] at the start. The answer is split into G / b blocks of b = ``block_length``
positions, decoded left to right (LLaDA semi-autoregressive sampling); inside a block, every step

1. runs the model on the canvas and reads the logits of the block's still-masked positions,
2. lets the strategy (``strategies.STRATEGIES``) propose a token x_i and a confidence c_i there,
3. commits some of them, chosen by the confidence:

   * schedule (default): the n masked positions of the block at its start are spread evenly over
     its S = steps / num_blocks steps, k_s = floor(n / S) + [s < n mod S] (LLaDA
     ``get_num_transfer_tokens``); the last step commits whatever is left;
   * threshold τ (Fast-dLLM parallel decoding): every masked position with c_i > τ, at least the
     single most confident one; the block ends when it has no [MASK] left.

The batch advances together: a step is one model call, one LM-head call and one strategy call
(``propose``) for every row; which positions each row commits (``choose_positions``: per-row counts
or the threshold, over a (B, b) mask of the still-masked positions) is tensor arithmetic, with no
Python loop over rows (only sampling's random draws loop, because every row owns its generator).

Committed tokens are never changed again unless ``remask`` is on, the prompt is never changed, and
the [MASK] token itself is never proposed, so the output holds no [MASK].

Remasking (``remask``, ReMDM inside the block): after a step's commits, a token the strategy
committed at an earlier step of the *current* block whose probability under this step's logits has
fallen below ``remask_bound`` is hidden again, to be committed again with the context it now has.
A block may take at most ``remask_steps`` steps more than it could without (schedule: S + extra,
the steps after the schedule's last commit everything left; threshold: n + extra for its n [MASK]s
at the start), and a row only hides what its remaining steps can commit again. A block, once the
sampler has moved past it, never changes: the exact block cache and ``fill_after_eos`` rely on it
(with ``fill_after_eos`` an EOS is never hidden again: the EOS it filled would lose its cause).

Options: classifier-free guidance (LLaDA): a second pass with the prompt replaced by [MASK],
``logits = uncond + (cfg_scale + 1) * (cond - uncond)``; ``eos_penalty`` lowers c_i where x_i is
EOS; ``fill_after_eos`` turns every [MASK] after a committed EOS into EOS.

Future blocks (``future_blocks``): "visible" runs the model on the whole canvas, later blocks as
[MASK] (LLaDA, Fast-dLLM); "hidden" runs it on ``[0, end of the current block)`` only, so block k
is denoised as if the canvas ended there (the block-causal view of block diffusion). A model
fine-tuned on answers of at most b tokens has only seen canvases of at most b positions; on a
long canvas it sees hundreds of [MASK]s it was never trained on, while "hidden" with
``block_length=b`` shows it the canvas it knows at every G. With ``fill_after_eos`` the blocks
after the answer's EOS are filled without a forward pass.

Prefix KV cache (``cache="prefix"``, Fast-dLLM): at the start of each block the whole canvas is run
once and the keys/values of everything before the block are kept; the block's later steps run
only [block + suffix] on top of them. The cached prefix was computed while the block was still
masked, so with bidirectional attention this is an approximation; it is exact for a causal model,
and for the prompt of a prefix-LM model (``model.attention=prefix_lm``: the prompt never attends to
the canvas): exact in the first block, whose prefix is the prompt; a later block's prefix holds
committed answer blocks, which attend to the block being decoded, so there it stays approximate.

Dual KV cache (``cache="dual"``, Fast-dLLM): the same refresh at the start of each block, but the
keys/values of the later blocks (the suffix) are kept too, so a later step runs only the block
itself (b + shift positions) against prefix + suffix. Approximate for full attention (both sides
were computed while the block was masked); the benchmark measures its exact-match cost.

Block-diffusion models (``DiffusionLM.block_size``, ``diffllm.model.blocks``) are decoded in
their own blocks (``block_length`` null becomes the model's block size) with block-causal
attention: the prompt, the committed blocks (clean) and the current block, never a later one.
``cache="block"`` is exact: a committed block's clean keys/values never change, so they are computed
once, appended, and every later step runs only the current block (``_BlockCausalDenoiser``).

Self-speculative decoding (``mode="speculative"``, ``diffllm.diffusion.speculative``): the model
drafts each block (``draft``: one factorised pass, or this sampler's block loop), a causal pass of
the ``verifier`` (``base``: the AR model, adapters off; ``self``: the model's causal clean stream)
commits the longest agreeing prefix and its own next token; greedy, the output is the verifier's.

Batch rows never interact: padding is masked out and position ids restart at every row's first
real token, each row draws from its own ``torch.Generator`` seeded with ``seed``, and a row draws
nothing at steps where its block is already full, so a row's answer is the one it gets alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from diffllm.data.collate import left_pad, truncate_at_eos
from diffllm.diffusion.speculative import (
    DRAFTS,
    MODES,
    VERIFIERS,
    SpeculativeOutput,
    check_speculative,
    speculative_generate,
)
from diffllm.diffusion.strategies import (
    STRATEGIES,
    THRESHOLD_ON,
    TokenSampling,
    choose_positions,
    token_probability,
)
from diffllm.diffusion.trajectory import StepFrame, Trajectory, TrajectoryStep

# the sampler's KV-cache modes (see the module docstring) and what a block sees of the blocks after it
CACHE_MODES = ("none", "prefix", "dual", "block")
FUTURE_MODES = ("visible", "hidden")
# the strategies that take a threshold (strategies.THRESHOLD_ON says what tau is compared with)
THRESHOLD_STRATEGIES = tuple(THRESHOLD_ON)

# One range per field, each checked alone: (test, the valid values in words). How the fields go
# together is ``SamplerConfig.check_combination``'s.
FIELD_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "gen_length": (lambda v: v >= 1, "an integer >= 1"),
    "steps": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "block_length": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "strategy": (lambda v: v in STRATEGIES, " | ".join(STRATEGIES)),
    "temperature": (lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": (lambda v: v is None or v >= 0, "an integer >= 0 or null (0/null = off)"),
    "top_p": (lambda v: v is None or 0 < v <= 1, "0 < top_p <= 1 or null"),
    "threshold": (lambda v: v is None or 0 < v <= 1, "0 < threshold <= 1 or null"),
    "cache": (lambda v: v in CACHE_MODES, " | ".join(CACHE_MODES)),
    "cfg_scale": (lambda v: v >= 0, "a number >= 0 (0 = no guidance)"),
    "future_blocks": (lambda v: v in FUTURE_MODES, " | ".join(FUTURE_MODES)),
    "remask_bound": (lambda v: 0 < v <= 1, "a probability in (0, 1]"),
    "remask_steps": (lambda v: v >= 1, "an integer >= 1"),
    "mode": (lambda v: v in MODES, " | ".join(MODES)),
    "verifier": (lambda v: v in VERIFIERS, " | ".join(VERIFIERS)),
    "draft": (lambda v: v in DRAFTS, " | ".join(DRAFTS)),
}


def check_field(name: str, value: Any) -> None:
    """``value`` against ``FIELD_RANGES[name]``: a ValueError naming ``sampler.<name>``, value and range."""
    if name in FIELD_RANGES:
        ok, valid = FIELD_RANGES[name]
        try:
            fits = bool(ok(value))
        except TypeError:  # a value of the wrong type (the config layer's typed node says which)
            fits = False
        if not fits:
            raise ValueError(f"sampler.{name}={value!r} is out of range; valid: {valid}")


def check_threshold_strategy(strategy: str, threshold: float | None) -> None:
    """A threshold needs a strategy whose confidence is a probability (``THRESHOLD_STRATEGIES``)."""
    if threshold is not None and strategy not in THRESHOLD_STRATEGIES:
        raise ValueError(
            f"sampler.strategy={strategy!r} cannot take sampler.threshold={threshold}: its confidence is not "
            "a probability (entropy's is <= 0, random's a uniform draw), so the threshold would never fire; "
            f"valid: strategy {' | '.join(THRESHOLD_STRATEGIES)}, or threshold=null"
        )


@dataclass
class SamplerConfig:
    """Sampler settings: the one list of the sampler's fields and defaults.

    The field names are the Hydra keys of the ``sampler`` node (``conf/sampler/*.yaml``); the config
    layer's node is derived from this class (``diffllm.config.schema.SamplerNode``). Every field's
    range is checked alone (``FIELD_RANGES``), then how they go together (``check_combination``);
    errors are ValueErrors naming the ``sampler.*`` key, the value and the fix.
    """

    gen_length: int = 64  # answer positions G
    steps: int | None = None  # denoising steps in total (None = gen_length); schedule mode only
    block_length: int | None = None  # semi-AR block size (None = gen_length: one block); divides gen_length
    strategy: str = "low_confidence"  # key of strategies.STRATEGIES: left_to_right | random | low_confidence | margin | entropy
    temperature: float = 0.0  # 0 = greedy argmax
    top_k: int | None = None
    top_p: float | None = None
    threshold: float | None = None  # τ: commit all c_i > τ (at least one), no schedule (steps=None)
    cache: str = "none"  # "none" | "prefix" | "dual" (full-attention models) | "block" (block models, exact)
    cfg_scale: float = 0.0  # classifier-free guidance: uncond + (scale + 1) * (cond - uncond); 0 = off
    eos_penalty: float = 0.0  # subtracted from c_i where x_i is EOS
    # schedule mode: skip a block's remaining steps once no row has a [MASK] in it (a threshold block
    # always ends once full; stop_early=false keeps nfe == steps for fair speed comparisons)
    stop_early: bool = True
    fill_after_eos: bool = False  # every [MASK] after a committed EOS becomes EOS
    # "visible": the model sees the whole canvas, later blocks as [MASK] (LLaDA, Fast-dLLM);
    # "hidden": it sees only the prompt, the committed blocks and the current block (block-causal
    # view, as block diffusion): a model trained on short answers then never faces a canvas longer
    # than one block, and a long budget costs what the answer needs.
    future_blocks: str = "visible"
    # ReMDM inside the current block: a token the strategy committed at an earlier step of the block
    # is hidden again when its probability under a later step's logits is below remask_bound; a
    # block may take up to remask_steps steps more than it could without (schedule: S + remask_steps;
    # threshold: n + remask_steps, n its [MASK]s at the start). Committed blocks never change.
    remask: bool = False
    remask_bound: float = 0.1
    remask_steps: int = 4
    # "denoise": this sampler; "speculative": the model drafts each block, a causal verifier commits the
    # longest prefix it agrees with and its own next token (diffllm.diffusion.speculative). verifier:
    # "base" (the AR model, adapters off) | "self" (the causal clean stream); draft: "single" (one
    # factorised pass per draft) | "denoise" (this sampler's block loop: steps or threshold)
    mode: str = "denoise"
    verifier: str = "base"
    draft: str = "single"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_field(f.name, getattr(self, f.name))
        self.check_combination()

    def check_combination(self) -> None:
        """How the fields go together: blocks divide the canvas, steps spread evenly over the blocks,
        a threshold replaces the step count and needs a probability-like confidence; speculative
        decoding samples only from a single-pass draft (``speculative.check_speculative``)."""
        if self.mode == "speculative":
            check_speculative(self)
        b = self.resolved_block_length
        if not 1 <= b <= self.gen_length or self.gen_length % b:
            raise ValueError(
                f"sampler.block_length={self.block_length} must divide gen_length={self.gen_length}; "
                f"set block_length to a divisor of {self.gen_length} (or null for one block)"
            )
        if self.threshold is not None:
            check_threshold_strategy(self.strategy, self.threshold)
            if self.steps is not None:
                raise ValueError(
                    f"sampler.steps={self.steps} is unused with threshold={self.threshold}: a block ends "
                    "when it has no [MASK] left; set steps=null (or threshold=null to use the schedule)"
                )
            return
        steps = self.resolved_steps
        if steps % self.num_blocks:
            raise ValueError(
                f"sampler.steps={steps} cannot be spread evenly over {self.num_blocks} blocks "
                f"(gen_length={self.gen_length}, block_length={b}); set steps to a positive "
                f"multiple of {self.num_blocks}"
            )
        if steps > self.gen_length:
            raise ValueError(
                f"sampler.steps={steps} > gen_length={self.gen_length} would spend forward passes "
                f"that commit nothing; set steps <= {self.gen_length}"
            )

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> SamplerConfig:
        """This config with the fields in ``overrides`` replaced, validated (``sampler.*`` on a
        command line, or keyword overrides from Python); ``self`` when there is none.

        Setting ``threshold`` without ``steps`` drops ``self.steps``: a threshold sampler takes no
        step count, so ``sampler.threshold=0.9`` works on a checkpoint whose config fixes the steps.
        Raises ``ValueError`` naming unknown keys or the inconsistent setting.
        """
        overrides = dict(overrides or {})
        if not overrides:
            return self
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown sampler setting(s) {unknown}; the sampler keys are {sorted(fields)}")
        if overrides.get("threshold") is not None and "steps" not in overrides:
            overrides["steps"] = None
        try:
            return dataclasses.replace(self, **overrides)
        except (ValueError, TypeError) as err:
            raise ValueError(f"sampler settings {overrides}: {err}") from None

    @property
    def resolved_block_length(self) -> int:
        return self.gen_length if self.block_length is None else int(self.block_length)

    @property
    def resolved_steps(self) -> int:
        return self.gen_length if self.steps is None else int(self.steps)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.resolved_block_length

    @property
    def steps_per_block(self) -> int | None:
        """Schedule steps S per block; None with a threshold (data-dependent, at most b)."""
        return None if self.threshold is not None else self.resolved_steps // self.num_blocks

    @property
    def sampling(self) -> TokenSampling:
        return TokenSampling(self.temperature, self.top_k, self.top_p)


@dataclass
class SampleOutput:
    """What ``generate`` returns."""

    tokens: list[list[int]]  # answers, truncated at the first EOS (EOS removed)
    canvas: torch.Tensor  # (B, gen_length) the final answer canvas, EOS and all
    nfe: int  # network evaluations on the batch; a CFG step counts 2 (cond + uncond)
    steps: int  # denoising steps taken (forward rounds)
    trajectories: list[Trajectory] | None = None


def transfer_schedule(num_masked: int, steps: int) -> list[int]:
    """k_s = floor(n / S) + [s < n mod S] for s < S: n commits spread evenly, sum k_s = n."""
    base, extra = divmod(num_masked, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


def _device(module: nn.Module) -> torch.device:
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class _Denoiser:
    """Runs the model and hands back the hidden states that predict the current block.

    ``hidden_states[:, j]`` (rows 0..B-1 conditional, B..2B-1 unconditional under CFG) predicts canvas
    position ``lo + j``. With the prefix cache the first call of a block runs the whole canvas and
    keeps the KV of positions < ``lo - shift``; later calls run only ``[lo - shift, L)`` on it.
    """

    def __init__(
        self, dlm: nn.Module, config: SamplerConfig, prompt_mask: torch.Tensor, canvas_mask: torch.Tensor
    ) -> None:
        self.dlm = dlm
        self.canvas_mask = canvas_mask  # (B, P + G) True on the answer canvas (model.attention=prefix_lm hides it from the prompt)
        self.shift = int(dlm.shift)
        self.guided = config.cfg_scale > 0  # classifier-free guidance: a second, unconditional pass
        self.use_cache = config.cache == "prefix"
        self.prompt_mask = prompt_mask.bool()  # (B, P)
        self.cache = None
        self.start = 0

    def new_block(self) -> None:
        self.cache = None
        self.start = 0

    def __call__(
        self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, lo: int, hi: int
    ) -> torch.Tensor:
        canvas_mask = self.canvas_mask[:, : x.shape[1]]
        if self.guided:  # unconditional copy: the prompt's real tokens become [MASK]
            uncond = x.clone()
            prompt = uncond[:, : self.prompt_mask.shape[1]]
            prompt[self.prompt_mask] = self.dlm.mask_id
            x = torch.cat([x, uncond])
            attention_mask = torch.cat([attention_mask, attention_mask])
            position_ids = torch.cat([position_ids, position_ids])
            canvas_mask = torch.cat([canvas_mask, canvas_mask])
        # canvas over all keys (the cached prefix and the new tokens): model.attention decides its use
        kwargs: dict = {"use_cache": False, "canvas_mask": canvas_mask}
        if self.use_cache:
            if self.cache is None:
                self.cache = DynamicCache(config=self.dlm.base.config)
                self.start = 0
            kwargs.update(cache=self.cache, use_cache=True)
        start = self.start
        hidden_states = self.dlm.hidden_states(
            x[:, start:], attention_mask, position_ids=position_ids[:, start:], **kwargs
        )  # (B or 2B, L - start, H); the mask covers cache + new tokens
        if self.use_cache:  # keep only the prefix before the block (the source of its first token)
            self.start = lo - self.shift
            self.cache.crop(self.start - self.cache.get_seq_length())
        return hidden_states[:, lo - self.shift - start : hi - self.shift - start]

    def block_logits(self, hidden_states: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """(B, b, V) float32 logits of every row's block in one LM-head call, CFG applied, [MASK] banned."""
        logits = self.dlm.lm_head(hidden_states).float()
        if self.guided:
            batch = hidden_states.shape[0] // 2
            cond, uncond = logits[:batch], logits[batch:]
            logits = uncond + (cfg_scale + 1.0) * (cond - uncond)
        logits[..., self.dlm.mask_id] = float("-inf")
        return logits


def _unconditional_rows(
    x: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    mask_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CFG: the rows followed by their unconditional copies (the prompt's real tokens become [MASK])."""
    uncond = x.clone()
    prompt = uncond[:, : prompt_mask.shape[1]]
    prompt[prompt_mask] = mask_id
    return torch.cat([x, uncond]), torch.cat([attention_mask, attention_mask]), torch.cat([position_ids] * 2)


def _drop_columns(cache: DynamicCache, lo: int, hi: int) -> None:
    """Remove key/value columns [lo, hi) from every layer of ``cache`` (the dual cache's hole)."""
    for layer in cache.layers:
        layer.keys = torch.cat([layer.keys[..., :lo, :], layer.keys[..., hi:, :]], dim=-2)
        layer.values = torch.cat([layer.values[..., :lo, :], layer.values[..., hi:, :]], dim=-2)


class _DualCacheDenoiser(_Denoiser):
    """Dual KV cache (Fast-dLLM): prefix and suffix kept, refreshed once per block.

    The first call of a block runs the whole visible canvas once and keeps the keys/values of every
    column but the queries' ``[lo - shift, hi)``; later calls run only those b + shift columns on
    top of them (the cache holds prefix then suffix; RoPE is already in the keys, so only the mask
    has to follow the new order). Approximate for full attention: the cached prefix and suffix were
    computed while the block was still masked.
    """

    def __call__(
        self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, lo: int, hi: int
    ) -> torch.Tensor:
        canvas_mask = self.canvas_mask[:, : x.shape[1]]
        if self.guided:
            x, attention_mask, position_ids = _unconditional_rows(
                x, attention_mask, position_ids, self.prompt_mask, self.dlm.mask_id
            )
            canvas_mask = torch.cat([canvas_mask, canvas_mask])
        q_lo = lo - self.shift
        if self.cache is None:  # refresh: the whole canvas, then cut the block's columns out
            self.cache = DynamicCache(config=self.dlm.base.config)
            hidden = self.dlm.hidden_states(
                x, attention_mask, canvas_mask, position_ids=position_ids, cache=self.cache, use_cache=True
            )
            _drop_columns(self.cache, q_lo, hi)
            return hidden[:, q_lo : hi - self.shift]
        order = torch.cat([torch.arange(q_lo), torch.arange(hi, x.shape[1]), torch.arange(q_lo, hi)])
        order = order.to(x.device)  # key order: cached prefix, cached suffix, then the new columns
        kept = self.cache.get_seq_length()
        hidden = self.dlm.hidden_states(
            x[:, q_lo:hi],
            attention_mask[:, order],
            canvas_mask[:, order],  # model.attention decides its use (prefix_lm: the prompt skips it)
            position_ids=position_ids[:, q_lo:hi],
            cache=self.cache,
            use_cache=True,
        )
        self.cache.crop(kept - self.cache.get_seq_length())
        return hidden[:, : hi - lo]


class _BlockCausalDenoiser(_Denoiser):
    """The denoiser of a block-diffusion model (``DiffusionLM.block_size``): block-causal attention.

    The model sees the prompt, the committed blocks (clean) and the current block (noised), never a
    later block. Without a cache every call runs all of that with the block-causal mask. With
    ``cache="block"`` (exact): a committed block's clean keys/values never change, so they are
    computed once, in the first call of the next block, which runs [the newly committed block
    (clean), the current block (noised)] together on top of the cache; every later call of a block
    runs the current block alone. With shift the first position of a block is predicted from the
    hidden state of the last clean column before it, kept from the call that computed it.
    """

    def __init__(
        self, dlm: nn.Module, config: SamplerConfig, prompt_mask: torch.Tensor, canvas_mask: torch.Tensor
    ) -> None:
        super().__init__(dlm, config, prompt_mask, canvas_mask)
        self.use_cache = config.cache == "block"
        self.block_size = int(dlm.block_size)
        self.cached = 0  # columns whose clean keys/values are in the cache
        self.source: torch.Tensor | None = None  # (B', H) hidden state of column cached - 1

    def new_block(self) -> None:  # the cache lives across blocks
        pass

    def __call__(
        self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, lo: int, hi: int
    ) -> torch.Tensor:
        x, attention_mask, position_ids = x[:, :hi], attention_mask[:, :hi], position_ids[:, :hi]
        canvas_mask = self.canvas_mask[:, :hi]
        if self.guided:
            x, attention_mask, position_ids = _unconditional_rows(
                x, attention_mask, position_ids, self.prompt_mask, self.dlm.mask_id
            )
            canvas_mask = torch.cat([canvas_mask, canvas_mask])
        start = self.cached if self.use_cache else 0
        kwargs: dict = {"use_cache": False}
        if self.use_cache:
            if self.cache is None:
                self.cache = DynamicCache(config=self.dlm.base.config)
            kwargs = {"cache": self.cache, "use_cache": True}
        # model.attention=block_causal builds the mask of the queries [start, hi) over the keys [0, hi)
        hidden = self.dlm.hidden_states(
            x[:, start:], attention_mask, canvas_mask, position_ids=position_ids[:, start:], **kwargs
        )  # (B', hi - start, H)
        if self.use_cache:
            self.cache.crop(lo - self.cache.get_seq_length())  # keep the clean columns only
            if start < lo:
                self.source = hidden[:, lo - 1 - start]
            self.cached = lo
        if not self.shift:
            return hidden[:, lo - start :]
        if start < lo:
            return hidden[:, lo - 1 - start : hi - 1 - start]
        return torch.cat([self.source[:, None], hidden[:, : hi - lo - 1]], dim=1)


def block_config(config: SamplerConfig, block_size: int | None) -> SamplerConfig:
    """A block model decodes its own blocks: ``block_length`` null becomes ``block_size``; another refused."""
    if block_size is None or config.block_length == block_size:
        return config
    if config.block_length is not None:
        raise ValueError(
            f"sampler.block_length={config.block_length} differs from the model's block_size={block_size}: a "
            f"block-diffusion model decodes the blocks it was trained on; set sampler.block_length=null or {block_size}"
        )
    return dataclasses.replace(config, block_length=block_size)


def make_denoiser(
    dlm: nn.Module, config: SamplerConfig, prompt_mask: torch.Tensor, canvas_mask: torch.Tensor
) -> _Denoiser:
    """The denoiser for this model and ``config.cache``; refuses a cache the model cannot use."""
    block_model = getattr(dlm, "block_size", None) is not None
    if block_model != (config.cache == "block") and config.cache != "none":
        fix = "cache=block (exact) or cache=none" if block_model else "cache=prefix, dual or none"
        kind = (
            f"a block-diffusion model (block_size={dlm.block_size})"
            if block_model
            else "a full-attention model"
        )
        raise ValueError(f"sampler cache={config.cache!r} does not fit {kind}; use {fix}")
    if block_model:
        return _BlockCausalDenoiser(dlm, config, prompt_mask, canvas_mask)
    if config.cache == "dual":
        return _DualCacheDenoiser(dlm, config, prompt_mask, canvas_mask)
    return _Denoiser(dlm, config, prompt_mask, canvas_mask)


@dataclass
class Proposal:
    """The strategy's proposal for every row's current block, all (B, b)."""

    tokens: torch.Tensor  # token ids x_i (meaningful where the position is still [MASK])
    confidence: torch.Tensor  # float64 c_i, EOS penalty applied
    # float64 p_i(x_i), EOS penalty applied: what a threshold is compared with for a strategy whose
    # score is an order, not a probability (``strategies.THRESHOLD_ON``: left_to_right); None: c_i
    probability: torch.Tensor | None = None


def propose(
    block_logits: torch.Tensor,
    masked: torch.Tensor,
    config: SamplerConfig,
    generators: list[torch.Generator],
    eos_id: int,
) -> Proposal:
    """One strategy call for the whole batch: x_i and c_i at every position of the block.

    ``block_logits`` (B, b, V); ``masked`` (B, b) the positions still [MASK]: the only ones where a
    row draws from its generator, so it draws what it would draw alone. ``c_i -= eos_penalty`` where
    x_i is EOS.
    """
    strategy = STRATEGIES[config.strategy]
    confidence, tokens = strategy(block_logits, config.sampling, generators, masked)  # (B, b), (B, b)
    probability = None
    if config.threshold is not None and THRESHOLD_ON.get(config.strategy) == "probability":
        probability = token_probability(block_logits, config.sampling, tokens)  # (B, b)
    if config.eos_penalty:
        penalty = config.eos_penalty * (tokens == eos_id).double()
        confidence = confidence - penalty
        probability = None if probability is None else probability - penalty
    return Proposal(tokens=tokens, confidence=confidence, probability=probability)


def schedule_counts(num_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, S) ``transfer_schedule`` of every row: k_s = floor(n / S) + [s < n mod S]."""
    base, extra = num_masked // steps, num_masked % steps  # (B,)
    return base[:, None] + (torch.arange(steps, device=num_masked.device)[None] < extra[:, None]).long()


@dataclass
class BlockPlan:
    """How many steps a block may take, and how many commits each schedule step makes.

    ``schedule`` (B, S): the schedule's k_s per row (None with a threshold); ``budget`` (B,): the
    steps the row's block may take in all (remasking's extra steps included); ``max_steps``: the
    largest budget, the length of the block's step loop.
    """

    schedule: torch.Tensor | None
    budget: torch.Tensor
    max_steps: int

    def must_run(self, step: int) -> bool:
        """A schedule step runs even when no row has a [MASK] left (``stop_early=false``: nfe = steps)."""
        return self.schedule is not None and step < self.schedule.shape[1]


def plan_block(masked: torch.Tensor, config: SamplerConfig) -> BlockPlan:
    """The plan of a block whose still-masked positions at its start are ``masked`` (B, b).

    Schedule: S steps (+ ``remask_steps`` with remasking), k_s = ``schedule_counts``. Threshold: a
    row's block takes at most one step per [MASK] (+ ``remask_steps``), as each step commits one.
    """
    extra = config.remask_steps if config.remask else 0
    num_masked = masked.sum(-1)  # (B,)
    if config.steps_per_block is None:
        return BlockPlan(None, num_masked + extra, masked.shape[1] + extra)
    steps = config.steps_per_block + extra
    return BlockPlan(
        schedule_counts(num_masked, config.steps_per_block), torch.full_like(num_masked, steps), steps
    )


def commit(
    block: torch.Tensor,
    proposal: Proposal,
    masked: torch.Tensor,
    plan: BlockPlan,
    step: int,
    threshold: float | None,
) -> torch.Tensor:
    """Write the chosen proposals into ``block`` (B, b) in place; returns the (B, b) chosen mask.

    Threshold: every masked position with c_i > τ (p_i(x_i) > τ for ``left_to_right``), at least the
    most confident (the leftmost for ``left_to_right``). Schedule: the k_s
    most confident; the schedule's last step (and remasking's extra steps) commit all that is left.
    """
    if plan.schedule is None:
        chosen = choose_positions(
            proposal.confidence, masked, threshold=threshold, score=proposal.probability
        )
    else:
        last = step >= plan.schedule.shape[1] - 1
        num = block.shape[1] if last else plan.schedule[:, step]
        chosen = choose_positions(proposal.confidence, masked, num=num)
    block.copy_(torch.where(chosen, proposal.tokens, block))
    return chosen


def _fill_after_eos(answer: torch.Tensor, eos_id: int, mask_id: int, rows: torch.Tensor) -> torch.Tensor:
    """Set every [MASK] after the first EOS of each row of ``answer`` (B, G), for the ``rows`` (B,)
    only, to EOS in place; returns the (B, G) bool mask of the positions set."""
    from_eos = (answer == eos_id).cumsum(-1) > 0  # an EOS at or before the position (an EOS is no [MASK])
    fill = from_eos & (answer == mask_id) & rows[:, None]
    answer.masked_fill_(fill, eos_id)
    return fill


def remask(
    block: torch.Tensor,
    block_logits: torch.Tensor,
    eligible: torch.Tensor,
    config: SamplerConfig,
    plan: BlockPlan,
    step: int,
    mask_id: int,
    eos_id: int,
) -> torch.Tensor:
    """ReMDM inside the block: hide again, in place, the eligible committed tokens of ``block``
    (B, b) whose probability p_i(x_i) under this step's ``block_logits`` (B, b, V) is below
    ``config.remask_bound``; returns the (B, b) mask of the positions hidden.

    ``eligible`` (B, b): tokens the strategy committed at an earlier step of this block (never a
    prompt token, a committed block or an EOS fill; never an EOS with ``fill_after_eos``, whose fill
    would be left without its cause). A row only hides what the rest of its ``plan.budget`` can
    commit again (threshold: one per step at least; schedule: the steps from the schedule's last on
    commit everything), the least probable first.
    """
    probability = token_probability(block_logits, config.sampling, block)  # (B, b) float64
    if config.fill_after_eos:
        eligible = eligible & (block != eos_id)
    later = plan.budget - (step + 1)  # (B,) steps left to the row's block after this one
    if config.threshold is not None:
        room = later - (block == mask_id).sum(-1)
    else:
        room = torch.where(later > 0, block.shape[1], 0)
    below = eligible & (probability < config.remask_bound)
    hidden = choose_positions(-probability, below, num=room.clamp_min(0))
    block.masked_fill_(hidden, mask_id)
    return hidden


def _record(
    trajectories: list[Trajectory],
    answer: torch.Tensor,
    block: int,
    offset: int,
    active: torch.Tensor,
    chosen: torch.Tensor,
    proposal: Proposal,
    filled: torch.Tensor | None,
    remasked: torch.Tensor | None,
) -> None:
    """Append this step to the trajectory of every row that had a [MASK] in its block (``active``).

    ``answer`` (B, G) after the step; ``chosen``/``remasked`` (B, b) block columns, ``offset`` the
    block's first answer position; ``filled`` (B, G) answer positions.
    """
    for row in active.nonzero().squeeze(-1).tolist():
        cols = chosen[row].nonzero().squeeze(-1)
        trajectories[row].steps.append(
            TrajectoryStep(
                block=block,
                canvas=answer[row].tolist(),
                committed=(cols + offset).tolist(),
                confidences=proposal.confidence[row, cols].tolist(),
                filled=[] if filled is None else filled[row].nonzero().squeeze(-1).tolist(),
                remasked=[] if remasked is None else (remasked[row].nonzero().squeeze(-1) + offset).tolist(),
            )
        )


@torch.no_grad()
def generate(
    dlm: nn.Module,
    prompts: list[list[int]],
    config: SamplerConfig,
    *,
    eos_id: int,
    pad_id: int | None,
    seed: int = 0,
    record_trajectory: bool = False,
    on_step: Callable[[StepFrame], None] | None = None,
    verifier: nn.Module | None = None,
) -> SampleOutput | SpeculativeOutput:
    """Denoise ``config.gen_length`` answer tokens after each prompt (see the module docstring).

    ``dlm`` is a ``DiffusionLM`` (anything with ``hidden_states``, ``lm_head``, ``mask_id``,
    ``shift``; ``.base.config`` for the prefix cache). The model is put in eval mode for the call.
    ``prompts`` are token-id lists of any lengths; ``pad_id`` only fills the left padding, which the
    attention mask hides (None = use ``eos_id``, as for LLaMA tokenizers without a pad token).
    ``on_step`` (a live view) is called with a ``StepFrame`` once before the first forward pass (every
    answer position [MASK]) and after every step, before the next; it changes nothing in the output.
    ``config.mode="speculative"`` decodes by drafting and verifying (``speculative_generate``, one
    row at a time: no padding); ``verifier`` is then the AR base for ``verifier=base`` when ``dlm``
    has no adapters to switch off (an exported merged folder); its ``on_step`` frames are its rounds
    (one per verify pass).
    """
    config = block_config(config, getattr(dlm, "block_size", None))
    device = _device(dlm)
    mask_id = int(dlm.mask_id)
    if mask_id == eos_id:
        raise ValueError(f"mask_id={mask_id} equals eos_id; the [MASK] token must be a token of its own")
    if config.mode == "speculative":
        return speculative_generate(
            dlm,
            prompts,
            config,
            new_drafter=lambda model, prompt_mask, canvas_mask: make_denoiser(
                model, config, prompt_mask, canvas_mask
            ),
            draft_block=lambda *args: draft_block(*args, config=config, eos_id=eos_id, mask_id=mask_id),
            eos_id=eos_id,
            seed=seed,
            record_trajectory=record_trajectory,
            verifier=verifier,
            on_step=on_step,
        )
    if verifier is not None:
        raise ValueError("verifier= is for sampler.mode=speculative; this config has mode='denoise'")
    pad_id = eos_id if pad_id is None else pad_id

    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    batch, width = prompt_ids.shape
    gen = config.gen_length
    x = torch.cat([prompt_ids, torch.full((batch, gen), mask_id)], dim=1).to(device)  # (B, P + G)
    attention_mask = torch.cat([prompt_mask, torch.ones(batch, gen, dtype=torch.long)], 1).to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # (B, P + G), 0 at the first real token
    generators = [torch.Generator(device=device).manual_seed(seed) for _ in range(batch)]
    record = record_trajectory or on_step is not None  # a live view is fed from the trajectory
    trajectories = [Trajectory(list(p), mask_id) for p in prompts] if record else None
    canvas_mask = (torch.arange(width + gen) >= width).expand(batch, -1).to(device)  # (B, P + G)
    denoise = make_denoiser(dlm, config, prompt_mask.to(device), canvas_mask)
    block_len = config.resolved_block_length
    nfe_per_step = 2 if config.cfg_scale > 0 else 1
    steps_taken = 0

    if on_step is not None:
        start = [
            TrajectoryStep(block=0, canvas=[mask_id] * gen, committed=[], confidences=[]) for _ in prompts
        ]
        on_step(StepFrame(0, start))

    was_training = dlm.training
    dlm.eval()
    try:
        skip_full = config.stop_early or config.threshold is not None  # a full block takes no step
        for block in range(config.num_blocks):
            lo = width + block * block_len
            hi = lo + block_len
            if skip_full and not (x[:, lo:] == mask_id).any():
                break  # this block and every later one are full (EOS fill): nothing left to decode
            denoise.new_block()
            plan = plan_block(x[:, lo:hi] == mask_id, config)
            committed_before = torch.zeros(batch, block_len, dtype=torch.bool, device=device)  # (B, b)
            for step in range(plan.max_steps):
                masked = x[:, lo:hi] == mask_id  # (B, b)
                active = masked.any(-1)  # (B,) rows with a [MASK] left in the block
                if not active.any() and (config.stop_early or not plan.must_run(step)):
                    break
                end = hi if config.future_blocks == "hidden" else x.shape[1]
                hidden_states = denoise(x[:, :end], attention_mask[:, :end], position_ids[:, :end], lo, hi)
                block_logits = denoise.block_logits(hidden_states, config.cfg_scale)  # (B, b, V)
                steps_taken += 1
                proposal = propose(block_logits, masked, config, generators, eos_id)
                chosen = commit(x[:, lo:hi], proposal, masked, plan, step, config.threshold)
                filled = remasked = None
                if config.fill_after_eos:
                    filled = _fill_after_eos(x[:, width:], eos_id, mask_id, active)
                if config.remask:
                    eligible = committed_before & active[:, None]
                    remasked = remask(
                        x[:, lo:hi], block_logits, eligible, config, plan, step, mask_id, eos_id
                    )
                    committed_before = (committed_before | chosen) & ~remasked
                if trajectories is not None:
                    answer = x[:, width:]
                    _record(
                        trajectories, answer, block, lo - width, active, chosen, proposal, filled, remasked
                    )
                if on_step is not None:  # the rows that stepped appended this step's record
                    stepped = active.tolist()
                    records = [t.steps[-1] if stepped[r] else None for r, t in enumerate(trajectories)]
                    on_step(StepFrame(steps_taken, records))
    finally:
        dlm.train(was_training)

    canvas = x[:, width:]  # (B, G)
    if (canvas == mask_id).any():
        raise RuntimeError(f"sampler bug: [MASK] left in the output canvas under {config}")
    rows = canvas.tolist()
    return SampleOutput(
        tokens=[truncate_at_eos(r, eos_id) for r in rows],
        canvas=canvas.cpu(),
        nfe=steps_taken * nfe_per_step,
        steps=steps_taken,
        trajectories=trajectories if record_trajectory else None,
    )


def draft_block(
    denoise: _Denoiser,
    x: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    lo: int,
    hi: int,
    end: int,
    generator: torch.Generator,
    *,
    config: SamplerConfig,
    eos_id: int,
    mask_id: int,
) -> int:
    """The speculative draft of ``draft=denoise``: this sampler's block loop on one row's block [lo, hi)
    of ``x`` (1, L) until it has no [MASK] (``threshold``; or the schedule, its m [MASK]s spread over
    min(S, m) steps, S = ``steps_per_block``, so that no step commits nothing); the model sees
    ``x[:, :end]``. Returns the forward rounds taken."""
    masked = x[:, lo:hi] == mask_id  # (1, b)
    num_masked = masked.sum(-1)  # (1,)
    if config.threshold is not None:
        plan = BlockPlan(None, num_masked, masked.shape[1])
    else:
        steps = min(config.steps_per_block, int(num_masked))
        plan = BlockPlan(schedule_counts(num_masked, steps), torch.full_like(num_masked, steps), steps)
    rounds = 0
    for step in range(plan.max_steps):
        masked = x[:, lo:hi] == mask_id
        if not masked.any():
            break
        hidden_states = denoise(x[:, :end], attention_mask[:, :end], position_ids[:, :end], lo, hi)
        block_logits = denoise.block_logits(hidden_states, config.cfg_scale)  # (1, b, V)
        rounds += 1
        proposal = propose(block_logits, masked, config, [generator], eos_id)
        commit(x[:, lo:hi], proposal, masked, plan, step, config.threshold)
    return rounds
