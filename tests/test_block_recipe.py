"""Issue 18, options 1 and 2: a block-size curriculum from AR (``model.block_schedule``) and an AR
loss on a token-causal clean stream (``model.clean_stream=causal``, ``loss.ar_weight``)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from diffllm.config.resolvers import compose
from diffllm.config.schema import ConfigError, check_run_config
from diffllm.diffusion.forward import forward_process
from diffllm.diffusion.likelihood import ar_nll, causal_token_ce, exact_elbo_nll
from diffllm.diffusion.order import mean_over_orders, order_nll
from diffllm.model.attention import set_bidirectional
from diffllm.model.blocks import scheduled_block_size, two_copy_layout
from diffllm.model.dlm import DiffusionLM, adapters_disabled, source_positions
from tests.conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

MASK, EOS = 63, 59


def lora_block_dlm(block_size: int, clean_stream: str = "block", shift: bool = True) -> DiffusionLM:
    """A tiny block model with LoRA adapters whose B is non-zero (so the adapters change the logits),
    dropout off, in eval mode."""
    model = set_bidirectional(tiny_llama(64, "sdpa", 0, max_position_embeddings=128, initializer_range=0.2))
    model = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        ),
    )
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3, generator=gen)
    options = {"block_size": block_size, "clean_stream": clean_stream}
    return DiffusionLM(
        model, mask_id=MASK, shift=shift, attention="block_causal", attention_options=options
    ).eval()


def padded_rows():
    """Two rows: prompt, answer, its end token, EOS padding (to 8 answer positions), right padding.

    answer_mask covers the padding (training's span); score_mask is the answer + its first EOS."""
    x0 = torch.tensor(
        [
            [1, 5, 20, 21, 22, 23, 24, EOS, EOS, EOS, 0],
            [1, 6, 7, 30, 31, EOS, EOS, EOS, EOS, EOS, EOS],
        ]
    )
    attention_mask = torch.tensor([[1] * 10 + [0], [1] * 11])
    answer_mask = torch.zeros_like(x0, dtype=torch.bool)
    answer_mask[0, 2:10] = True
    answer_mask[1, 3:11] = True
    score_mask = torch.zeros_like(answer_mask)
    score_mask[0, 2:8] = True
    score_mask[1, 3:6] = True
    return x0, attention_mask, answer_mask, score_mask


def causal_next_token_logits(dlm: DiffusionLM, x0, attention_mask, targets) -> torch.Tensor:
    """(N, V) the causal model's (adapters on) logits at i - 1 for the N True ``targets`` i."""
    hidden = dlm.hidden_states(x0, attention_mask, attention="causal")  # (B, L, H)
    return dlm.lm_head(hidden[source_positions(targets, shift=True)])


# -- option 1: block size 1 is the AR model ------------------------------------------------------------
def test_the_size_in_force_is_a_function_of_the_step():
    schedule = [[0, 1], [150, 2], [300, 4]]
    steps = [0, 1, 149, 150, 151, 299, 300, 10**6]
    assert [scheduled_block_size(schedule, s) for s in steps] == [1, 1, 1, 2, 2, 2, 4, 4]
    assert scheduled_block_size(None, 7) is None


@pytest.mark.parametrize("clean_stream", ["block", "causal"])
@torch.no_grad()
def test_at_block_size_one_the_masked_logits_are_the_causal_models_next_token_logits(clean_stream):
    """The curriculum's first phase: a model whose final size is 4, run at size 1 (as training runs it
    at step 0 of [[0, 1], ..., [s, 4]]), predicts every [MASK] with the causal model's next-token
    logits, adapters on; at size 4 it does not, and neither does the model with its adapters off."""
    dlm = lora_block_dlm(block_size=4, clean_stream=clean_stream)
    x0, attention_mask, answer_mask, _ = padded_rows()
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        xt, hidden = forward_process(x0, answer_mask, torch.full((2,), 0.6), MASK, gen)
        assert hidden.sum() > 2
        at_one = dlm.noised_logits(x0, xt, hidden, attention_mask, answer_mask, block_size=1)
        reference = causal_next_token_logits(dlm, x0, attention_mask, hidden)
        torch.testing.assert_close(at_one, reference, rtol=1e-4, atol=1e-5)
        final = dlm.noised_logits(x0, xt, hidden, attention_mask, answer_mask)  # the model's own size, 4
        assert not torch.allclose(final, reference, atol=1e-3)
        with adapters_disabled(dlm.model):
            base = causal_next_token_logits(dlm, x0, attention_mask, hidden)
        assert not torch.allclose(at_one, base, atol=1e-3)  # the adapters matter: B is non-zero


@pytest.mark.parametrize("clean_stream", ["block", "causal"])
def test_at_block_size_one_the_exact_elbo_of_the_answer_is_its_ar_nll(clean_stream):
    """b = 1, shift, adapters on: the exact ELBO of the answer and its end token (the EOS padding left
    out of the span) equals the AR NLL of the adapted causal model, row by row."""
    dlm = lora_block_dlm(block_size=1, clean_stream=clean_stream)
    x0, attention_mask, _, score_mask = padded_rows()
    bound, count = exact_elbo_nll(dlm, x0, attention_mask, score_mask)
    ar, ar_count = ar_nll(dlm, x0, attention_mask, score_mask, adapters=True)
    assert count.tolist() == ar_count.tolist() == [6, 3]
    torch.testing.assert_close(bound.float(), ar, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), adapters_disabled(dlm.model):
        base = ar_nll(dlm, x0, attention_mask, score_mask)[0]
    assert not torch.allclose(base, ar, atol=1e-3)
    wider = lora_block_dlm(block_size=2, clean_stream=clean_stream)  # the same weights, blocks of 2
    assert not torch.allclose(exact_elbo_nll(wider, x0, attention_mask, score_mask)[0].float(), ar, atol=1e-3)


# -- option 2: the causal clean stream -----------------------------------------------------------------
def rows_of(strings: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in s.replace(" ", "")] for s in strings])


