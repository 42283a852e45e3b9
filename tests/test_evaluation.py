"""The evaluation module: one estimator setting, one seed convention, one exact match, [MASK]
suppressed in the AR baseline, validation reproducible while annealing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffllm.assets.build import exact_match_by_task as build_exact_match_by_task
from diffllm.data.collate import Collator
from diffllm.diffusion.likelihood import validation_seed
from diffllm.diffusion.sampler import SamplerConfig
from diffllm.evaluation.compare import (
    DEFAULT_LIKELIHOOD,
    compare,
    exact_match_by_task,
    likelihood_settings,
)
from diffllm.evaluation.metrics import exact_match
from diffllm.evaluation.scoring import ratio_mean_se, score_batch
from diffllm.model.attention import set_bidirectional
from diffllm.model.dlm import DiffusionLM
from tests.conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, EOS = 3, 2


def test_likelihood_settings_defaults_run_node_then_overrides():
    assert likelihood_settings() == DEFAULT_LIKELIHOOD == {"num_samples": 4, "method": "grid"}
    node = {"num_samples": 2, "method": "stratified"}
    assert likelihood_settings(node) == node
    assert likelihood_settings(node, num_samples=8, method=None) == {"num_samples": 8, "method": "stratified"}
    with pytest.raises(ValueError, match=r"unknown likelihood setting\(s\) \['samples'\]"):
        likelihood_settings(samples=3)


def test_exact_match_is_whitespace_normalised_everywhere():
    # the asset builder compared stripped strings: "sun  dog" was a miss there and a hit in metrics
    rows = [{"task": "copy", "output": "sun dog"}, {"task": "add", "output": "12"}]
    answers = ["sun  dog", " 13"]
    assert exact_match(answers, [r["output"] for r in rows]) == 0.5
    assert build_exact_match_by_task(rows, answers) == {"add": 0.0, "all": 0.5, "copy": 1.0}
    per_task = exact_match_by_task([r["task"] for r in rows], [r["output"] for r in rows], model=answers)
    assert per_task == [
        {"task": "add", "rows": 1, "model_exact_match": 0.0},
        {"task": "copy", "rows": 1, "model_exact_match": 1.0},
    ]
    assert exact_match_by_task([None, None], ["a", "b"], model=["a", "b"]) == []  # Alpaca rows: no task


# ------------------------------------------------------------------------------------- compare


def _rows(n: int) -> list[dict]:
    """n encoded rows: prompt <s> + 2 words, answer of 1-3 tokens + EOS, EOS-padded to 4."""
    gen = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        prompt = [1] + torch.randint(5, 30, (2,), generator=gen).tolist()
        answer = torch.randint(5, 30, (1 + i % 3,), generator=gen).tolist() + [EOS]
        span = answer + [EOS] * (4 - len(answer))
        rows.append(
            {
                "input_ids": prompt + span,
                "answer_mask": [0] * len(prompt) + [1] * len(span),
                "score_mask": [0] * len(prompt) + [1] * len(answer) + [0] * (len(span) - len(answer)),
            }
        )
    return rows


@pytest.fixture(scope="module")
def dlm_and_tok(tokenizer):
    mask_id = len(tokenizer)
    model = set_bidirectional(tiny_llama(mask_id + 1))
    return DiffusionLM(model, mask_id=mask_id, shift=True).eval(), tokenizer


def _compare(dlm, tok, rows, seed=5, **models):
    prompts = [
        {"prompt": "p", "prompt_ids": r["input_ids"][:3], "reference": "cat", "row": {}} for r in rows[:3]
    ]
    return compare(
        scored=rows,
        train=rows,
        collate=Collator(PAD),
        batch_size=2,
        prompts=prompts,
        tokenizer=tok,
        eos_id=EOS,
        config=SamplerConfig(gen_length=4, steps=4),
        seed=seed,
        device="cpu",
        likelihood={"num_samples": 2, "method": "stratified"},
        gen_batch_size=2,
        **models,
    )


def test_compare_seeds_batch_i_with_the_validation_seed(dlm_and_tok):
    # the report used to seed its batches with seed + start; now every caller uses validation_seed
    dlm, tok = dlm_and_tok
    rows = _rows(5)
    figures, scores, _ = _compare(dlm, tok, rows, seed=5, diffusion=dlm, ar_base=dlm)
    collate, sums, counts = Collator(PAD), [], []
    for i, start in enumerate(range(0, 5, 2)):
        batch = collate(rows[start : start + 2])
        s = score_batch(
            batch, seed=validation_seed(5, i), num_samples=2, method="stratified", end_id=EOS, diffusion=dlm
        )
        sums.append(s["diffusion"].numpy())
        counts.append(s["tokens"].numpy())
    np.testing.assert_allclose(scores["diffusion"], np.concatenate(sums), rtol=1e-6)
    expected, _ = ratio_mean_se(np.concatenate(sums), np.concatenate(counts))
    assert figures["nll_bound"] == pytest.approx(expected, rel=1e-6)
    other_seed, _, _ = _compare(dlm, tok, rows, seed=6, diffusion=dlm)
    assert other_seed["nll_bound"] != pytest.approx(figures["nll_bound"], rel=1e-6)


def test_compare_ar_baseline_never_answers_mask(dlm_and_tok):
    # a head that would always pick [MASK]: the AR baseline suppresses it, so its greedy answers
    # are those of the model without that push
    dlm, tok = dlm_and_tok
    rows = _rows(3)
    _, _, plain = _compare(dlm, tok, rows, ar_base=dlm)

    def push_mask(module, args, output):
        output[..., dlm.mask_id] += 50.0  # far above the tiny random logits (about +-1)
        return output

    handle = dlm.lm_head.register_forward_hook(push_mask)
    try:
        _, _, pushed = _compare(dlm, tok, rows, ar_base=dlm)
    finally:
        handle.remove()
    assert pushed["ar_base"].texts == plain["ar_base"].texts
    assert pushed["ar_base"].lengths == plain["ar_base"].lengths and sum(plain["ar_base"].lengths) > 0


# ------------------------------------------------------------------------------------- validation


def test_validation_loss_is_reproducible_while_annealing():
    """The annealing mask of a validation batch is drawn from the validation generator, so the
    global RNG state (whatever training left) does not change ``val/loss``."""
    from diffllm.assets import TINY_VAL
    from diffllm.config.resolvers import compose
    from diffllm.data.datamodule import encode_row
    from diffllm.data.tiny_tasks import read_jsonl
    from diffllm.training.module import DiffusionLitModule

    class HalfwayThroughAnnealing(DiffusionLitModule):
        global_step = 100  # of anneal=linear's 200: each future key visible with probability 0.5

    cfg = compose(["anneal=linear", "output_dir=null"])  # with the default prefix-LM attention
    module = HalfwayThroughAnnealing.from_run_config(cfg).eval()
    assert module.annealing.progress(module.global_step) == 0.5
    rows = read_jsonl(TINY_VAL)[:4]
    encoded = [encode_row(r, module.tokenizer, cfg.data.template, 64, cfg.data.answer_pad_to) for r in rows]
    batch = Collator(module.tokenizer.pad_token_id)(encoded)
    losses = []
    with torch.no_grad():
        for global_seed in (0, 1, 1):
            torch.manual_seed(global_seed)
            gen = torch.Generator().manual_seed(validation_seed(0, 0))
            losses.append(module.diffusion_loss(batch, generator=gen)[0].item())
    assert losses[0] == losses[1] == losses[2]
    # the mask itself is random: another validation seed gives another loss
    gen = torch.Generator().manual_seed(validation_seed(0, 1))
    with torch.no_grad():
        assert module.diffusion_loss(batch, generator=gen)[0].item() != losses[0]
