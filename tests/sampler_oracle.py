"""The sampler as it was before batching (the per-row loop): the oracle of ``tests/test_batched_sampler.py``.

A frozen copy of ``diffllm.diffusion.sampler.generate`` and of the per-row strategies as of commit
61e80a8 (one strategy call per row per step, one ``torch.Generator`` per row). The batched sampler
must give the same tokens, forward passes and commit order for every setting; do not "fix" this
file when the sampler changes, it is the reference. Only the denoisers (the model calls) are shared
with the library: they are not what batching changed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from diffllm.data.collate import left_pad, truncate_at_eos
from diffllm.diffusion.sampler import (
    SampleOutput,
    SamplerConfig,
    block_config,
    make_denoiser,
    transfer_schedule,
)
from diffllm.diffusion.strategies import TokenSampling
from diffllm.diffusion.trajectory import Trajectory, TrajectoryStep


def _device(module: nn.Module) -> torch.device:
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """(N, V) logits with everything outside the top-k / the top-p nucleus set to -inf.

    top-p keeps the smallest set of most likely tokens whose probability mass reaches ``top_p``
    (the most likely token is always kept). ``None`` (or top_k 0, top_p 1) disables a filter.
    """
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (N, V)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # mass before this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor, sampling: TokenSampling, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits -> tokens (N,) and the float32 probabilities p (N, V) they were drawn from."""
    logits = logits.float()
    if sampling.temperature > 0:
        logits = logits / sampling.temperature
    logits = filter_logits(logits, sampling.top_k, sampling.top_p)
    probs = logits.softmax(dim=-1)  # (N, V)
    if sampling.temperature > 0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        tokens = probs.argmax(dim=-1)
    return tokens, probs


# (logits (N, V), sampling, the row's generator) -> (confidence (N,) float64, tokens (N,))
Strategy = Callable[[torch.Tensor, TokenSampling, torch.Generator | None], tuple[torch.Tensor, torch.Tensor]]