def test_the_exact_two_copy_mask_of_a_causal_clean_stream():
    """Row: prompt 2, answer 4 in blocks of 2. Clean blocks are token-causal inside; the noised copy
    sees whole clean blocks before it, as with clean_stream=block."""
    x0 = torch.tensor([[1, 5, 20, 21, 22, 23]])
    answer_mask = torch.tensor([[0, 0, 1, 1, 1, 1]]).bool()
    xt = torch.where(answer_mask, MASK, x0)
    causal = two_copy_layout(x0, xt, None, answer_mask, 2, clean_stream="causal").allowed[0]
    block = two_copy_layout(x0, xt, None, answer_mask, 2, clean_stream="block").allowed[0]
    #                    prompt  clean0 clean1  noised0 noised1
    expected = rows_of(
        [
            "10 00 00 00 00",
            "11 00 00 00 00",
            "11 10 00 00 00",  # clean block 0, token-causal
            "11 11 00 00 00",
            "11 11 10 00 00",  # clean block 1, token-causal
            "11 11 11 00 00",
            "11 00 00 11 00",  # noised block 0: prompt + itself
            "11 00 00 11 00",
            "11 11 00 00 11",  # noised block 1: prompt + whole clean block 0 + itself
            "11 11 00 00 11",
        ]
    )
    assert torch.equal(causal, expected)
    only_block = torch.zeros_like(block)
    only_block[2, 3] = only_block[4, 5] = True  # a clean token seeing the next one of its block
    assert torch.equal(block & ~causal, only_block) and not (causal & ~block).any()


@pytest.mark.parametrize("clean_stream", ["block", "causal"])
@torch.no_grad()
def test_a_later_clean_token_changes_no_earlier_clean_logit(clean_stream):
    """Changing answer token 2 (block 0 of size 4): with a causal clean stream the clean copy's
    next-token logits for answer tokens 0..2 (read at -1..1) stay exactly as they were, and they
    equal the causal model's; with clean_stream=block the clean copy at 0 and 1 sees token 2."""
    dlm = lora_block_dlm(block_size=4, clean_stream=clean_stream)
    x0, attention_mask, answer_mask, score_mask = padded_rows()
    xt = torch.where(answer_mask, MASK, x0)
    targets = answer_mask & (x0 != x0)  # no denoising target needed here
    edited = x0.clone()
    edited[torch.arange(2), answer_mask.long().argmax(1) + 2] = 9  # answer token 2 of each row
    _, before = dlm.two_copy_logits(x0, xt, targets, attention_mask, answer_mask, clean_targets=score_mask)
    _, after = dlm.two_copy_logits(edited, xt, targets, attention_mask, answer_mask, clean_targets=score_mask)
    earlier = torch.tensor([0, 1, 2, 6, 7, 8])  # rows' scored tokens 0..2 (row 0 has 6, row 1 has 3)
    later = torch.tensor([3, 4, 5])  # row 0's tokens 3..5: they see the edit under both rules
    assert not torch.allclose(before[later], after[later], atol=1e-4)
    if clean_stream == "causal":
        assert torch.equal(before[earlier], after[earlier])
        torch.testing.assert_close(
            before, causal_next_token_logits(dlm, x0, attention_mask, score_mask), rtol=1e-4, atol=1e-5
        )
    else:
        assert torch.equal(before[0], after[0])  # read at the prompt's last token: before the answer
        for i in (1, 2, 7, 8):  # read inside block 0, which holds the edited token
            assert not torch.allclose(before[i], after[i], atol=1e-4)


