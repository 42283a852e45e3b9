"""Block diffusion: the block-causal mask, the two-copy layout, its bound and the exact block cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from diffllm.diffusion.likelihood import ar_nll, exact_elbo_nll, hidden_set_weight
from diffllm.diffusion.sampler import SamplerConfig, generate
from diffllm.model.attention import set_bidirectional
from diffllm.model.blocks import (
    answer_block_ids,
    block_causal_pattern,
    two_copy_layout,
    two_copy_sources,
)
from diffllm.model.dlm import DiffusionLM
from tests.conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

MASK = 63
PROMPTS = [[1, 5, 6], [1, 9, 10, 11, 12, 3, 4], [1]]


def block_dlm(
    shift: bool, block_size: int = 2, attn: str = "sdpa", seed: int = 0, clean_stream: str = "block"
) -> DiffusionLM:
    model = tiny_llama(64, attn, seed, max_position_embeddings=128, initializer_range=0.2)
    set_bidirectional(model)
    return DiffusionLM(
        model,
        mask_id=MASK,
        shift=shift,
        attention="block_causal",
        attention_options={"block_size": block_size, "clean_stream": clean_stream},
    )


def two_rows():
    """Row 0: prompt 2, answer 4 (two blocks of 2). Row 1: prompt 3, answer 2, one right-pad column."""
    x0 = torch.tensor([[1, 5, 20, 21, 22, 23], [1, 6, 7, 30, 31, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    answer_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]]).bool()
    return x0, attention_mask, answer_mask


def rows_of(strings: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in s.replace(" ", "")] for s in strings])


def test_block_ids_and_the_exact_two_copy_mask():
    x0, attention_mask, answer_mask = two_rows()
    # the prompt: one block per token (causal); after the answer: padding, never a key
    assert answer_block_ids(answer_mask, 2).tolist() == [[-2, -1, 0, 0, 1, 1], [-3, -2, -1, 0, 0, 1]]
    xt = torch.where(answer_mask, MASK, x0)
    layout = two_copy_layout(x0, xt, attention_mask, answer_mask, block_size=2)
    # columns: the row (6) then the noised answer copy (4)
    assert layout.input_ids.tolist() == [
        [1, 5, 20, 21, 22, 23, MASK, MASK, MASK, MASK],
        [1, 6, 7, 30, 31, 0, MASK, MASK, 0, 0],  # copy padding: any token, never a key
    ]
    assert layout.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5]  # the copy repeats them
    assert layout.position_ids[1, [0, 1, 2, 3, 4, 6, 7]].tolist() == [0, 1, 2, 3, 4, 3, 4]
    assert layout.key_ok.tolist() == [[True] * 10, [True] * 5 + [False] + [True, True, False, False]]
    assert layout.noised_at.tolist() == [[-1, -1, 6, 7, 8, 9], [-1, -1, -1, 6, 7, -1]]
    #                    prompt  clean0 clean1  noised0 noised1
    expected0 = rows_of(
        [
            "10 00 00 00 00",  # prompt: causal, as in the AR model
            "11 00 00 00 00",
            "11 11 00 00 00",  # clean block 0: prompt + itself
            "11 11 00 00 00",
            "11 11 11 00 00",  # clean block 1: prompt + clean 0 + itself
            "11 11 11 00 00",
            "11 00 00 11 00",  # noised block 0: prompt + itself
            "11 00 00 11 00",
            "11 11 00 00 11",  # noised block 1: prompt + clean 0 + itself (never noised 0 or clean 1)
            "11 11 00 00 11",
        ]
    )
    assert torch.equal(layout.allowed[0], expected0)
    #                    prompt clean0 pad  noised0  pad pad
    expected1 = rows_of(
        [
            "100 00 0 00 00",
            "110 00 0 00 00",
            "111 00 0 00 00",
            "111 11 0 00 00",  # clean block 0
            "111 11 0 00 00",
            "111 11 0 00 00",  # a padding query (block 1, clean): output unused
            "111 00 0 11 00",  # noised block 0
            "111 00 0 11 00",
            "111 11 0 00 00",  # copy padding (block 1, noised): output unused, never a key
            "111 11 0 00 00",
        ]
    )
    assert torch.equal(layout.allowed[1], expected1)


def test_two_noised_copies_share_the_clean_row_and_never_see_each_other():
    """Row 0 of ``two_rows`` with two noisings (``copies=2``, the complementary pair): the clean row
    once, then copy 1 and copy 2 of the answer. Each copy's block sees the prompt, the clean blocks
    before it and its own block in its own copy; the clean stream sees no noised column, so each
    copy's sub-pattern is exactly the one-copy pattern."""
    x0, attention_mask, answer_mask = two_rows()
    first = torch.where(answer_mask, MASK, x0)
    second = torch.where(answer_mask & (torch.arange(6) % 2 == 0), MASK, x0)  # another noising
    one = two_copy_layout(x0, first, attention_mask, answer_mask, block_size=2)
    two = two_copy_layout(x0, torch.cat([first, second]), attention_mask, answer_mask, block_size=2, copies=2)
    assert two.input_ids[0].tolist() == [1, 5, 20, 21, 22, 23, MASK, MASK, MASK, MASK, MASK, 21, MASK, 23]
    assert two.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 2, 3, 4, 5]
    #                    prompt  clean0 clean1  copy1: n0 n1  copy2: n0 n1
    expected0 = rows_of(
        [
            "10 00 00 00 00 00 00",
            "11 00 00 00 00 00 00",
            "11 11 00 00 00 00 00",
            "11 11 00 00 00 00 00",
            "11 11 11 00 00 00 00",
            "11 11 11 00 00 00 00",
            "11 00 00 11 00 00 00",  # copy 1, block 0: prompt + itself
            "11 00 00 11 00 00 00",
            "11 11 00 00 11 00 00",  # copy 1, block 1: prompt + clean 0 + itself
            "11 11 00 00 11 00 00",
            "11 00 00 00 00 11 00",  # copy 2, block 0: prompt + itself, never copy 1's block 0
            "11 00 00 00 00 11 00",
            "11 11 00 00 00 00 11",  # copy 2, block 1
            "11 11 00 00 00 00 11",
        ]
    )
    assert torch.equal(two.allowed[0], expected0)
    for b in range(2):  # each copy's columns give the one-copy pattern, in both rows (row 1 padded)
        for copy in (0, 1):
            width = one.input_ids.shape[1] - 6
            cols = list(range(6)) + list(range(6 + copy * width, 6 + (copy + 1) * width))
            assert torch.equal(two.allowed[b][cols][:, cols], one.allowed[b])
            assert torch.equal(two.key_ok[b, cols], one.key_ok[b])
    # the sources of both copies' targets, in the row-major order of the stacked (2B, L) targets
    targets = torch.cat([answer_mask, answer_mask])
    flat = two_copy_sources(answer_mask, targets, block_size=2, shift=False, length=6, copies=2)
    assert flat.tolist() == [6, 7, 8, 9, 14 + 6, 14 + 7, 10, 11, 12, 13, 14 + 10, 14 + 11]
    shifted = two_copy_sources(answer_mask, targets, block_size=2, shift=True, length=6, copies=2)
    assert shifted.tolist() == [1, 6, 3, 8, 14 + 2, 14 + 6, 1, 10, 3, 12, 14 + 2, 14 + 10]
    with pytest.raises(ValueError, match=r"xt must be \(2 \* 2, 6\)"):
        two_copy_layout(x0, first, attention_mask, answer_mask, block_size=2, copies=2)