def random_order(
    logits: torch.Tensor, sampling: TokenSampling, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_i ~ U(0, 1): the positions to unmask are chosen uniformly at random (Dream ``origin``)."""
    tokens, _ = sample_tokens(logits, sampling, generator)
    confidence = torch.rand(tokens.shape, generator=generator, device=tokens.device, dtype=torch.float64)
    return confidence, tokens


def low_confidence(
    logits: torch.Tensor, sampling: TokenSampling, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_i = p_i(x_i), the probability of the proposed token (LLaDA low-confidence remasking)."""
    tokens, probs = sample_tokens(logits, sampling, generator)
    return probs.gather(-1, tokens[:, None]).squeeze(-1).double(), tokens


def margin(
    logits: torch.Tensor, sampling: TokenSampling, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_i = p_i(top1) - p_i(top2), the gap between the two most likely tokens."""
    tokens, probs = sample_tokens(logits, sampling, generator)
    top2 = torch.topk(probs.double(), 2, dim=-1).values  # (N, 2)
    return top2[:, 0] - top2[:, 1], tokens


def entropy(
    logits: torch.Tensor, sampling: TokenSampling, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_i = sum_v p_iv log p_iv, the negative entropy of position i (0 log 0 = 0)."""
    tokens, probs = sample_tokens(logits, sampling, generator)
    p = probs.double()
    return torch.xlogy(p, p).sum(dim=-1), tokens


STRATEGIES: dict[str, Strategy] = {
    "random": random_order,
    "low_confidence": low_confidence,
    "margin": margin,
    "entropy": entropy,
}


def choose_positions(confidence: torch.Tensor, num: int | None, threshold: float | None) -> torch.Tensor:
    """Indices (into ``confidence`` (N,)) of the positions to commit this step.

    With ``threshold`` τ: every i with c_i > τ, or the single most confident one if none is
    (Fast-dLLM parallel decoding). Otherwise the ``num`` most confident. Ties go to the lower
    index, so the choice is deterministic. Returned in ascending position order.
    """
    order = torch.sort(confidence, descending=True, stable=True).indices  # (N,)
    if threshold is not None:
        above = int((confidence > threshold).sum())
        chosen = order[: max(above, 1)]
    else:
        if num is None:
            raise ValueError("choose_positions needs either num or threshold")
        chosen = order[: max(0, min(num, confidence.numel()))]
    return chosen.sort().values


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
) -> SampleOutput:
    """Denoise ``config.gen_length`` answer tokens after each prompt (see the module docstring).

    ``dlm`` is a ``DiffusionLM`` (anything with ``hidden_states``, ``lm_head``, ``mask_id``,
    ``shift``; ``.base.config`` for the prefix cache). The model is put in eval mode for the call.
    ``prompts`` are token-id lists of any lengths; ``pad_id`` only fills the left padding, which the
    attention mask hides (None = use ``eos_id``, as for LLaMA tokenizers without a pad token).
    """
    config = block_config(config, getattr(dlm, "block_size", None))
    strategy = STRATEGIES[config.strategy]
    sampling = config.sampling
    device = _device(dlm)
    mask_id = int(dlm.mask_id)
    if mask_id == eos_id:
        raise ValueError(f"mask_id={mask_id} equals eos_id; the [MASK] token must be a token of its own")
    pad_id = eos_id if pad_id is None else pad_id

    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    batch, width = prompt_ids.shape
    gen = config.gen_length
    x = torch.cat([prompt_ids, torch.full((batch, gen), mask_id)], dim=1).to(device)  # (B, P + G)
    attention_mask = torch.cat([prompt_mask, torch.ones(batch, gen, dtype=torch.long)], 1).to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # (B, P + G), 0 at the first real token
    generators = [torch.Generator(device=device).manual_seed(seed) for _ in range(batch)]
    trajectories = [Trajectory(list(p), mask_id) for p in prompts] if record_trajectory else None
    canvas_mask = (torch.arange(width + gen) >= width).expand(batch, -1).to(device)  # (B, P + G)
    denoise = make_denoiser(dlm, config, prompt_mask.to(device), canvas_mask)
    block_len, steps_per_block = config.resolved_block_length, config.steps_per_block
    nfe_per_step = 2 if config.cfg_scale > 0 else 1
    steps_taken = 0

    was_training = dlm.training
    dlm.eval()
    try:
        for block in range(config.num_blocks):
            lo = width + block * block_len
            hi = lo + block_len
            denoise.new_block()
            masked = x[:, lo:hi] == mask_id  # (B, b)
            schedule = None
            if steps_per_block is not None:
                schedule = [transfer_schedule(int(n), steps_per_block) for n in masked.sum(-1)]
            max_steps = block_len if steps_per_block is None else steps_per_block
            for step in range(max_steps):
                masked = x[:, lo:hi] == mask_id  # (B, b)
                active = masked.any(-1)  # (B,)
                if not active.any() and (config.stop_early or steps_per_block is None):
                    break
                end = hi if config.future_blocks == "hidden" else x.shape[1]
                hidden_states = denoise(x[:, :end], attention_mask[:, :end], position_ids[:, :end], lo, hi)
                block_logits = denoise.block_logits(
                    hidden_states, config.cfg_scale
                )  # (B, b, V) one head call
                steps_taken += 1
                last = steps_per_block is not None and step == steps_per_block - 1
                for row in range(batch):
                    if not active[row]:
                        continue  # no draw from this row's generator: it would not step alone
                    cols = masked[row].nonzero().squeeze(-1)  # (n,) block columns still masked
                    logits = block_logits[row, cols]  # (n, V)
                    confidence, tokens = strategy(logits, sampling, generators[row])  # (n,), (n,)
                    confidence = confidence - config.eos_penalty * (tokens == eos_id).double()
                    if schedule is None:
                        chosen = choose_positions(confidence, None, config.threshold)
                    else:
                        num = cols.numel() if last else schedule[row][step]
                        chosen = choose_positions(confidence, num, None)
                    positions = lo + cols[chosen]
                    x[row, positions] = tokens[chosen]
                    filled = _fill_after_eos(x[row, width:], eos_id, mask_id) if config.fill_after_eos else []
                    if trajectories is not None:
                        trajectories[row].steps.append(
                            TrajectoryStep(
                                block=block,
                                canvas=x[row, width:].tolist(),
                                committed=(positions - width).tolist(),
                                confidences=confidence[chosen].tolist(),
                                filled=filled,
                            )
                        )
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
        trajectories=trajectories,
    )


def _fill_after_eos(answer: torch.Tensor, eos_id: int, mask_id: int) -> list[int]:
    """Set every [MASK] after the first EOS of ``answer`` (G,) to EOS in place; returns those positions."""
    eos_at = (answer == eos_id).nonzero()
    if eos_at.numel() == 0:
        return []
    after = torch.arange(answer.numel(), device=answer.device) > eos_at[0, 0]
    fill = after & (answer == mask_id)
    answer[fill] = eos_id
    return fill.nonzero().squeeze(-1).tolist()
