"""The order NLL (the gap decomposed) and the reference-free answer figures."""

from __future__ import annotations

import itertools

import pytest
import torch

from diffllm.diffusion.likelihood import ar_nll, exact_elbo_nll
from diffllm.diffusion.order import mean_over_orders, order_nll
from diffllm.evaluation.quality import ar_scored_nll, position_agreement, reference_free, repeated_bigrams
from diffllm.evaluation.scoring import Answers
from diffllm.model.attention import set_bidirectional
from diffllm.model.dlm import DiffusionLM
from tests.conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 40
MASK_ID = VOCAB - 1


def _dlm(shift: bool) -> DiffusionLM:
    model = tiny_llama(VOCAB, initializer_range=0.5)
    set_bidirectional(model)
    return DiffusionLM(model, mask_id=MASK_ID, shift=shift)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_mean_over_all_orders_is_the_exact_elbo(shift, n):
    dlm = _dlm(shift)
    torch.manual_seed(n)
    ids = torch.randint(0, VOCAB - 1, (1, 4 + n))
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[0, 4:] = True
    exact, _ = exact_elbo_nll(dlm, ids, None, answer)
    assert mean_over_orders(dlm, ids, None, answer).item() == pytest.approx(exact.item(), rel=1e-6)


def test_order_nll_by_hand_and_orders_differ():
    """Left to right on 3 tokens is the sum of 3 forward passes written out; another order differs."""
    dlm = _dlm(shift=True)
    ids = torch.tensor([[1, 5, 7, 11, 13, 2]])
    answer = torch.tensor([[False, False, False, True, True, True]])
    by_hand = 0.0
    for j in range(3):
        xt = ids.clone()
        xt[0, 3 + j :] = MASK_ID
        logits = dlm(xt)[0, 3 + j].float()
        by_hand -= torch.log_softmax(logits, -1)[ids[0, 3 + j]].item()
    assert order_nll(dlm, ids, None, answer).item() == pytest.approx(by_hand, rel=1e-6)
    assert order_nll(dlm, ids, None, answer, [[2, 1, 0]]).item() != pytest.approx(by_hand, rel=1e-3)
    with pytest.raises(ValueError, match="not a permutation"):
        order_nll(dlm, ids, None, answer, [[0, 0, 1]])


def test_order_nll_batch_rows_equal_rows_alone():
    """Padding and another row change nothing: each batch row equals the same row scored alone."""
    dlm = _dlm(shift=False)
    rows = [[1, 4, 9, 12, 2], [1, 6, 3, 8, 30, 21, 2]]
    answers = [[False, False, True, True, True], [False, False, False, True, True, True, True]]
    width = 7
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    answer = torch.tensor([a + [False] * (width - len(a)) for a in answers])
    batch = order_nll(dlm, ids, attn, answer)
    alone = [order_nll(dlm, torch.tensor([r]), None, torch.tensor([a])).item() for r, a in zip(rows, answers)]
    assert batch.tolist() == pytest.approx(alone, rel=1e-5)


def test_ar_scored_nll_equals_ar_nll_of_the_concatenation():
    dlm = _dlm(shift=True)
    prompts, answers = [[1, 5, 6], [1, 7]], [[8, 9, 2], [10, 11, 12, 13]]
    sums, counts = ar_scored_nll(dlm, prompts, answers, pad_id=0, batch_size=2)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids = torch.tensor([p + a])
        mask = torch.tensor([[False] * len(p) + [True] * len(a)])
        nll, count = ar_nll(dlm, ids, None, mask)
        assert sums[i] == pytest.approx(nll.item(), rel=1e-5) and counts[i] == count.item() == len(a)


def test_agreement_and_repetition_by_hand():
    assert position_agreement([1, 2, 3], [1, 5, 3, 4]) == 0.5  # 2 of 4 positions
    assert position_agreement([], []) == 1.0 and position_agreement([1], []) == 0.0
    assert repeated_bigrams([7, 8, 7, 8, 7]) == (2, 4)  # (7,8) (8,7) then both again
    assert repeated_bigrams([1, 2, 3]) == (0, 2) and repeated_bigrams([4]) == (0, 0)


def test_reference_free_figures():
    dlm = _dlm(shift=True)
    end = 2
    diff = Answers(["", "", ""], [3, 2, 0], [True, False, True], 0.0, 1, [[5, 6, 5], [7, 7], []])
    greedy = Answers(["", "", ""], [3, 1, 0], [True, True, True], 0.0, 1, [[5, 6, 6], [7], []])
    prompts = [[1, 3], [1, 4], [1, 4, 4]]
    out = reference_free(diff, prompts, end_id=end, pad_id=0, ar_model=dlm, ar_greedy=greedy)
    # with end tokens: [5,6,5,2] vs [5,6,6,2] -> 3/4; [7,7] vs [7,2] -> 1/2; [2] vs [2] -> 1
    assert out["ar_agreement"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert out["eos_rate"] == pytest.approx(2 / 3) and out["answer_length"] == pytest.approx(5 / 3)
    assert out["repetition"] == pytest.approx(0 / 3)  # (5,6) (6,5) | (7,7): no bigram repeats
    sums, counts = ar_scored_nll(dlm, prompts, [[5, 6, 5, 2], [7, 7], [2]], pad_id=0)
    assert out["ar_scored_nll"] == pytest.approx(sums.sum() / counts.sum())
    assert list(itertools.chain(counts)) == [4, 2, 1]


@pytest.mark.slow
def test_evaluate_decomposes_the_gap_and_sweeps_compute(tiny_run, tmp_path):
    from diffllm.inference.evaluate import evaluate

    r = evaluate(
        tiny_run[1],
        out_dir=tmp_path,
        rows=8,
        gen_rows=6,
        steps_grid=[8],  # the tiny run's gen_length
        progress=False,
        quality={"enabled": True, "rows": 6, "tokens_per_step": [1, 2, 4, 8]},
    )
    # bound - AR = (bound - L2R) + (L2R - AR), each a ratio of paired sums over the same tokens
    assert r["order_cost"] + r["conversion_loss"] == pytest.approx(r["gap"], abs=1e-9)
    assert r["l2r_nll"] == pytest.approx(r["nll_bound"] - r["order_cost"], abs=1e-9)
    qc = r["quality_vs_compute"]
    assert [(q["tokens_per_step"], q["steps"]) for q in qc] == [(1, 8), (2, 4), (4, 2), (8, 1)]
    # one token per step is the sweep's steps=8 run on the same prompts and seed
    assert qc[0]["exact_match"] == r["steps_grid"][0]["exact_match"]
    assert qc[-1]["nfe"] == 1 and 1 < qc[0]["nfe"] <= 8
    rf = r["reference_free"]
    assert rf["ar_base"]["ar_agreement"] == 1.0  # the AR greedy answers agree with themselves
    assert (
        rf["diffusion"]["ar_scored_nll"] > rf["ar_base"]["ar_scored_nll"]
    )  # AR greedy is the AR's likeliest
    md = (tmp_path / "eval.md").read_text()
    assert (
        f"| bound - L2R: cost of averaging over orders | {r['order_cost']:.3f} ± {r['order_cost_se']:.3f} |"
        in md
    )
    assert "## reference-free answer quality, 6 prompts" in md