def test_sampler_pattern_of_one_canvas():
    """The sampler's layout: prompt (causal), committed block 0 (clean), current block 1 (noised)."""
    canvas = torch.tensor([[0, 0, 1, 1, 1, 1]]).bool()
    expected = rows_of(
        [
            "10 00 00",
            "11 00 00",
            "11 11 00",  # committed block: clean, never sees the block being decoded
            "11 11 00",
            "11 11 11",  # current block: the prompt, the committed block and itself
            "11 11 11",
        ]
    )
    assert torch.equal(block_causal_pattern(canvas, 6, block_size=2)[0], expected)
    assert torch.equal(block_causal_pattern(canvas, 2, block_size=2)[0], expected[4:])  # queries last
    assert torch.equal(
        block_causal_pattern(canvas[:, :4], 4, block_size=2)[0], rows_of(["1000", "1100", "1111", "1111"])
    )  # block 0 is now the current one: noised, sees itself


def test_shift_reads_a_block_start_from_the_clean_copy_not_the_neighbour():
    x0, _, answer_mask = two_rows()
    width = 6 + 4  # columns per row of the two-copy sequence
    shifted = two_copy_sources(answer_mask, answer_mask, block_size=2, shift=True, length=6)
    # row 0: a=0 <- prompt's last (1); a=1 <- noised a=0 (6); a=2 <- CLEAN a=1 (3), not noised a=1 (7);
    # a=3 <- noised a=2 (8). Row 1: a=0 <- prompt's last (2); a=1 <- noised a=0 (6).
    assert shifted.tolist() == [1, 6, 3, 8, width + 2, width + 6]
    rolled = torch.tensor([1, 6, 7, 8])  # what a plain roll by one would read in row 0
    assert not torch.equal(shifted[:4], rolled)
    plain = two_copy_sources(answer_mask, answer_mask, block_size=2, shift=False, length=6)
    assert plain.tolist() == [6, 7, 8, 9, width + 6, width + 7]
    with pytest.raises(ValueError, match="inside answer_mask"):
        two_copy_sources(answer_mask, ~answer_mask, 2, True, 6)