@pytest.mark.parametrize("clean_stream", ["block", "causal"])
def test_the_order_nll_of_a_block_model_averages_to_its_exact_elbo(clean_stream):
    """The L2R figure of the report runs the training view (the two-copy layout): averaged over every
    order it is the exact ELBO for both clean streams (one canvas with the block mask would put a
    causal clean stream's half-revealed block on the clean side)."""
    dlm = lora_block_dlm(block_size=2, clean_stream=clean_stream)
    ids = torch.tensor([[1, 5, 6, 20, 21, 22, 23]])
    answer = torch.tensor([[0, 0, 0, 1, 1, 1, 1]]).bool()
    exact, _ = exact_elbo_nll(dlm, ids, None, answer)
    assert mean_over_orders(dlm, ids, None, answer).item() == pytest.approx(exact.item(), rel=1e-5)
    assert order_nll(dlm, ids, None, answer).item() != pytest.approx(exact.item(), rel=1e-3)


@pytest.mark.parametrize(
    "block_size, clean_stream, shift", [(4, "causal", True), (2, "block", True), (4, "block", False)]
)
def test_blockwise_left_to_right_nll_equals_the_per_token_chain(block_size, clean_stream, shift):
    """A block model's L2R NLL in ``block_size`` passes (every block's token j at once) equals the
    per-token chain (one forward row per answer token, forced by explicit left-to-right orders),
    row by row, on padded rows whose answers end mid-block. Another order differs."""
    dlm = lora_block_dlm(block_size=block_size, clean_stream=clean_stream, shift=shift)
    x0, attention_mask, answer_mask, _ = padded_rows()
    answer_mask[0, 9] = False  # row 0: 7 answer positions (ends inside a block)
    calls = []
    real = dlm.noised_logits

    def counting(*args, **kwargs):
        calls.append(args[1].shape[0])
        return real(*args, **kwargs)

    dlm.noised_logits = counting
    fast = order_nll(dlm, x0, attention_mask, answer_mask)
    assert calls == [2] * block_size  # block_size passes over the 2 rows
    n = answer_mask.sum(dim=1).tolist()
    chain = order_nll(dlm, x0, attention_mask, answer_mask, [list(range(k)) for k in n])
    assert len(calls) == block_size + 1 and calls[-1] == sum(n)  # one row per answer token
    torch.testing.assert_close(fast, chain, rtol=1e-6, atol=1e-6)
    assert (fast > 0.5).all()
    backwards = order_nll(dlm, x0, attention_mask, answer_mask, [list(range(k))[::-1] for k in n])
    assert not torch.allclose(fast, backwards, rtol=1e-3)


# -- the loss --------------------------------------------------------------------------------------
BLOCK = ["model.attention=block_causal", "model.block_size=4", "lora.lora_dropout=0", "output_dir=unused"]


def module_of(overrides: list[str]):
    from diffllm.training.module import DiffusionLitModule

    torch.manual_seed(0)
    module = DiffusionLitModule.from_run_config(compose(BLOCK + overrides))
    with torch.no_grad():  # adapters that matter (LoRA B starts at 0)
        gen = torch.Generator().manual_seed(1)
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=gen)
    return module


def tiny_batch(module) -> dict[str, torch.Tensor]:
    from diffllm.assets import TINY_VAL
    from diffllm.data.datamodule import Collator, encode_row
    from diffllm.data.tiny_tasks import read_jsonl

    rows = read_jsonl(TINY_VAL)[:6]
    encoded = [encode_row(r, module.tokenizer, "short", 96, 16) for r in rows]
    return Collator(module.tokenizer.pad_token_id)(encoded)


