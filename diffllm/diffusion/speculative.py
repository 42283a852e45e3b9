"""Self-speculative decoding (``sampler.mode=speculative``): the diffusion model drafts, a causal pass verifies.

Every round of a row, with n answer tokens committed so far and block k = [k b, (k + 1) b) the one
holding answer position n (b = ``block_length``, the model's block size for a block model):

1. **draft**: the converted model fills the [MASK]s of block k, positions n .. (k + 1) b - 1, with
   the committed tokens in place (its denoiser, KV caches included, as the sampler runs it). With
   ``draft=single`` one forward pass fills them all, each position independently (a factorised
   draft: d_i = argmax q_i, or d_i ~ q_i); ``draft=denoise`` runs the sampler's own block loop on
   them (``steps`` / ``threshold``), greedy only;
2. **verify**: one causal pass of the verifier over the tokens it has not seen (the last committed
   one and the m drafts) on its own KV cache gives its next-token predictions v_0 .. v_m for the
   positions n .. n + m;
3. **commit**: the longest prefix of the draft with d_i = v_i (j tokens), then the verifier's own
   token v_j: the correction at the first disagreement, or the token after a fully accepted draft.
   Every round commits j + 1 >= 1 tokens, stops after an end token (accepted through it) and never
   writes past ``gen_length``. Drafts after the commit are hidden again: the next round drafts the
   rest of the block with the accepted tokens in place (a block is committed in parts, so the
   block cache sees a block only once the verifier has committed all of it).

Greedy, the committed tokens are the verifier's greedy tokens: the output is the verifier's greedy
answer token for token, up to floating-point near-ties between a pass over m + 1 positions and
one-token steps. Verifiers (``verifier``):

* ``base``: the AR model the conversion started from: the same weights with the LoRA adapters
  switched off and causal attention (``model.dlm.adapters_disabled``), with its own KV cache. An
  exported merged folder has no adapters to switch off: pass the base model as ``verifier=``.
* ``self``: the converted model's own causal clean stream (a block model with
  ``model.clean_stream=causal``, trained with ``loss.ar_weight > 0``): adapters on, causal attention.

With temperature T > 0 (``draft=single`` only: the acceptance rule needs the draft's per-position
distribution q_i, which only a factorised draft has), the standard speculative acceptance keeps the
verifier's distribution p_i = softmax(filter(logits / T)) (``strategies.sample_tokens``' filters):
d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is
drawn from norm(max(p_i - q_i, 0)); after a fully accepted draft, from p_m. Each row draws from its
own generator (seeded ``seed``), in this order.

Rows are decoded one at a time (batch 1: acceptance lengths differ per row), so a row's answer is
the one it gets alone. ``nfe`` counts the drafter's passes (two per pass with CFG) and the
verifier's; ``accepted`` and ``committed`` hold, per row and verify pass, the draft tokens accepted
(j) and the tokens committed (j + 1, fewer at an end token or ``gen_length``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DynamicCache

from diffllm.data.collate import truncate_at_eos
from diffllm.diffusion.strategies import TokenSampling, filter_logits, sample_tokens
from diffllm.diffusion.trajectory import StepFrame, Trajectory, TrajectoryStep
from diffllm.model.attention import causal_attention
from diffllm.model.dlm import DiffusionLM, ar_mode

if TYPE_CHECKING:
    from diffllm.diffusion.sampler import SamplerConfig

MODES = ("denoise", "speculative")  # sampler.mode
VERIFIERS = ("base", "self")  # sampler.verifier
DRAFTS = ("single", "denoise")  # sampler.draft


@dataclass
class SpeculativeOutput:
    """What ``speculative_generate`` returns: the fields of ``sampler.SampleOutput`` and the rounds."""

    tokens: list[list[int]]  # answers, truncated at the first EOS (EOS removed)
    canvas: torch.Tensor  # (B, gen_length) the answers, EOS after the first EOS
    nfe: int  # forward passes: the drafter's (x2 with CFG) + the verifier's
    steps: int  # verify passes (rounds) over all rows
    trajectories: list[Trajectory] | None = None
    draft_nfe: int = 0
    verify_nfe: int = 0
    accepted: list[list[int]] = field(default_factory=list)  # per row, per verify pass: draft tokens accepted
    committed: list[list[int]] = field(default_factory=list)  # per row, per verify pass: tokens committed

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per verify pass, over all rows (how well drafter and verifier agree)."""
        passes = [a for row in self.accepted for a in row]
        return sum(passes) / len(passes) if passes else 0.0

    @property
    def tokens_per_verify(self) -> float:
        """Tokens committed per verify pass (accepted draft + the verifier's own token)."""
        passes = [c for row in self.committed for c in row]
        return sum(passes) / len(passes) if passes else 0.0


