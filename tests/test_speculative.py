"""Self-speculative decoding: drafted by the block model, verified causally (sampler.mode=speculative)."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from diffllm.assets import TINY_AR_BASE, TINY_VAL
from diffllm.data.template import end_of_answer_id, get_format
from diffllm.data.tiny_tasks import read_jsonl
from diffllm.diffusion.sampler import SamplerConfig, generate
from diffllm.diffusion.speculative import _accept_greedy, _accept_sampled
from diffllm.diffusion.strategies import TokenSampling
from diffllm.model.ar_generate import ar_generate
from diffllm.model.attention import set_bidirectional
from diffllm.model.dlm import DiffusionLM, ar_mode
from diffllm.model.load import build_diffusion_model
from tests.conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
SPECULATIVE = dict(mode="speculative", cache="block", future_blocks="hidden")


def converted(
    dtype: torch.dtype, seed: int = 0, std: float = 0.05, clean_stream: str = "block"
) -> tuple[DiffusionLM, object]:
    """The tiny default's AR base converted to a block model (block 4) whose LoRA B matrices are drawn
    at random (std ``std``): a drafter that agrees with its base often but not always, so that rounds
    accept whole blocks, parts of blocks and nothing. Seeded whole: PEFT draws the LoRA A matrices from
    the global generator, which the tests run before this one would otherwise move."""
    torch.manual_seed(seed)
    dlm, tok = build_diffusion_model(
        str(TINY_AR_BASE), LORA, attention="block_causal", block_size=4, clean_stream=clean_stream
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in dlm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return dlm.to(dtype).eval(), tok


@pytest.fixture(scope="module")
def tiny64():
    return converted(torch.float64)


def val_prompts(tok, rows: int | None = None) -> list[list[int]]:
    fmt = get_format("short")
    return [fmt.prompt_ids(r, tok) for r in read_jsonl(TINY_VAL)[:rows]]


def rounds_check(out, canvas: torch.Tensor, eos_id: int, gen_length: int, block: int) -> int:
    """The bookkeeping of every row: a round commits its accepted drafts + 1 (fewer only at the end),
    never more than the rest of its block + 1, and the rounds commit exactly the answer through EOS.
    Returns the number of rounds whose draft was rejected at some position (the verifier corrected it)."""
    assert out.verify_nfe == out.steps == sum(len(c) for c in out.committed)
    rejected = 0
    for row, (accepted, committed) in enumerate(zip(out.accepted, out.committed)):
        answer = canvas[row].tolist()
        length = answer.index(eos_id) + 1 if eos_id in answer else gen_length
        assert sum(committed) == length and all(c >= 1 for c in committed)
        n = 0
        for a, c in zip(accepted, committed):
            room = block - n % block  # draft positions left in the block
            assert a <= room and c <= room + 1
            assert c == a + 1 or n + c == length  # + the verifier's token, unless the answer ended
            rejected += a < room and c == a + 1
            n += c
    return rejected


@pytest.mark.parametrize(
    "gen_length, draft",
    [(16, "single"), (4, "single"), (16, "denoise")],
    ids=["G16-single", "G4-single-cut", "G16-denoise-threshold"],
)
def test_greedy_speculative_output_is_the_ar_output(tiny64, gen_length, draft):
    """float64, 24 validation prompts: token for token the AR model's greedy answers (``ar_generate``),
    rows ending early (G = 16: every answer ends; G = 4: some are cut at G), rejected drafts and
    blocks committed in parts all present."""
    dlm, tok = tiny64
    prompts = val_prompts(tok, 24)
    eos = tok.eos_token_id
    extra = dict(threshold=0.5) if draft == "denoise" else {}
    config = SamplerConfig(gen_length=gen_length, draft=draft, **SPECULATIVE, **extra)
    out = generate(dlm, prompts, config, eos_id=eos, pad_id=tok.pad_token_id)
    ar = ar_generate(dlm, prompts, max_new_tokens=gen_length, eos_id=eos, pad_id=tok.pad_token_id)
    assert out.tokens == ar.tokens
    ended = [eos in row for row in out.canvas.tolist()]
    assert ended == ar.ended and any(ended) and (all(ended) if gen_length == 16 else not all(ended))
    assert not (out.canvas == dlm.mask_id).any()
    rejected = rounds_check(out, out.canvas, eos, gen_length, 4)
    accepted = [a for row in out.accepted for a in row]
    # rejected drafts, and accepted ones: a random-LoRA drafter gets the first masked token of a single
    # pass right (read from the clean token before it) but rarely the ones after it; its own block loop
    # (draft=denoise) drafts (nearly) whole blocks the base agrees with
    assert rejected > 0 and max(accepted) >= (3 if draft == "denoise" else 1)
    partial = [c for row in out.committed for c in row[:-1] if 1 < c < 5]
    assert partial, "no block was committed in parts"
    assert out.nfe == out.draft_nfe + out.verify_nfe
    assert 0 < out.mean_accepted < out.tokens_per_verify <= 5


@pytest.mark.slow
def test_greedy_speculative_output_on_every_val_prompt(tiny64):
    """All 500 validation prompts of the tiny default, float64, G = 16 (the default canvas)."""
    dlm, tok = tiny64
    prompts = val_prompts(tok)
    config = SamplerConfig(gen_length=16, **SPECULATIVE)
    out = generate(dlm, prompts, config, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    ar = ar_generate(dlm, prompts, max_new_tokens=16, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    assert len(prompts) == 500 and out.tokens == ar.tokens


def near_tie_report(model, prompt: list[int], ours: list[int], reference: list[int], mask_id: int):
    """(first differing answer position, the reference model's top-2 logit gap there) or None when equal.

    The gap is computed by one full causal forward pass of ``model`` (adapters off) on the prompt and
    the common prefix: a gap near 0 is a floating-point near-tie, anything else a bug."""
    if ours == reference:
        return None
    at = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
    with torch.no_grad(), ar_mode(model.model):
        logits = model.base(torch.tensor([prompt + reference[:at]])).logits[0, -1].double()
    logits[mask_id] = -math.inf
    top = logits.topk(2).values
    return at, float(top[0] - top[1])


def test_float32_speculative_output_is_the_ar_output(tmp_path):
    """float32 (the dtype a user runs): equal on 24 prompts, or the report names a near-tie."""
    dlm, tok = converted(torch.float32, seed=1)
    prompts = val_prompts(tok, 24)
    config = SamplerConfig(gen_length=16, **SPECULATIVE)
    out = generate(dlm, prompts, config, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    ar = ar_generate(dlm, prompts, max_new_tokens=16, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    reports = [near_tie_report(dlm, p, a, b, dlm.mask_id) for p, a, b in zip(prompts, out.tokens, ar.tokens)]
    assert all(r is None or r[1] < 1e-4 for r in reports), reports


def test_block_cache_handles_blocks_committed_in_parts(tiny64):
    """With partial commits the block cache drafts what the uncached drafter drafts: the same accepted
    lengths round for round (a cache that kept a half-committed block's keys would change them)."""
    dlm, tok = tiny64
    prompts = val_prompts(tok, 12)
    runs = {
        cache: generate(
            dlm,
            prompts,
            SamplerConfig(gen_length=16, mode="speculative", cache=cache, future_blocks="hidden"),
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
        )
        for cache in ("none", "block")
    }
    assert runs["block"].accepted == runs["none"].accepted
    assert runs["block"].committed == runs["none"].committed
    assert any(1 < c < 5 for row in runs["block"].committed for c in row[:-1])


def test_acceptance_rule_greedy():
    logits = torch.full((4, 10), -1.0)
    for i, token in enumerate([5, 6, 9, 3]):
        logits[i, token] = 1.0  # the verifier's choices at positions n .. n + 3
    j, token = _accept_greedy(torch.tensor([5, 6, 7]), logits)
    assert (j, int(token)) == (2, 9)  # two accepted, then the verifier's correction
    j, token = _accept_greedy(torch.tensor([5, 6, 9]), logits)
    assert (j, int(token)) == (3, 3)  # all accepted, then the verifier's next token
    j, token = _accept_greedy(torch.tensor([1, 6, 9]), logits)
    assert (j, int(token)) == (0, 5)  # the first disagrees: one token, the verifier's


def test_acceptance_rule_sampled_keeps_p():
    """One position: P(out = v) = sum_d q(d) P(out = v | d) = p(v) for the rule min(1, p/q), then the
    residual norm(max(p - q, 0)) (Monte Carlo, 5,000 draws; 3 sigma of a frequency <= 0.022)."""
    p_logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    p = p_logits[0].softmax(-1)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    draws = 5_000
    drafts = torch.multinomial(q[0], draws, replacement=True, generator=gen)
    for d in drafts.tolist():
        j, token = _accept_sampled(torch.tensor([d]), q, p_logits, TokenSampling(temperature=1.0), gen)
        if j == 0:
            counts[int(token)] += 1
        else:
            counts[d] += 1
    assert torch.allclose(counts / draws, p, atol=0.022)
    assert not torch.allclose(q[0], p, atol=0.1)  # the draft alone would fail


def test_exported_merged_model_needs_the_base_beside_it(tiny64):
    dlm, tok = tiny64
    merged = dlm.merged_copy()  # what an exported merged folder holds: no adapters to switch off
    prompts = val_prompts(tok, 6)
    config = SamplerConfig(gen_length=16, **SPECULATIVE)
    with pytest.raises(ValueError, match="no adapters .* pass the base model as verifier="):
        generate(merged, prompts, config, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(TINY_AR_BASE, dtype=torch.float64).eval()
    out = generate(merged, prompts, config, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, verifier=base)
    ar = ar_generate(base, prompts, max_new_tokens=16, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    assert out.tokens == ar.tokens


def test_settings_speculative_decoding_refuses():
    with pytest.raises(ValueError, match="temperature=0.7 with sampler.draft='denoise'.*single-pass"):
        SamplerConfig(gen_length=8, mode="speculative", draft="denoise", temperature=0.7)
    with pytest.raises(
        ValueError, match=re.escape("sampler.mode='fast' is out of range; valid: denoise | speculative")
    ):
        SamplerConfig(gen_length=8, mode="fast")
    with pytest.raises(
        ValueError, match=re.escape("sampler.verifier='ar' is out of range; valid: base | self")
    ):
        SamplerConfig(gen_length=8, mode="speculative", verifier="ar")


def test_verifier_self_needs_a_causal_clean_stream(tiny64):
    dlm, tok = tiny64
    config = SamplerConfig(gen_length=8, mode="speculative", verifier="self", cache="block")
    with pytest.raises(ValueError, match="verifier=self needs .*clean_stream=causal"):
        generate(dlm, val_prompts(tok, 1), config, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)


@pytest.mark.parametrize("gen_length", [16, 4], ids=["G16", "G4-cut"])
def test_verifier_self_output_is_the_causal_clean_stream_greedy_output(gen_length):
    """``verifier=self`` on a ``clean_stream=causal`` block model, float64: token for token the greedy
    answers of the model itself run causally with its adapters on (``ar_generate(adapters=True)``),
    which differ from the base's (the random LoRA is on), with rejected and accepted drafts."""
    dlm, tok = converted(torch.float64, seed=2, clean_stream="causal")
    prompts = val_prompts(tok, 16)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    config = SamplerConfig(gen_length=gen_length, verifier="self", **SPECULATIVE)
    out = generate(dlm, prompts, config, eos_id=eos, pad_id=pad)
    own = ar_generate(dlm, prompts, max_new_tokens=gen_length, eos_id=eos, pad_id=pad, adapters=True)
    base = ar_generate(dlm, prompts, max_new_tokens=gen_length, eos_id=eos, pad_id=pad)
    assert out.tokens == own.tokens
    if gen_length == 16:  # the random LoRA shows within 16 tokens (not always within 4)
        assert own.tokens != base.tokens
    assert not (out.canvas == dlm.mask_id).any()
    rejected = rounds_check(out, out.canvas, eos, gen_length, 4)
    assert rejected > 0 and max(a for row in out.accepted for a in row) >= 1


def test_trajectory_commits_every_answer_position_once(tiny64):
    dlm, tok = tiny64
    config = SamplerConfig(gen_length=16, **SPECULATIVE)
    out = generate(
        dlm,
        val_prompts(tok, 4),
        config,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        record_trajectory=True,
    )
    for row, trajectory in enumerate(out.trajectories):
        positions = [p for step in trajectory.steps for p in step.committed + step.filled]
        assert sorted(positions) == list(range(16))
        assert trajectory.final_canvas == out.canvas[row].tolist()
        assert len(trajectory.steps) == len(out.committed[row])


def test_on_step_hands_over_every_round_as_it_is_committed(tiny64):
    """A live view of speculative decoding: frame 0 all [MASK], then one frame per verify pass with the
    decoded row's round (the very object its trajectory records) and None for the other rows; each
    frame shows the tokens committed so far, so the canvases fill in order; the output is unchanged."""
    dlm, tok = tiny64
    config = SamplerConfig(gen_length=16, **SPECULATIVE)
    prompts = val_prompts(tok, 3)
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    frames, shown = [], []

    def on_step(frame):
        frames.append(frame)
        shown.append([None if r is None else list(r.canvas) for r in frame.rows])

    live = generate(dlm, prompts, config, on_step=on_step, record_trajectory=True, **kw)
    plain = generate(dlm, prompts, config, **kw)
    assert (
        live.canvas.equal(plain.canvas) and live.committed == plain.committed and plain.trajectories is None
    )
    mask = int(dlm.mask_id)
    assert frames[0].index == 0 and all(r.canvas == [mask] * 16 for r in frames[0].rows)
    assert [f.index for f in frames] == list(range(len(frames)))
    assert len(frames) == 1 + sum(len(c) for c in live.committed)
    i = 1
    for row, trajectory in enumerate(live.trajectories):
        for step in trajectory.steps:
            f = frames[i]
            assert f.rows[row] is step and all(r is None for k, r in enumerate(f.rows) if k != row)
            assert shown[i][row] == step.canvas  # handed over as it was, not changed afterwards
            done = {
                p
                for s in trajectory.steps[: trajectory.steps.index(step) + 1]
                for p in s.committed + s.filled
            }
            assert all((step.canvas[p] == mask) == (p not in done) for p in range(16))
            i += 1
        assert shown[i - 1][row] == live.canvas[row].tolist()  # the last round carries the EOS fill


# ---------------------------------------------------------------- sampling: the verifier's distribution

VOCAB, SMALL_MASK, SMALL_EOS = 5, 4, 2  # tokens 0-3, EOS = 2, [MASK] = 4
SMALL_PROMPT, SMALL_G = [1, 0, 3], 4


def small_vocab_models() -> tuple[DiffusionLM, DiffusionLM]:
    """(a drafter, the verifier): two random LLaMAs over a 5-token vocabulary with peaked logits, the
    drafter a block model (block 2) whose answers follow a law far from the verifier's."""

    def model(seed: int):
        return tiny_llama(VOCAB, seed=seed, initializer_range=1.0).double().eval()

    verifier = DiffusionLM(model(1), mask_id=SMALL_MASK)
    draft_model = set_bidirectional(model(2))
    drafter = DiffusionLM(
        draft_model,
        mask_id=SMALL_MASK,
        shift=True,
        attention="block_causal",
        attention_options={"block_size": 2},
    )
    return drafter, verifier


def verifier_law(verifier: DiffusionLM) -> dict[tuple[int, ...], float]:
    """The verifier's exact law of the answer (up to its first EOS, at most SMALL_G tokens), enumerated."""
    law: dict[tuple[int, ...], float] = {}

    def walk(prefix: list[int], prob: float) -> None:
        if len(prefix) == SMALL_G or (prefix and prefix[-1] == SMALL_EOS):
            law[tuple(prefix)] = prob
            return
        with torch.no_grad():
            logits = verifier.base(torch.tensor([SMALL_PROMPT + prefix])).logits[0, -1]
        logits[SMALL_MASK] = -math.inf
        for token, p in enumerate(logits.softmax(-1).tolist()):
            if p > 0:
                walk(prefix + [token], prob * p)

    walk([], 1.0)
    return law


def answer_of(canvas: torch.Tensor) -> tuple[int, ...]:
    answer = canvas.tolist()
    return tuple(answer[: answer.index(SMALL_EOS) + 1] if SMALL_EOS in answer else answer)


def total_variation(counts: dict, law: dict[tuple[int, ...], float]) -> float:
    draws = sum(counts.values())
    return 0.5 * sum(abs(counts.get(k, 0) / draws - law.get(k, 0.0)) for k in set(counts) | set(law))


@pytest.mark.slow
def test_sampled_speculative_output_follows_the_verifier():
    """Temperature 1, answers of up to 4 tokens in blocks of 2 (EOS may end them early), 600 seeds:
    the empirical law of the speculative answers is the verifier's within 3 E[TV], E[TV] ~ 0.5 sum_k
    sqrt(2 p_k (1 - p_k) / (pi N)) the expected total variation of N exact draws from the verifier's
    law p (0.042 here, so the tolerance is 0.125); the drafter's own answers are far from it (TV > 0.3),
    so the test fails if drafts were committed unverified."""
    drafter, verifier = small_vocab_models()
    law = verifier_law(verifier)
    draws = 600
    expected_tv = 0.5 * sum(math.sqrt(2 * p * (1 - p) / (math.pi * draws)) for p in law.values())
    assert expected_tv < 0.045
    config = SamplerConfig(gen_length=SMALL_G, temperature=1.0, mode="speculative", cache="block")
    counts: dict[tuple[int, ...], int] = {}
    partial = 0
    for seed in range(draws):
        out = generate(
            drafter, [SMALL_PROMPT], config, eos_id=SMALL_EOS, pad_id=0, seed=seed, verifier=verifier
        )
        key = answer_of(out.canvas[0])
        counts[key] = counts.get(key, 0) + 1
        partial += sum(a < 2 for a in out.accepted[0])
    assert partial > draws // 4  # rejections (the residual draw) are frequent
    assert total_variation(counts, law) <= 3 * expected_tv
    drafted: dict[tuple[int, ...], int] = {}  # the drafter alone, one pass per block
    alone = SamplerConfig(gen_length=SMALL_G, steps=2, temperature=1.0, cache="block")
    for seed in range(300):
        key = answer_of(
            generate(drafter, [SMALL_PROMPT], alone, eos_id=SMALL_EOS, pad_id=0, seed=seed).canvas[0]
        )
        drafted[key] = drafted.get(key, 0) + 1
    assert total_variation(drafted, law) > 0.3


# ---------------------------------------------------------------- SmolLM2-135M-Instruct


def smollm2_folder() -> Path | None:
    from diffllm.assets.smollm2 import is_built, smollm2_dir

    folder = smollm2_dir(None)
    return folder if is_built(folder) else None


@pytest.mark.slow
@pytest.mark.skipif(
    smollm2_folder() is None, reason="SmolLM2-135M-Instruct is not built (python -m diffllm.assets smollm2)"
)
def test_smollm2_speculative_output_and_its_near_ties():
    """Real weights, float32: the block conversion (untrained LoRA, block 4) drafts, the base verifies;
    on 3 Alpaca-style prompts at G = 32 the output is the AR greedy output, or the first differing
    position is a near-tie of the base (top-2 logit gap < 1e-3), which the test reports."""
    folder = str(smollm2_folder())
    dlm, tok = build_diffusion_model(folder, LORA, attention="block_causal", block_size=4)
    dlm.eval()
    fmt = get_format("chat")  # SmolLM2-Instruct's own template
    rows = [
        {"instruction": "Give three tips for staying healthy.", "input": ""},
        {"instruction": "What is the capital of France?", "input": ""},
        {"instruction": "Write a haiku about the sea.", "input": ""},
    ]
    prompts = [fmt.prompt_ids(r, tok) for r in rows]
    eos = end_of_answer_id(tok, "chat")
    config = SamplerConfig(gen_length=32, **SPECULATIVE)
    out = generate(dlm, prompts, config, eos_id=eos, pad_id=tok.pad_token_id)
    ar = ar_generate(dlm, prompts, max_new_tokens=32, eos_id=eos, pad_id=tok.pad_token_id)
    reports = [near_tie_report(dlm, p, a, b, dlm.mask_id) for p, a, b in zip(prompts, out.tokens, ar.tokens)]
    print("first differing position and top-2 logit gap per prompt (None = equal):", reports)
    assert all(r is None or r[1] < 1e-3 for r in reports), reports
    assert out.mean_accepted > 0


# ---------------------------------------------------------------- the benchmark's speculative rows


def test_benchmark_speculative_row_agreement_and_goal():
    from diffllm.bench.sampler import (
        AR,
        SPECULATIVE,
        Measurement,
        agreement,
        build_table,
        check_goals,
        sampler_settings,
    )

    config = SamplerConfig(**sampler_settings(SPECULATIVE, 64, block=4))
    assert (config.mode, config.verifier, config.draft, config.cache) == (
        "speculative",
        "base",
        "single",
        "block",
    )
    assert agreement([[1, 2], [3], [4, 5]], [[1, 2], [3, 9], [4, 5]]) == pytest.approx(2 / 3)
    rows, g = 128, 128
    ar = Measurement(AR, g, 4.0, 6000, 6100, 0.9, "s", batches=rows, rows=rows, agreement=1.0)
    spec = Measurement(
        SPECULATIVE, g, 2.5, 6000, 2400, 0.9, "s", batches=rows, rows=rows, agreement=1.0, accepted=2.6
    )
    table = build_table([spec, ar], rows=rows, batch_size=1, threads=1, device="cpu")
    # 6000 answer tokens in 2.5 s: 2,400 tokens/s, 1.6x AR's 1,500; 6000 / 2400 = 2.5 tokens per pass
    assert (
        f"| {SPECULATIVE} | s | 2400 | 2.50 | 2,400 | – | 1.60× | 90.0 % | 2.50 | 100.0 % | 2.60 |" in table
    )
    goal = [gl for gl in check_goals([spec, ar]) if SPECULATIVE in gl.text]
    assert [gl.passed for gl in goal] == [True] and goal[0].value.startswith(
        "1.60×, agreement with AR 100.0 %"
    )
    inexact = dataclasses.replace(spec, agreement=127 / 128)  # fast, but one answer differs from AR's
    assert [gl.passed for gl in check_goals([inexact, ar]) if SPECULATIVE in gl.text] == [False]
    slow = dataclasses.replace(spec, seconds=3.0)  # exact, 1.33x
    assert [gl.passed for gl in check_goals([slow, ar]) if SPECULATIVE in gl.text] == [False]


def test_generate_answers_of_a_merged_export_verify_with_the_base(tiny_run, tmp_path):
    """An exported merged folder has no adapters: ``generate_answers`` loads the recorded base beside it,
    and the speculative answers are the checkpoint's AR answers (adapters off) token for token."""
    from diffllm.inference.export import export_model
    from diffllm.inference.generation import generate_answers
    from diffllm.inference.loading import load_exported, load_for_inference

    checkpoint = load_for_inference(tiny_run[1])
    export_model(checkpoint, tmp_path, ["merged"])
    merged = load_exported(tmp_path / "merged")
    instructions = ["Reverse these words: cat dog sun", "What is 3 + 4?", "Repeat these words: red blue"]
    overrides = {"mode": "speculative", "cache": "none", "future_blocks": "hidden", "block_length": 4}
    got = generate_answers(merged, instructions, sampler_overrides=overrides)
    want = generate_answers(checkpoint, instructions, ar=True)
    assert [r["answer_ids"] for r in got] == [r["ar_answer_ids"] for r in want]


def test_benchmark_interleaved_timing_measures_the_same_outputs(tiny64):
    """``measure(interleave=True)`` (methods taking turns batch by batch) gives every method the outputs,
    forward passes, agreement and accepted lengths of the method-by-method run; only the seconds differ."""
    import types

    from diffllm.bench.sampler import AR, BLOCK_CACHED, SPECULATIVE, measure

    dlm, tok = tiny64
    model = types.SimpleNamespace(tokenizer=tok, dlm=dlm, eos_id=tok.eos_token_id)
    prompts = val_prompts(tok, 6)
    refs = [r["output"] for r in read_jsonl(TINY_VAL)[:6]]
    runs = [
        measure(
            model,
            prompts,
            refs,
            [16],
            batch_size=2,
            methods=[SPECULATIVE, BLOCK_CACHED, AR],
            block_model=model,
            interleave=interleave,
        )
        for interleave in (False, True)
    ]
    fields = [
        [(m.method, m.tokens, m.nfe, m.exact_match, m.agreement, m.accepted, m.batches) for m in run]
        for run in runs
    ]
    assert fields[0] == fields[1]
    by = {m.method: m for m in runs[1]}
    assert by[AR].method == runs[1][0].method and by[SPECULATIVE].agreement == 1.0
    assert by[SPECULATIVE].accepted is not None and by[AR].nfe > 0
