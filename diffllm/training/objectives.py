"""Training objectives (the ``objective`` config group): what a training step minimises.

* ``DiffusionObjective`` (``objective=diffusion``, the default): the masked-diffusion loss of
  ``DiffusionLitModule.diffusion_loss`` on the bidirectional model.
* ``ARObjective`` (``objective=ar``): AR-SFT at equal budget, the fair baseline of the research
  question. The same base, LoRA targets and rank, [MASK] row, data, steps and optimizer; attention
  causal (``model.attention=causal``, set on the model whatever the model node says) and the loss the next-token cross-entropy on the scored span (``score_mask``: the answer
  and its first end token, never the EOS padding after it), averaged over the scored
  tokens of the whole optimizer step (micro-batches and ranks, as training normalises):

      L = sum_{b, i in S_b} -log p(x_i | x_<i) / sum_b |S_b|,

  which equals the Hugging Face causal-LM loss with labels = -100 off the scored span. The EOS
  padding is a diffusion device (the canvas length); a causal model stops at its first end token.

Each objective also names the row its model fills in the scoring core (``role``: a key of
``diffllm.evaluation.scoring.score_batch``) and decodes answers its own way, so the LightningModule,
the report and ``evaluate`` never branch on the objective.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffllm.diffusion.keys import DrawKeys
from diffllm.diffusion.likelihood import causal_token_ce
from diffllm.diffusion.sampler import SamplerConfig
from diffllm.evaluation.scoring import Answers, ar_answers, diffusion_answers
from diffllm.model.dlm import DiffusionLM


class DiffusionObjective:
    """Masked diffusion on the bidirectional model (the conversion)."""

    role = "diffusion"
    label = "diffusion"
    attention = None  # the model's own (model.attention)

    def loss(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
        keys: DrawKeys | None = None,
        block_size: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``module.diffusion_loss``: (loss, stats with ``weighted_sum`` / ``count``, its numerator and
        normaliser, that training sums over the whole optimizer step). ``block_size``: the
        curriculum's size in force (``model.block_schedule``), None for the model's own."""
        return module.diffusion_loss(batch, generator=generator, keys=keys, block_size=block_size)

    def answers(
        self,
        dlm: DiffusionLM,
        tokenizer: Any,
        prompt_ids: Sequence[list[int]],
        config: SamplerConfig,
        *,
        eos_id: int,
        seed: int,
        batch_size: int,
    ) -> Answers:
        return diffusion_answers(
            dlm, tokenizer, prompt_ids, config, eos_id=eos_id, seed=seed, batch_size=batch_size
        )

    def __repr__(self) -> str:
        return "DiffusionObjective()"


class ARObjective:
    """AR-SFT: causal attention, LoRA on, next-token loss on the answer and its end token."""

    role = "ar_sft"
    label = "AR-SFT"
    attention = "causal"  # model.attention of the trained model, whatever the model node says

    def loss(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
        keys: DrawKeys | None = None,
        block_size: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(mean next-token CE over the scored tokens, stats); ``generator`` / ``keys`` are unused (no
        noise), and so is ``block_size`` (the causal model has no blocks: AR-SFT ignores a curriculum).

        stats ``weighted_sum`` (the CE sum) and ``count`` (the scored tokens): training divides the
        sum over the whole optimizer step (micro-batches and ranks) by the total count.
        """
        scored = batch.get("score_mask", batch["answer_mask"]).bool()
        ce = causal_token_ce(module.dlm, batch["input_ids"], batch["attention_mask"], scored, adapters=True)
        n_answer = scored.sum()
        weighted_sum = ce.sum()
        return weighted_sum / n_answer.clamp_min(1), {
            "n_answer": n_answer,
            "n_hidden": n_answer,
            "weighted_sum": weighted_sum,
            "count": n_answer,
        }

    def answers(
        self,
        dlm: DiffusionLM,
        tokenizer: Any,
        prompt_ids: Sequence[list[int]],
        config: SamplerConfig,
        *,
        eos_id: int,
        seed: int,
        batch_size: int,
    ) -> Answers:
        """Greedy, with the sampler's answer budget (``gen_length``) as ``max_new_tokens``."""
        return ar_answers(
            dlm, tokenizer, prompt_ids, config.gen_length, eos_id=eos_id, batch_size=batch_size, adapters=True
        )

    def __repr__(self) -> str:
        return "ARObjective()"


# What a checkpoint's ``objective._target_`` may name: read as data, never instantiated blindly.
OBJECTIVES: dict[str, type] = {
    f"{cls.__module__}.{cls.__name__}": cls for cls in (DiffusionObjective, ARObjective)
}


def objective_of(cfg: Mapping[str, Any]) -> DiffusionObjective | ARObjective:
    """The objective a run config (or checkpoint config) trained with; configs older than the
    ``objective`` group trained the diffusion one."""
    node = cfg.get("objective") or {"_target_": "diffllm.training.objectives.DiffusionObjective"}
    target = node.get("_target_")
    if target not in OBJECTIVES:
        raise ValueError(f"objective._target_={target!r} is not one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[target](**{k: v for k, v in node.items() if k != "_target_"})
