"""The converted diffusion model as an lm-evaluation-harness model: ``diffllm_mdlm``.

Importing this module registers the class with lm-eval (``lm_eval.api.registry``) under the name
``diffllm_mdlm`` (Dream's adapter registers ``diffllm``; this one does not collide). lm-eval 0.4.x
finds only the models it knows, so ``lm_eval --model diffllm_mdlm`` cannot: run
``python -m diffllm.harness`` (it imports this module, then runs lm-eval's own command line), or
pass an instance to ``lm_eval.simple_evaluate(model=DiffusionHarnessLM(...))``.

What each request type means for a masked-diffusion model:

* ``loglikelihood(context, continuation)``: minus the diffusion NLL bound (ELBO) of the
  continuation's n tokens on a canvas of exactly n positions after the context,
  ``-elbo_nll(...)`` on the linear schedule (``scoring.EVAL_SCHEDULE``) with ``num_samples``
  noise levels (``method``: ``grid``, the deterministic midpoint t-grid, or ``stratified``, one
  uniform draw per stratum) and the masks drawn from ``seed``. Each request is scored alone with
  that seed, so a request's figure does not depend on the others (it equals ``elbo_nll`` on that
  one row). It is a lower bound on log p(continuation | context, n positions).
* ``is_greedy`` (the second element): whether the sampler, run greedily on that canvas of n
  positions with one token committed per step (the run's confidence strategy, temperature 0, no
  threshold, no cache), writes exactly the continuation's tokens. That is the diffusion
  counterpart of "greedy decoding reproduces the continuation"; it costs n forward passes per
  request (``greedy_check=false`` skips it and returns False).
* ``generate_until(context, gen_kwargs)``: the run's sampler (its config; ``gen_length``,
  ``steps``, ``block_length``, ``threshold``, ``strategy``... as model arguments replace fields)
  on the context, the answer cut at the end-of-answer token, then at the first of the ``until``
  strings; at most ``max_gen_toks`` tokens are kept (the canvas itself keeps the run's
  ``gen_length``: the model was trained for it). ``do_sample=true`` with ``temperature`` > 0
  samples; otherwise the sampler is greedy.
* ``loglikelihood_rolling``: refused (``NotImplementedError``), see ``ROLLING_REFUSAL``.

Tokenisation follows lm-eval's ``TemplateLM``, as its ``hf`` model does: trailing spaces of the
context move to the continuation, the pair is encoded as context + continuation and split after
the context's tokens; ``add_bos_token`` (default: the tokenizer's own special tokens, as the
project encodes prompts) decides the special tokens, so ``hf`` with the same ``add_bos_token``
scores the same token ids.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: get_model imports them only into an empty registry)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from diffllm.diffusion.likelihood import elbo_nll
from diffllm.diffusion.sampler import SamplerConfig, generate
from diffllm.evaluation.scoring import EVAL_SCHEDULE, diffusion_answers
from diffllm.inference.loading import InferenceModel, load_for_inference

log = logging.getLogger(__name__)

MODEL_NAME = "diffllm_mdlm"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"

ROLLING_REFUSAL = (
    f"{MODEL_NAME} does not implement loglikelihood_rolling: a masked-diffusion model scores an answer "
    "span given a visible prompt (the ELBO of the continuation); a whole document has no prompt to "
    "condition on and rolling windows have no diffusion meaning. Use loglikelihood / multiple-choice "
    "or generate_until tasks, or the AR model (--model hf) for perplexity tasks."
)

SAMPLER_FIELDS = {f.name for f in dataclasses.fields(SamplerConfig)}


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


@register_model(MODEL_NAME)
class DiffusionHarnessLM(TemplateLM):
    """lm-eval model over a diffllm checkpoint / export folder (``pretrained``) or an ``InferenceModel``.

    Model arguments: ``pretrained`` (a ``.ckpt`` of a diffusion run or a ``diffllm.export`` folder),
    ``num_samples`` (ELBO noise levels, default 8), ``method`` (``grid`` | ``stratified``), ``seed``,
    ``batch_size`` (prompts per sampler call; rows never interact), ``greedy_check``,
    ``add_bos_token``, ``max_length`` (default: the model's ``max_position_embeddings``), and any
    ``SamplerConfig`` field (``steps=4``, ``threshold=0.9``...).
    """

    def __init__(
        self,
        pretrained: str | Path | InferenceModel,
        device: str = "cpu",
        num_samples: int = 8,
        method: str = "grid",
        seed: int = 0,
        batch_size: int | str = 16,
        greedy_check: bool = True,
        add_bos_token: bool | None = None,
        max_length: int | None = None,
        max_batch_size: int | None = None,  # passed by lm-eval's CLI; unused
        **sampler_overrides: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(sampler_overrides) - SAMPLER_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown {MODEL_NAME} model argument(s) {unknown}; known: pretrained, num_samples, method, "
                f"seed, batch_size, greedy_check, add_bos_token, max_length and the sampler fields "
                f"{sorted(SAMPLER_FIELDS)}"
            )
        if isinstance(pretrained, InferenceModel):
            self.im = pretrained
        else:
            device = device or "cpu"
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                log.warning(
                    "device=%s but CUDA is not available (lm-eval's default): running on the CPU", device
                )
                device = "cpu"
            self.im = load_for_inference(pretrained, device=device)
        self.dlm = self.im.dlm.eval()
        self.tokenizer = self.im.tokenizer
        self.sampler_config = dataclasses.replace(self.im.sampler_config, **sampler_overrides)
        self.num_samples = int(num_samples)
        self.method = str(method)
        self.seed = int(seed)
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.greedy_check = _bool(greedy_check)
        self.add_bos_token = None if add_bos_token is None else _bool(add_bos_token)
        config = self.dlm.base.config
        self.max_length = int(max_length or getattr(config, "max_position_embeddings", 2048))
        self._device = next(self.dlm.parameters()).device

    # -- tokens ----------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.im.eos_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "diffllm")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = True if self.add_bos_token is None else self.add_bos_token
        return self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    # -- likelihood ------------------------------------------------------------------------------
    def row(self, context_ids: list[int], continuation_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, L) ids and answer mask of context + continuation, the context cut on the left to fit."""
        if not continuation_ids:
            raise ValueError("empty continuation: nothing to score")
        keep = max(self.max_length - len(continuation_ids), 1)
        context_ids = context_ids[-keep:]
        ids = torch.tensor([context_ids + continuation_ids], device=self._device)
        answer = torch.zeros_like(ids, dtype=torch.bool)
        answer[0, len(context_ids) :] = True
        return ids, answer

    def continuation_nll(self, context_ids: list[int], continuation_ids: list[int]) -> float:
        """The ELBO bound (nats, summed over the continuation) of one request, scored alone."""
        ids, answer = self.row(context_ids, continuation_ids)
        nll, _ = elbo_nll(
            self.dlm,
            ids,
            None,
            answer,
            EVAL_SCHEDULE,
            num_samples=self.num_samples,
            method=self.method,
            seed=self.seed,
        )
        return float(nll[0])

    def greedy_config(self, n: int) -> SamplerConfig:
        """The sampler of ``is_greedy``: n positions, one committed per step, temperature 0."""
        return SamplerConfig(gen_length=n, steps=n, strategy=self.sampler_config.strategy)

    def is_greedy(self, context_ids: list[int], continuation_ids: list[int]) -> bool:
        ids, answer = self.row(context_ids, continuation_ids)
        prompt = ids[0, ~answer[0]].tolist()
        out = generate(
            self.dlm,
            [prompt],
            self.greedy_config(len(continuation_ids)),
            eos_id=self.eot_token_id,
            pad_id=self.tokenizer.pad_token_id,
            seed=self.seed,
        )
        return out.canvas[0].tolist() == list(continuation_ids)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any):
        out = []
        for key, context_ids, continuation_ids in tqdm(requests, desc=MODEL_NAME, disable=disable_tqdm):
            result = (
                -self.continuation_nll(context_ids, continuation_ids),
                self.greedy_check and self.is_greedy(context_ids, continuation_ids),
            )
            out.append(result)
            self.cache_hook.add_partial("loglikelihood", key, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(ROLLING_REFUSAL)

    # -- generation ------------------------------------------------------------------------------
    def sampler_for(self, gen_kwargs: dict[str, Any]) -> SamplerConfig:
        """The run's sampler, greedy unless ``do_sample`` with a positive ``temperature``."""
        sample = _bool(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature", 0.0)) > 0
        temperature = float(gen_kwargs["temperature"]) if sample else 0.0
        return dataclasses.replace(self.sampler_config, temperature=temperature)

    @staticmethod
    def cut_at(text: str, until: list[str]) -> str:
        """``text`` up to the first occurrence of any ``until`` string."""
        for stop in until:
            if stop:
                text = text.split(stop, 1)[0]
        return text

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=str)), []).append(i)
        bar = tqdm(total=len(requests), desc=MODEL_NAME, disable=disable_tqdm)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(gen_kwargs.get("max_gen_toks", self.sampler_config.gen_length))
            config = self.sampler_for(gen_kwargs)
            keep = max(self.max_length - config.gen_length, 1)
            answers = diffusion_answers(
                self.dlm,
                self.tokenizer,
                [self.tok_encode(requests[i].args[0])[-keep:] for i in indices],
                config,
                eos_id=self.eot_token_id,
                seed=self.seed,
                batch_size=self.batch_size,
            )
            for i, tokens in zip(indices, answers.tokens):
                text = self.cut_at(
                    self.tokenizer.decode(tokens[:max_tokens], skip_special_tokens=True), until
                )
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(indices))
        bar.close()
        return [r if r is not None else "" for r in results]