class CausalVerifier:
    """The verifier of one row: the decoder of ``model`` run as it is, on its own KV cache.

    The caller holds the verifier's mode for the whole decode (causal attention, the adapters off for
    ``base``), so a pass is one decoder call with no switch to flip. ``extend(tokens)`` runs the
    tokens after the cached ones and returns the (n, V) float32 next-token logits at those positions
    ([MASK] banned); ``crop(length)`` forgets every position >= ``length``.
    """

    def __init__(self, model: DiffusionLM, *, mask_id: int) -> None:
        self.decoder = model.base.get_decoder()
        self.lm_head = model.lm_head
        self.mask_id = mask_id
        self.cache = DynamicCache(config=model.base.config)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        start = self.length
        positions = torch.arange(start, start + tokens.shape[-1], device=tokens.device)[None]  # (1, n)
        hidden = self.decoder(
            input_ids=tokens[None], position_ids=positions, cache=self.cache, use_cache=True
        ).last_hidden_state  # (1, n, H); no mask: the attention modules' causal switch decides
        logits = self.lm_head(hidden[0]).float()  # (n, V)
        if logits.shape[-1] > self.mask_id:
            logits[:, self.mask_id] = float("-inf")
        return logits

    def crop(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length - self.length)  # transformers 5: a negative count of tokens to drop


def verifier_model(
    dlm: nn.Module, config: SamplerConfig, verifier: nn.Module | None
) -> tuple[nn.Module, DiffusionLM, bool]:
    """(the drafter, the verifier, whether the verifier's adapters stay on) for ``config.verifier``.

    ``base``: ``verifier`` if given (a DiffusionLM or a Hugging Face causal LM: the AR base), else
    ``dlm`` with its adapters off, which needs adapters to switch off; when the verifier is ``dlm``'s
    own model, the drafter is a copy with the adapters merged (``DiffusionLM.merged_copy``), so that
    the verifier's switches, set once, never reach the drafter. ``self``: ``dlm`` drafts and verifies;
    it must be a block model whose clean stream is causal.
    """
    if config.verifier == "self":
        if verifier is not None:
            raise ValueError("sampler.verifier=self verifies with the model itself; do not pass verifier=")
        if getattr(dlm, "clean_stream", None) != "causal":
            raise ValueError(
                "sampler.verifier=self needs a block model whose clean stream is the causal model "
                "(model.clean_stream=causal, trained with loss.ar_weight > 0); this one has "
                f"clean_stream={getattr(dlm, 'clean_stream', None)!r}: use sampler.verifier=base"
            )
        return dlm, dlm, True
    if verifier is None:
        if not callable(getattr(getattr(dlm, "model", None), "disable_adapter", None)):
            raise ValueError(
                "sampler.verifier=base runs the AR base, the model with its LoRA adapters off, but this model "
                "has no adapters (an exported merged folder): pass the base model as verifier= "
                "(diffllm.inference.loading.ar_baseline_model loads it beside the export)"
            )
        verifier = dlm
    if not isinstance(verifier, DiffusionLM):
        verifier = DiffusionLM(verifier, mask_id=int(dlm.mask_id))
    drafter = dlm.merged_copy().eval() if verifier.model is getattr(dlm, "model", None) else dlm
    return drafter, verifier, False


def check_speculative(config: SamplerConfig) -> None:
    """The settings speculative decoding cannot take (raised before anything runs)."""
    if config.temperature > 0 and config.draft != "single":
        raise ValueError(
            f"sampler.temperature={config.temperature} with sampler.draft={config.draft!r}: sampling needs the "
            "draft's per-position distribution, which only a single-pass (factorised) draft has; set "
            "sampler.draft=single or temperature=0"
        )


def sampling_distribution(logits: torch.Tensor, sampling: TokenSampling) -> torch.Tensor:
    """(..., V) float32 p = softmax(filter(logits / T)): what ``strategies.sample_tokens`` draws from."""
    logits = logits.float() / sampling.temperature if sampling.temperature > 0 else logits.float()
    return filter_logits(logits, sampling.top_k, sampling.top_p).softmax(dim=-1)


