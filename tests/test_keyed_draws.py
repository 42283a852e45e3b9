"""Defect 6 (issue 10): the objective's draws are keyed on (seed, optimizer step, global row index).

A global batch of 8 rows is cut as the ranks and micro-batches of a run would cut it (the order of
``DistributedSampler``: rank r's m-th micro-batch holds global rows (m*B + i)*W + r), each piece
padded to its own length; every row must get the same t and the same mask draw in every layout.
"""

from __future__ import annotations

import pytest
import torch

from diffllm.diffusion.forward import keyed_forward_process
from diffllm.diffusion.keys import DrawKeys, global_row_index, key_seed
from diffllm.diffusion.schedule import LinearSchedule
from diffllm.diffusion.time import AntitheticTimeSampler, UniformTimeSampler
from diffllm.training.distributed import draw_keys

MASK_ID = 99
G = 8  # rows in the global batch


def global_rows(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """8 rows of different lengths, each with a prompt and an answer span."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(G):
        n = int(torch.randint(6, 30, (1,), generator=gen))
        prompt = int(torch.randint(1, n - 2, (1,), generator=gen))
        answer = torch.zeros(n, dtype=torch.bool)
        answer[prompt:] = True
        rows.append({"ids": torch.randint(5, 90, (n,), generator=gen), "answer": answer})
    return rows


def pad(rows: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r["ids"]) for r in rows)
    x0 = torch.zeros(len(rows), length, dtype=torch.long)
    answer = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, r in enumerate(rows):
        x0[b, : len(r["ids"])], answer[b, : len(r["ids"])] = r["ids"], r["answer"]
    return x0, answer


def draws_by_row(sampler, world: int, accumulate: int, step: int = 3, seed: int = 7) -> dict[int, tuple]:
    """{global row: (t, hidden over the row's own length)} for the layout (world ranks x accumulate)."""
    rows, schedule = global_rows(), LinearSchedule()
    micro = G // (world * accumulate)
    out = {}
    for rank in range(world):
        for m in range(accumulate):
            index = global_row_index(micro, micro, m, rank, world)
            x0, answer = pad([rows[g] for g in index])
            keys = draw_keys(seed, step, batch_idx=m, rows=micro, micro_batch_size=micro,
                             accumulate=accumulate, rank=rank, world_size=world)  # fmt: skip
            assert list(keys.rows) == index and keys.global_batch_size == G
            t = sampler.keyed(keys)
            xt, hidden = keyed_forward_process(x0, answer, schedule.mask_prob(t), MASK_ID, keys)
            assert torch.equal(xt[hidden], torch.full_like(xt[hidden], MASK_ID))
            assert not hidden[~answer].any()  # the prompt and the padding are never hidden
            for b, g in enumerate(index):
                n = len(rows[g]["ids"])
                out[g] = (t[b].item(), hidden[b, :n].clone())
    assert sorted(out) == list(range(G))
    return out


LAYOUTS = [(1, 1), (1, 2), (2, 1), (2, 2), (4, 2)]  # (ranks, micro-batches per step)


@pytest.mark.parametrize("sampler", [UniformTimeSampler(), AntitheticTimeSampler()], ids=repr)
def test_rows_draw_the_same_t_and_mask_in_every_layout(sampler):
    reference = draws_by_row(sampler, 1, 1)
    assert len({t for t, _ in reference.values()}) == G
    for world, accumulate in LAYOUTS[1:]:
        other = draws_by_row(sampler, world, accumulate)
        for g in range(G):
            assert other[g][0] == reference[g][0], (world, accumulate, g)
            assert torch.equal(other[g][1], reference[g][1]), (world, accumulate, g)
    # the mask draw really varies within and across rows (not all hidden or all kept)
    hidden = torch.cat([h for _, h in reference.values()])
    assert 0 < hidden.sum() < hidden.numel()


def test_antithetic_times_stratify_the_global_batch_in_every_layout():
    sampler = AntitheticTimeSampler(eps=1e-3)
    for world, accumulate in LAYOUTS:
        for step in range(4):
            t = torch.tensor([t for t, _ in draws_by_row(sampler, world, accumulate, step).values()])
            u = (t - sampler.eps) / (1 - sampler.eps)
            strata = sorted(int(s) for s in torch.floor(u * G).clamp(max=G - 1))
            assert strata == list(range(G)), (world, accumulate, step)


def test_other_steps_and_seeds_draw_other_numbers():
    sampler = UniformTimeSampler()
    base = draws_by_row(sampler, 2, 2, step=3, seed=7)
    for step, seed in [(4, 7), (3, 8)]:
        other = draws_by_row(sampler, 2, 2, step=step, seed=seed)
        assert all(other[g][0] != base[g][0] for g in range(G))
        assert any(not torch.equal(other[g][1], base[g][1]) for g in range(G))


def test_a_row_drawn_at_another_padded_length_keeps_its_numbers():
    keys = DrawKeys(seed=1, step=2, rows=[5, 0], global_batch_size=8)
    short, long = keys.uniform("mask", 7), keys.uniform("mask", 40)
    assert torch.equal(short, long[:, :7])
    assert not torch.equal(short[0], short[1])  # rows have their own streams
    assert not torch.equal(keys.uniform("time", 7), short)  # and streams do not share numbers


def test_keys_refuse_rows_outside_the_global_batch_and_negative_keys():
    with pytest.raises(ValueError, match=r"outside the global batch of 8 rows"):
        DrawKeys(seed=0, step=0, rows=[8], global_batch_size=8)
    with pytest.raises(ValueError, match="non-negative"):
        key_seed(0, -1, 3)
    with pytest.raises(ValueError, match="larger than the micro-batch size 4"):
        global_row_index(4, 5)