def loss_of(module, batch, seed: int = 3, **kwargs):
    return module.diffusion_loss(batch, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_with_a_block_clean_stream_and_no_ar_weight_the_loss_is_todays():
    """clean_stream=block and ar_weight=0 written out give, bit for bit, the loss of a config that
    names neither key (a run of before these options), and no AR statistics."""
    today = module_of([])
    explicit = module_of(["model.clean_stream=block", "loss.ar_weight=0"])
    batch = tiny_batch(today)
    with torch.no_grad():
        a, stats_a = loss_of(today, batch)
        b, stats_b = loss_of(explicit, batch)
    assert torch.equal(a, b) and torch.equal(stats_a["weighted_sum"], stats_b["weighted_sum"])
    assert "ar_sum" not in stats_b and torch.equal(stats_a["count"], stats_b["count"])


def test_the_ar_term_is_the_causal_models_next_token_ce_over_the_same_normaliser():
    """loss(w) = loss(0) + w * sum_{scored} CE_AR / Z, with CE_AR computed apart by the causal model
    (adapters on) and Z the diffusion normaliser (the supervised positions: EOS padding included)."""
    w = 0.5
    module = module_of(["model.clean_stream=causal", f"loss.ar_weight={w}"]).eval()
    batch = tiny_batch(module)
    with torch.no_grad():
        with_ar, stats = loss_of(module, batch)
        module.loss_fn.ar_weight = 0.0
        without, stats0 = loss_of(module, batch)
        ce = causal_token_ce(
            module.dlm, batch["input_ids"], batch["attention_mask"], batch["score_mask"], adapters=True
        )
    assert stats["count"] == batch["answer_mask"].sum() == stats0["count"]
    assert stats["n_scored"] == batch["score_mask"].sum() < stats["count"]
    torch.testing.assert_close(stats["ar_sum"], ce.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_ar, without + w * ce.sum() / stats["count"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        stats["weighted_sum"], stats0["weighted_sum"] + w * ce.sum(), rtol=1e-5, atol=1e-5
    )


def test_validation_measures_at_the_final_size_while_training_follows_the_schedule(monkeypatch):
    """best.ckpt compares val/nll_bound across steps: every validation forward (the loss and the
    bound) runs at the final size, whatever size training is at; training runs the size in force."""
    module = module_of(["model.block_schedule=[[0,1],[5,2],[9,4]]"])
    sizes = []
    real = DiffusionLM.two_copy_logits

    def spy(self, *args, block_size=None, **kwargs):
        sizes.append(self.block_size if block_size is None else block_size)
        return real(self, *args, block_size=block_size, **kwargs)

    monkeypatch.setattr(DiffusionLM, "two_copy_logits", spy)
    batch = tiny_batch(module)
    module.eval()
    with torch.no_grad():
        module.validation_step(batch, 0)  # global_step 0: the schedule says 1
    assert module.block_size_at(0) == 1 and sizes and set(sizes) == {4}
    sizes.clear()
    for step in (0, 4, 5, 8, 9):
        with torch.no_grad():
            module.objective.loss(
                module, batch, generator=torch.Generator(), block_size=module.block_size_at(step)
            )
    assert sizes == [1, 1, 2, 2, 4]


# -- config checks, before anything loads ------------------------------------------------------------
@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("the model or the data was loaded before the config was checked")

    monkeypatch.setattr("diffllm.training.module.build_diffusion_model", refuse)
    monkeypatch.setattr("diffllm.data.datamodule.AlpacaDataModule.__init__", refuse)
    monkeypatch.setattr("diffllm.training.run.prepare_assets", lambda cfg: None)


BAD = [
    ("model.block_schedule=[[0,1],[10,3],[20,4]]", "block size 3 must divide data.answer_pad_to=16"),
    ("model.block_schedule=[[0,1],[10,2]]", "ends at block size 2, not model.block_size=4"),
    ("model.block_schedule=[[0,1],[10,2],[10,4]]", "increase strictly"),
    ("model.block_schedule=[[5,1],[10,4]]", "start at 0"),
    ("model.block_schedule=[[0,1],[600,4]]", "not before trainer.max_steps=600"),
    (
        "model.block_schedule=[[0,1],[10,4]] model.attention=prefix_lm model.block_size=null",
        "needs model.attention=block_causal",
    ),
    (
        "loss.ar_weight=0.5",
        "loss.ar_weight=0.5 needs model.attention=block_causal with model.clean_stream=causal",
    ),
    (
        "loss.ar_weight=0.5 model.clean_stream=causal model.attention=prefix_lm model.block_size=null",
        "model.clean_stream='causal'",
    ),
    ("loss.ar_weight=-1", "loss.ar_weight=-1"),
    ("model.clean_stream=sideways", "model.clean_stream='sideways'"),
]


@pytest.mark.parametrize("override,named", BAD, ids=[b[0] for b in BAD])
def test_a_bad_recipe_is_refused_in_one_line_before_anything_loads(override, named, nothing_loads):
    from diffllm.training.run import train

    with pytest.raises(ConfigError) as err:
        train(compose(BLOCK + override.split()))
    message = str(err.value)
    assert "\n" not in message and named in message, message


def test_a_good_recipe_passes_and_objective_ar_ignores_it():
    """The same ARGS for both runs of make train: the AR-SFT module trains the causal model with no
    blocks (no schedule, its loss takes none)."""
    from diffllm.training.module import DiffusionLitModule

    recipe = [
        "model.block_schedule=[[0,1],[150,2],[300,4]]",
        "model.clean_stream=causal",
        "loss.ar_weight=0.5",
    ]
    node = check_run_config(compose(BLOCK + recipe))
    assert node.model.block_schedule == [[0, 1], [150, 2], [300, 4]] and node.loss.ar_weight == 0.5
    check_run_config(compose(BLOCK + recipe + ["objective=ar"]))
    ar = DiffusionLitModule.from_run_config(compose(BLOCK + recipe + ["objective=ar"]))
    assert ar.dlm.attention == "causal" and ar.block_size_at(0) is None and ar.block_size_at(400) is None
    diffusion = DiffusionLitModule.from_run_config(compose(BLOCK + recipe))
    assert [diffusion.block_size_at(s) for s in (0, 150, 300)] == [1, 2, 4] and diffusion.dlm.block_size == 4


# -- resume ---------------------------------------------------------------------------------------
RESUME_RUN = BLOCK[:-1] + [
    "model.block_schedule=[[0,1],[2,2],[4,4]]",
    "model.clean_stream=causal",
    "loss.ar_weight=0.5",
    "trainer.val_every_n_steps=3",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "data.limit_train_rows=32",
    "data.limit_val_rows=8",
    "data.batch_size=8",
    "data.num_sample_prompts=1",
    "report.enabled=false",
    "sampler.gen_length=8",
    "sampler.steps=8",
    "sampler.cache=block",
    "val_likelihood.num_samples=1",
    "callbacks.samples.quality_rows=0",
]


@pytest.mark.slow
def test_a_run_killed_and_resumed_trains_at_the_schedules_sizes_and_validates_at_the_final_one(
    tmp_path, monkeypatch
):
    """6 steps of [[0,1],[2,2],[4,4]], a real SIGTERM after step 3, a fresh Trainer resumed from
    last.ckpt: the two runs together trained at 1, 1, 2, 2, 4, 4 (the schedule's size at each step),
    every validation forward ran at the final size 4, the checkpoint holds the schedule, and a resume
    with another schedule is refused (about 40 s)."""
    from diffllm.training.callbacks import Interrupted
    from diffllm.training.run import train

    seen: list[tuple[bool, int]] = []
    real = DiffusionLM.two_copy_logits

    def spy(self, *args, block_size=None, **kwargs):
        seen.append((self.training, self.block_size if block_size is None else block_size))
        return real(self, *args, block_size=block_size, **kwargs)

    monkeypatch.setattr(DiffusionLM, "two_copy_logits", spy)
    out = tmp_path / "run"
    run = RESUME_RUN + ["trainer.max_steps=6", f"output_dir={out}"]
    kill = ["+callbacks.kill._target_=diffllm.bench.kill_resume.KillAt", "+callbacks.kill.step=3"]
    with pytest.raises(Interrupted):
        train(compose(run + kill))
    first = list(seen)
    seen.clear()
    last = out / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["model"]["block_schedule"] == [[0, 1], [2, 2], [4, 4]]
    _, objects = train(compose(run + [f"ckpt_path={last}"]))
    assert objects["trainer"].global_step == 6
    trained_first = [size for training, size in first if training]
    trained_then = [size for training, size in seen if training]
    assert len(trained_first) == saved["global_step"] >= 3
    assert trained_first + trained_then == [1, 1, 2, 2, 4, 4]
    validated = [size for training, size in first + seen if not training]
    assert validated and set(validated) == {4}
    other = ["model.block_schedule=[[0,1],[3,2],[4,4]]"]
    with pytest.raises(ConfigError, match="resume with the checkpoint's schedule"):
        train(compose(run + other + [f"ckpt_path={last}"]))