def _accept_greedy(draft: torch.Tensor, logits: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(j, the verifier's token at position j): j = the longest prefix of ``draft`` (m,) equal to the
    verifier's argmax of ``logits`` (m + 1, V)."""
    choice = logits.argmax(-1)  # (m + 1,)
    agree = (draft == choice[: draft.numel()]).long()
    j = int(agree.cumprod(0).sum())
    return j, choice[j]


def _accept_sampled(
    draft: torch.Tensor,
    draft_probs: torch.Tensor,
    logits: torch.Tensor,
    sampling: TokenSampling,
    generator: torch.Generator,
) -> tuple[int, torch.Tensor]:
    """(j, the token at position j) by the speculative acceptance rule (module docstring).

    ``draft`` (m,) drawn from ``draft_probs`` (m, V) = q; ``logits`` (m + 1, V) the verifier's.
    """
    p = sampling_distribution(logits, sampling).double()  # (m + 1, V) the verifier's p
    q = draft_probs.double()
    for i in range(draft.numel()):
        d = int(draft[i])
        u = torch.rand((), generator=generator, device=p.device, dtype=torch.float64)
        if u * q[i, d] < p[i, d]:  # u < p / q, without dividing by a tiny q
            continue
        residual = (p[i] - q[i]).clamp_min(0.0)
        if residual.sum() <= 0:  # p == q up to rounding: the rejection had probability ~0
            residual = p[i]
        return i, torch.multinomial(residual / residual.sum(), 1, generator=generator)[0]
    m = draft.numel()
    return m, torch.multinomial(p[m], 1, generator=generator)[0]


@torch.no_grad()
def speculative_generate(
    dlm: nn.Module,
    prompts: list[list[int]],
    config: SamplerConfig,
    *,
    new_drafter: Callable[[nn.Module, torch.Tensor, torch.Tensor], Any],
    draft_block: Callable[..., int] | None = None,
    eos_id: int,
    seed: int = 0,
    record_trajectory: bool = False,
    verifier: nn.Module | None = None,
    on_step: Callable[[StepFrame], None] | None = None,
) -> SpeculativeOutput:
    """Decode every prompt (one row at a time) by drafting with ``dlm`` and verifying causally.

    ``config`` has ``block_length`` resolved (``sampler.block_config``). ``new_drafter(model,
    prompt_mask, canvas_mask)`` builds the sampler's denoiser of one row (``sampler.make_denoiser``);
    ``draft_block`` runs the sampler's own block loop for ``draft=denoise`` (``sampler.draft_block``).
    ``verifier``: the AR base for ``verifier=base`` when ``dlm`` has no adapters to switch off.
    ``on_step`` (a live view) gets frame 0 (every row all [MASK]), then one frame per verify pass:
    ``rows[r]`` is the round's ``TrajectoryStep`` for the row being decoded, None for the others
    (rows are decoded one after another), the same objects the trajectories record.
    """
    check_speculative(config)
    was_training = (dlm.training, verifier.training if verifier is not None else False)
    dlm.eval()
    drafter, model, adapters = verifier_model(dlm, config, verifier)
    model.eval()
    mask_id = int(dlm.mask_id)
    device = next(dlm.parameters()).device
    out = SpeculativeOutput(tokens=[], canvas=torch.empty(0), nfe=0, steps=0)
    out.trajectories = [] if record_trajectory or on_step is not None else None
    canvases = []
    frame = None
    if on_step is not None:
        start = TrajectoryStep(block=0, canvas=[mask_id] * config.gen_length, committed=[], confidences=[])
        on_step(StepFrame(0, [start] * len(prompts)))

        sent = [0]  # frames after the start

        def frame(row: int, step: TrajectoryStep) -> None:
            out_rows: list[TrajectoryStep | None] = [None] * len(prompts)
            out_rows[row] = step
            sent[0] += 1
            on_step(StepFrame(sent[0], out_rows))

    # the verifier's mode, set once for every pass: causal attention (the drafter's block-causal and
    # prefix-LM passes bring their own 4D mask), and the adapters off for the base
    mode = causal_attention(model.model) if adapters else ar_mode(model.model)
    try:
        with mode:
            for row, prompt in enumerate(prompts):
                generator = torch.Generator(device=device).manual_seed(seed)
                answer = _decode_row(
                    drafter,
                    model,
                    prompt,
                    config,
                    new_drafter,
                    draft_block,
                    eos_id,
                    mask_id,
                    generator,
                    out,
                    None if frame is None else (lambda step, row=row: frame(row, step)),
                )
                canvases.append(answer)
    finally:
        dlm.train(was_training[0])
        if verifier is not None:
            verifier.train(was_training[1])
    out.canvas = (
        torch.stack(canvases).cpu() if canvases else torch.empty(0, config.gen_length, dtype=torch.long)
    )
    out.tokens = [truncate_at_eos(row, eos_id) for row in out.canvas.tolist()]
    out.nfe = out.draft_nfe + out.verify_nfe
    if not record_trajectory:
        out.trajectories = None
    return out


def _decode_row(
    drafter: nn.Module,
    model: DiffusionLM,
    prompt: list[int],
    config: SamplerConfig,
    new_drafter: Callable[[nn.Module, torch.Tensor, torch.Tensor], Any],
    draft_block: Callable[..., int] | None,
    eos_id: int,
    mask_id: int,
    generator: torch.Generator,
    out: SpeculativeOutput,
    on_round: Callable[[TrajectoryStep], None] | None = None,
) -> torch.Tensor:
    """One row: rounds of draft, verify, commit (module docstring); returns its (G,) answer canvas."""
    device = generator.device
    width, gen, block_len = len(prompt), config.gen_length, config.resolved_block_length
    total = width + gen
    x = torch.tensor([list(prompt) + [mask_id] * gen], device=device)  # (1, P + G)
    attention_mask = torch.ones(1, total, dtype=torch.long, device=device)
    position_ids = torch.arange(total, device=device)[None]  # (1, P + G)
    canvas_mask = (torch.arange(total, device=device) >= width)[None]  # (1, P + G)
    denoise = new_drafter(drafter, torch.ones(1, width, dtype=torch.bool, device=device), canvas_mask)
    verify = CausalVerifier(model, mask_id=mask_id)
    trajectory = Trajectory(list(prompt), mask_id) if out.trajectories is not None else None
    passes_per_draft = 2 if config.cfg_scale > 0 else 1
    accepted, committed = [], []
    n, block, ended = 0, -1, False  # n: answer tokens committed
    while n < gen and not ended:
        if n // block_len != block:
            block = n // block_len
            denoise.new_block()
        lo = width + block * block_len
        hi = lo + block_len
        end = hi if config.future_blocks == "hidden" else total
        draft_probs = None
        if config.draft == "single":
            hidden = denoise(x[:, :end], attention_mask[:, :end], position_ids[:, :end], lo, hi)
            logits = denoise.block_logits(hidden, config.cfg_scale)[0, width + n - lo :]  # (m, V)
            draw_at = torch.ones(1, logits.shape[0], dtype=torch.bool, device=device)
            drafts, draft_probs = sample_tokens(logits[None], config.sampling, [generator], draw_at)
            drafts, draft_probs = drafts[0], draft_probs[0]  # (m,), (m, V) the draft and its q
            x[0, width + n : hi] = drafts
            out.draft_nfe += passes_per_draft
        else:
            out.draft_nfe += passes_per_draft * draft_block(
                denoise, x, attention_mask, position_ids, lo, hi, end, generator
            )
        draft = x[0, width + n : hi]  # (m,)
        fed = verify.length  # <= width + n - 1: the verifier has not seen the last committed token
        logits = verify.extend(x[0, fed:hi])[width + n - 1 - fed :]  # (m + 1, V) predict n .. n + m
        out.verify_nfe += 1
        if config.temperature > 0:
            j, token = _accept_sampled(draft, draft_probs, logits, config.sampling, generator)
        else:
            j, token = _accept_greedy(draft, logits)
        new_n = min(n + j + 1, gen)
        if n + j < gen:
            x[0, width + n + j] = token
        segment = x[0, width + n : width + new_n]
        eos_at = (segment == eos_id).nonzero()
        if eos_at.numel():
            new_n, ended = n + int(eos_at[0, 0]) + 1, True
        x[0, width + new_n : hi] = mask_id  # drafts not committed are hidden again
        verify.crop(width + new_n - 1)  # keep every committed token but the last (not yet fed)
        accepted.append(min(j, new_n - n))
        committed.append(new_n - n)
        if trajectory is not None:
            probs = logits[: new_n - n].softmax(-1)
            chosen = x[0, width + n : width + new_n]
            trajectory.steps.append(
                TrajectoryStep(
                    block=block,
                    canvas=x[0, width:].tolist(),
                    committed=list(range(n, new_n)),
                    confidences=probs.gather(-1, chosen[:, None]).squeeze(-1).tolist(),
                )
            )
            if new_n >= gen or ended:  # the row's last round: the EOS fill after it is part of it
                step = trajectory.steps[-1]
                step.filled = list(range(new_n, gen))
                step.canvas = step.canvas[:new_n] + [eos_id] * (gen - new_n)
            if on_round is not None:
                on_round(trajectory.steps[-1])
        n = new_n
    out.steps += len(committed)
    out.accepted.append(accepted)
    out.committed.append(committed)
    answer = x[0, width:].clone()
    answer[n:] = eos_id  # after the end token (ended) or nothing (n == gen)
    if trajectory is not None:
        out.trajectories.append(trajectory)
    return answer