@torch.no_grad()
def direct_block_elbo(dlm: DiffusionLM, prompt: list[int], answer: list[int], block: int) -> float:
    """The block ELBO by its definition, without any block mask: for each block k and hidden set S of
    it, run the prompt one token at a time (causal), then each clean block before k, then block k
    with S masked, each part on the KV cache of the parts before it (plain full attention, one row,
    no padding), and weight the CE by B(s, b - s + 1)."""
    total, decoder = 0.0, dlm.base.get_decoder()
    for k in range(len(answer) // block):
        clean = answer[k * block : (k + 1) * block]
        for code in range(1, 2**block):
            hidden = [(code >> i) & 1 == 1 for i in range(block)]
            noised = [MASK if h else t for h, t in zip(hidden, clean)]
            parts = [[t] for t in prompt] + [answer[j * block : (j + 1) * block] for j in range(k)] + [noised]
            cache, pos, last, h = DynamicCache(config=dlm.base.config), 0, None, None
            for part in parts:  # each part sees the cache of the parts before it and itself
                last = h[-1] if h is not None else None
                out = decoder(
                    input_ids=torch.tensor([part]),
                    position_ids=torch.arange(pos, pos + len(part))[None],
                    cache=cache,
                    use_cache=True,
                )
                h, pos = out.last_hidden_state[0], pos + len(part)
            if dlm.shift:  # token j of the block from j - 1: the first from the clean part before
                h = torch.cat([last[None], h[:-1]])
            ce = F.cross_entropy(dlm.lm_head(h).double(), torch.tensor(clean), reduction="none")
            total += hidden_set_weight(block, sum(hidden)) * float(ce[torch.tensor(hidden)].sum())
    return total


@pytest.mark.parametrize("shift", [True, False])
def test_block_bound_equals_its_direct_computation(shift):
    dlm = block_dlm(shift, block_size=2).eval()
    rows = [([1, 5, 6], [20, 21, 22, 23]), ([1, 9], [30, 31, 32, 33])]
    length = max(len(p) + len(a) for p, a in rows) + 1  # one right-pad column at least
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros_like(ids)
    answer_mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, (p, a) in enumerate(rows):
        ids[b, : len(p) + len(a)] = torch.tensor(p + a)
        attention_mask[b, : len(p) + len(a)] = 1
        answer_mask[b, len(p) : len(p) + len(a)] = True
    nll, count = exact_elbo_nll(dlm, ids, attention_mask, answer_mask)
    direct = [direct_block_elbo(dlm, p, a, block=2) for p, a in rows]
    assert count.tolist() == [4, 4]
    assert nll.tolist() == pytest.approx(direct, rel=1e-5)
    # and the block bound is another quantity than the full-attention bound of the same weights
    full = DiffusionLM(dlm.model, mask_id=MASK, shift=shift).eval()
    assert not torch.allclose(exact_elbo_nll(full, ids, attention_mask, answer_mask)[0], nll)


def test_block_size_one_with_shift_is_the_ar_model():
    """b = 1, shift: each [MASK] is read from the clean token before it, which sees only the tokens
    before it, so the block bound is the AR NLL of the same weights."""
    dlm = block_dlm(True, block_size=1).eval()
    x0, attention_mask, answer_mask = two_rows()
    bound, count = exact_elbo_nll(dlm, x0, attention_mask, answer_mask)
    ar, ar_count = ar_nll(dlm, x0, attention_mask, answer_mask, adapters=True)
    assert count.tolist() == ar_count.tolist() == [4, 2]
    torch.testing.assert_close(bound.float(), ar, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the sampler and its exact cache

BLOCK_CONFIGS = {
    "greedy-schedule": dict(gen_length=8, steps=8),
    "sampled-schedule": dict(gen_length=8, steps=4, temperature=1.0, top_k=20, strategy="random"),
    "threshold": dict(gen_length=12, threshold=0.2, strategy="margin", temperature=0.7, fill_after_eos=True),
    "cfg": dict(gen_length=6, steps=6, cfg_scale=1.0, temperature=0.5),
}


def run(dlm, config, prompts=PROMPTS, seed=3):
    return generate(dlm, prompts, config, eos_id=59, pad_id=0, seed=seed, record_trajectory=True)


@pytest.mark.parametrize("clean_stream", ["block", "causal"])
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("name", sorted(BLOCK_CONFIGS))
def test_block_cache_equals_the_uncached_block_sampler(name, shift, clean_stream):
    """Tokens, forward passes and commit order; with a causal clean stream the pass that commits a
    block computes its keys/values token-causally, as training did (model.clean_stream)."""
    dlm = block_dlm(shift, block_size=2, clean_stream=clean_stream)
    plain = run(dlm, SamplerConfig(**BLOCK_CONFIGS[name]))
    cached = run(dlm, SamplerConfig(**BLOCK_CONFIGS[name], cache="block"))
    assert torch.equal(plain.canvas, cached.canvas)
    assert plain.nfe == cached.nfe
    for a, b in zip(plain.trajectories, cached.trajectories):
        assert [s.committed for s in a.steps] == [s.committed for s in b.steps]
    assert not (cached.canvas == MASK).any()
    for row, prompt in enumerate(PROMPTS):  # batch invariance with the cache
        alone = run(dlm, SamplerConfig(**BLOCK_CONFIGS[name], cache="block"), prompts=[prompt])
        assert alone.canvas[0].tolist() == cached.canvas[row].tolist()


@pytest.mark.parametrize("shift", [True, False])
def test_block_cache_runs_each_block_once_clean(shift, monkeypatch):
    """Cached: the first call of block k runs [block k-1 clean, block k noised], later calls block k."""
    dlm = block_dlm(shift, block_size=4)
    ran = []
    real = dlm.hidden_states

    def spy(input_ids, attention_mask=None, *args, **kwargs):
        ran.append(input_ids.shape[1])
        return real(input_ids, attention_mask, *args, **kwargs)

    monkeypatch.setattr(dlm, "hidden_states", spy)
    run(dlm, SamplerConfig(gen_length=12, steps=6, cache="block"), prompts=[[1, 5, 6]])
    assert ran == [3 + 4, 4, 4 + 4, 4, 4 + 4, 4]  # 2 steps per block
    ran.clear()
    run(dlm, SamplerConfig(gen_length=12, steps=6), prompts=[[1, 5, 6]])
    assert ran == [7, 7, 11, 11, 15, 15]  # uncached: everything up to the current block


@pytest.mark.parametrize("cache", ["none", "block"])
@pytest.mark.parametrize("clean_stream", ["block", "causal"])
@pytest.mark.parametrize("shift", [True, False])
def test_sampler_sees_what_training_sees(shift, clean_stream, cache):
    """The block sampler's logits of a half-decoded block equal ``noised_logits`` (the training view),
    with and without the block cache, for both clean streams (a sampler deaf to clean_stream=causal
    would compute the committed block's keys/values otherwise than training did)."""
    dlm = block_dlm(shift, block_size=2, clean_stream=clean_stream).eval()
    seen = {}
    from diffllm.diffusion import sampler as sampler_module

    real = sampler_module._BlockCausalDenoiser.__call__

    def spy(self, x, attention_mask, position_ids, lo, hi):
        hidden = real(self, x, attention_mask, position_ids, lo, hi)
        seen.setdefault(lo, (x[:, :hi].clone(), hidden))
        return hidden

    sampler_module._BlockCausalDenoiser.__call__ = spy
    try:
        run(dlm, SamplerConfig(gen_length=4, steps=4, cache=cache), prompts=[[1, 5, 6]])
    finally:
        sampler_module._BlockCausalDenoiser.__call__ = real
    x, hidden = seen[5]  # block 1 (columns 5, 6) at its first step: block 0 committed
    answer_mask = torch.zeros_like(x, dtype=torch.bool)
    answer_mask[:, 3:] = True
    targets = x == MASK
    assert targets[0].tolist() == [False] * 5 + [True, True]
    x0 = torch.where(targets, 7, x)  # the clean values of masked tokens play no role
    logits = dlm.noised_logits(x0, x, targets, torch.ones_like(x), answer_mask)
    torch.testing.assert_close(logits, dlm.lm_head(hidden[0]), rtol=1e-4, atol=1e-5)


def test_block_model_refuses_foreign_caches_and_block_lengths():
    dlm = block_dlm(True, block_size=2)
    with pytest.raises(ValueError, match="cache=block"):
        run(dlm, SamplerConfig(gen_length=4, cache="prefix"))
    with pytest.raises(ValueError, match="block_length=null or 2"):
        run(dlm, SamplerConfig(gen_length=8, block_length=4))
    full = DiffusionLM(dlm.model, mask_id=MASK, shift=True)
    with pytest.raises(ValueError, match="cache=prefix, dual or none"):
        run(full, SamplerConfig(gen_length=4, cache="block"))


@pytest.mark.parametrize("shift", [True, False])
def test_dual_cache(shift):
    """Exact where nothing cached can go stale (a prefix-LM model decoding one block: the cache is the
    prompt); an approximation over several visible blocks, with the uncached sampler's step count."""
    model = tiny_llama(64, "sdpa", 0, max_position_embeddings=128, initializer_range=0.2)
    set_bidirectional(model)
    dlm = DiffusionLM(model, mask_id=MASK, shift=shift, attention="prefix_lm")
    one = dict(gen_length=6, steps=6)
    assert torch.equal(
        run(dlm, SamplerConfig(**one)).canvas, run(dlm, SamplerConfig(**one, cache="dual")).canvas
    )
    many = dict(gen_length=12, steps=12, block_length=4)
    plain, dual = run(dlm, SamplerConfig(**many)), run(dlm, SamplerConfig(**many, cache="dual"))
    assert plain.nfe == dual.nfe and not (dual.canvas == MASK).any()
    for row, prompt in enumerate(PROMPTS):  # batch invariance
        alone = run(dlm, SamplerConfig(**many, cache="dual"), prompts=[prompt])
        assert alone.canvas[0].tolist() == dual.canvas[row].tolist()


# ---------------------------------------------------------------- end to end on the embedded default

BLOCK_RUN = ["model.attention=block_causal", "model.block_size=4"]
# issue 18's options 1-2 on top (TINY_RUN trains 6 steps): a curriculum from AR, the causal clean stream
# and its AR loss, so the end-to-end test below carries them through training, the report and the export
RECIPE = ["model.block_schedule=[[0,1],[3,4]]", "model.clean_stream=causal", "loss.ar_weight=0.5"]


def test_block_size_must_divide_the_answer_padding(tmp_path):
    from diffllm.config.resolvers import compose
    from diffllm.training.module import DiffusionLitModule

    cfg = compose(["model.attention=block_causal", "model.block_size=5", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="model.block_size=5 must divide data.answer_pad_to=16"):
        DiffusionLitModule.from_run_config(cfg)


@pytest.mark.slow
def test_block_model_trains_validates_reports_and_exports(tmp_path):
    """A few steps of the tiny default as a block model (with a curriculum and the causal clean stream's
    AR loss): finite bound in the logged metrics and the report; the export card carries block_size and
    clean_stream, and its adapter and merged folders decode as the checkpoint does (block cache on)."""
    from diffllm.config.resolvers import compose
    from diffllm.inference.export import export
    from diffllm.inference.generation import generate_answers
    from diffllm.inference.loading import load_exported, load_for_inference
    from tests.conftest import TINY_RUN

    out = tmp_path / "run"
    metrics, objects = train_run(compose(TINY_RUN + BLOCK_RUN + RECIPE + [f"output_dir={out}"]))
    assert objects["module"].dlm.block_size == 4 and objects["module"].dlm.clean_stream == "causal"
    assert math.isfinite(metrics["train/ar_ce"]) and metrics["train/block_size"] == 4
    assert math.isfinite(metrics["val/nll_bound"]) and "val/exact_match" in metrics
    report = json.loads((out / "report.json").read_text())
    assert "diffusion" in json.dumps(report)
    # the default quality grid (1, 2, 4, 8 tokens per step) on TINY_RUN's 2 blocks of 4: k=8 gives 1
    # step, which 2 blocks cannot share; the run is not refused, that grid point is a skipped row
    grid = {row["tokens_per_step"]: row for row in report["quality_vs_compute"]}
    assert sorted(grid) == [1, 2, 4, 8] and "skipped" in grid[8]
    assert all("skipped" not in grid[k] for k in (1, 2, 4)), grid
    written = export(out / "checkpoints" / "last.ckpt", tmp_path / "export")
    ckpt_model = load_for_inference(out / "checkpoints" / "last.ckpt")
    questions = ["Reverse these words: cat dog sun", "Sort these numbers: 3 1 2"]
    expected = [r["canvas"] for r in generate_answers(ckpt_model, questions)]
    for kind in ("adapter", "merged"):
        im = load_exported(written[kind])
        assert (
            im.dlm.block_size == 4 and im.dlm.attention == "block_causal" and im.dlm.clean_stream == "causal"
        )
        got = generate_answers(im, questions, sampler_overrides={"cache": "block"})
        assert [r["canvas"] for r in got] == expected


def train_run(cfg):
    from diffllm.training.run import train

    return train(cfg)


def test_benchmark_block_rows_tokens_per_forward_and_goals():
    from diffllm.bench.sampler import (
        AR,
        BLOCK_CACHED,
        BLOCK_NAIVE,
        DUAL,
        NAIVE,
        Measurement,
        build_table,
        check_goals,
        sampler_settings,
    )

    g, rows = 256, 32
    runs = [
        Measurement(NAIVE, g, 16.0, rows * g, 512, 0.50, "s", batches=2, rows=rows),  # 2 batches x 256 steps
        Measurement(BLOCK_NAIVE, g, 16.0, rows * g, 512, 0.50, "s", batches=2, rows=rows),
        Measurement(BLOCK_CACHED, g, 2.0, rows * g, 64, 0.50 - 1 / 32, "s", batches=2, rows=rows),
        Measurement(AR, g, 4.0, rows * g, 18, 0.5, "s", batches=2, rows=rows),
    ]
    assert [m.tokens_per_forward for m in runs] == [1.0, 1.0, 8.0, 256 * 2 / 18]
    table = build_table(runs, rows=rows, batch_size=16, threads=2, device="cpu")
    assert f"| {g} | {BLOCK_CACHED} | s | 64 | 2.00 | 4,096 | 8.00× | 2.00× | 46.9 % | 8.00 |" in table
    goals = [gl for gl in check_goals(runs) if BLOCK_CACHED in gl.text]
    assert [(gl.passed, gl.value[:5]) for gl in goals] == [
        (True, "2.00×"),
        (False, "+3.1 "),
        (False, "+3.1 "),
    ]
    assert sampler_settings(DUAL, 64, block=16)["cache"] == "dual"
    assert sampler_settings(BLOCK_CACHED, 64, block=4)["cache"] == "block"
    assert sampler_settings(BLOCK_CACHED, 64, block=4)["block_length"] == 4
