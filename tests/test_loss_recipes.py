"""Issue 18, recipe options 3 and 4: complementary masks and distillation from the frozen base."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffllm.config.schema import ConfigError, check_loss_recipe, check_run_config
from diffllm.diffusion.complementary import ComplementaryTimes, band_time, complementary_pair
from diffllm.diffusion.distill import distill_sum, kl_without_mask
from diffllm.diffusion.keys import DrawKeys
from diffllm.diffusion.schedule import LinearSchedule
from diffllm.diffusion.time import AntitheticTimeSampler, UniformTimeSampler
from diffllm.model.dlm import ar_mode

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 1.0e-3  # the tiny default's time_sampler.eps
KEYS = DrawKeys(seed=5, step=3, rows=[0, 1, 2], global_batch_size=3)


def module_of(tmp_path, *overrides: str):
    from diffllm.config.resolvers import compose
    from diffllm.training.module import DiffusionLitModule

    module = DiffusionLitModule.from_run_config(compose([*overrides, f"output_dir={tmp_path}"]))
    return module.eval()  # LoRA dropout off: the loss is a function of the draws


@pytest.fixture(scope="module")
def block4(tmp_path_factory):
    """The tiny default as a block-4 model with both options on (uniform t, linear schedule)."""
    return module_of(
        tmp_path_factory.mktemp("block4"),
        "model.attention=block_causal",
        "model.block_size=4",
        "loss.complementary=true",
        "loss.distill_weight=1.0",
    )


def rows(eos: int) -> dict[str, torch.Tensor]:
    """Three rows: prompts of 4, 6, 3 tokens; answers of 3, 2, 3 tokens + end token, padded with EOS to
    8 supervised positions (two blocks of 4); right padding after the shorter rows."""
    from diffllm.data.collate import Collator

    out = []
    for prompt, answer in (
        ([1, 7, 8, 9], [20, 21, 22]),
        ([1, 10, 11, 12, 13, 14], [23, 24]),
        ([1, 15, 16], [25, 26, 27]),
    ):
        span = answer + [eos] * (8 - len(answer))
        out.append(
            {
                "input_ids": prompt + span,
                "answer_mask": [0] * len(prompt) + [1] * 8,
                "score_mask": [0] * len(prompt) + [1] * (len(answer) + 1) + [0] * (7 - len(answer)),
            }
        )
    return Collator(pad_id=0)(out)


# ---------------------------------------------------------------- complementary masks


def test_the_pair_hides_each_answer_position_in_exactly_one_half_at_t_and_1_minus_t():
    batch = rows(eos=2)
    answer = batch["answer_mask"]
    t = torch.tensor([0.2, 0.5, 0.9])
    u = torch.rand(answer.shape, generator=torch.Generator().manual_seed(0))
    hidden = answer & (u < t[:, None])
    pairs, t2, xt, hidden2 = complementary_pair(batch, t, hidden, mask_id=99)
    first, second = hidden2[:3], hidden2[3:]
    assert torch.equal(first, hidden)
    assert torch.equal(first | second, answer) and not (first & second).any()
    assert torch.equal(second, answer & (1 - u < 1 - t[:, None]))  # the forward process at 1 - t, with 1 - u
    assert torch.equal(xt == 99, hidden2)  # the prompt and the padding stay clean in both halves
    assert torch.equal(torch.where(hidden2, pairs["input_ids"], xt), pairs["input_ids"])
    for key, value in batch.items():
        assert torch.equal(pairs[key], torch.cat([value, value]))
    assert t2.tolist() == pytest.approx([0.2, 0.5, 0.9, 0.8, 0.5, 0.1])
    # the two halves' ELBO weights under the linear schedule: w(t) = 1 / t and w(1 - t) = 1 / (1 - t)
    torch.testing.assert_close(LinearSchedule().weight(t2), torch.cat([1 / t, 1 / (1 - t)]))


@pytest.mark.parametrize("sampler", [UniformTimeSampler(EPS), AntitheticTimeSampler(EPS)])
def test_times_are_the_same_draws_mapped_into_eps_to_1_minus_eps(sampler):
    assert band_time(torch.tensor([EPS, 1.0]), EPS).tolist() == pytest.approx([EPS, 1 - EPS])
    banded = ComplementaryTimes(sampler)
    keys = DrawKeys(seed=1, step=0, rows=list(range(64)), global_batch_size=64)
    u = keys.uniform("time", 1)[:, 0]
    t = banded.keyed(keys)
    assert float(t.min()) >= EPS and float(t.max()) <= 1 - EPS
    assert torch.equal(t, band_time(sampler.keyed(keys), EPS))
    if isinstance(sampler, UniformTimeSampler):
        torch.testing.assert_close(t, EPS + (1 - 2 * EPS) * u)  # t = eps + (1 - 2 eps) u, the same u
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(banded(8, generator=gen_a), band_time(sampler(8, generator=gen_b), EPS))
    with pytest.raises(ValueError, match=r"eps in \[0, 0.5\), got 0.5"):
        ComplementaryTimes(UniformTimeSampler(0.5))


def test_complementary_loss_is_the_hand_sum_over_both_halves(block4, monkeypatch):
    module = block4
    monkeypatch.setattr(module.loss_fn, "distill_weight", 0.0)  # the diffusion term alone
    batch = rows(module.tokenizer.eos_token_id)
    x0, attention_mask, answer = batch["input_ids"], batch["attention_mask"], batch["answer_mask"]
    given = {k: v.clone() for k, v in batch.items()}
    with torch.no_grad():
        loss, stats = module.diffusion_loss(batch, keys=KEYS)
    # the caller's batch is not doubled: training counts tokens_seen on it
    assert all(torch.equal(batch[k], given[k]) for k in given)

    # by hand: the keyed numbers of the rows, each half in its own forward pass
    t = EPS + (1 - 2 * EPS) * KEYS.uniform("time", 1)[:, 0]  # (B,)
    u = KEYS.uniform("mask", x0.shape[1])  # (B, L)
    total = torch.zeros(())
    for hidden, t_half in ((answer & (u < t[:, None]), t), (answer & (u >= t[:, None]), 1 - t)):
        xt = torch.where(hidden, module.mask_id, x0)
        with torch.no_grad():
            logits = module.dlm.noised_logits(x0, xt, hidden, attention_mask, answer)
        ce = F.cross_entropy(logits, x0[hidden], reduction="none")
        total += (ce / t_half[:, None].expand_as(hidden)[hidden]).sum()
    n_answer = int(answer.sum())
    assert int(stats["count"]) == 2 * n_answer  # the normaliser counts both halves
    assert int(stats["n_hidden"]) == n_answer  # every position hidden once over the pair
    torch.testing.assert_close(stats["weighted_sum"], total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, total / (2 * n_answer), rtol=1e-5, atol=1e-6)


def test_complementary_masks_draw_no_new_numbers(block4, monkeypatch):
    """The same streams, the same lengths, with the option on and off: resumed steps redraw the pair."""
    module = block4
    drawn: list[tuple[str, int]] = []
    uniform = DrawKeys.uniform

    def recording(self, stream, n=1, device="cpu"):
        drawn.append((stream, n))
        return uniform(self, stream, n, device)

    monkeypatch.setattr(DrawKeys, "uniform", recording)
    monkeypatch.setattr(module.loss_fn, "distill_weight", 0.0)
    batch = rows(module.tokenizer.eos_token_id)
    with torch.no_grad():
        module.diffusion_loss(batch, keys=KEYS)
        with_pair = list(drawn)
        drawn.clear()
        monkeypatch.setattr(module.loss_fn, "complementary", False)
        monkeypatch.setattr(module, "time_sampler", module.time_sampler.inner)
        module.diffusion_loss(batch, keys=KEYS)
    assert with_pair == drawn == [("time", 1), ("mask", batch["input_ids"].shape[1])]


@pytest.mark.parametrize("clean_stream, ar_weight", [("block", 0.0), ("causal", 2.0)])
def test_the_pair_shares_one_clean_stream_with_the_loss_and_gradients_of_two_copies(
    tmp_path, clean_stream, ar_weight
):
    """The training pass computes a pair's clean row once (``copies=2``: L + 2A columns a row). Its
    loss and every LoRA gradient equal those of the doubled batch in which each half has its own
    clean copy (2 (L + A) columns, ``copies=1``), the AR term included (today's SmolLM2 recipe: a
    causal clean stream, w = 2). A noised copy that saw the other would break the equality."""
    module = module_of(
        tmp_path,
        "model.attention=block_causal",
        "model.block_size=4",
        f"model.clean_stream={clean_stream}",
        f"loss.ar_weight={ar_weight}",
        "loss.complementary=true",
    )
    perturb_lora_b(module)
    batch = rows(module.tokenizer.eos_token_id)
    lora = {n: p for n, p in module.dlm.model.named_parameters() if p.requires_grad}

    def gradients(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        grads = torch.autograd.grad(loss, list(lora.values()))
        return dict(zip(lora, grads))

    calls: list[int] = []
    two_copy = type(module.dlm).two_copy_logits

    def spy(self, x0, xt, *args, **kwargs):
        calls.append((x0.shape[0], xt.shape[0], kwargs.get("copies", 1)))
        return two_copy(self, x0, xt, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(module.dlm), "two_copy_logits", spy)
        loss, stats = module.diffusion_loss(batch, keys=KEYS)
    assert calls == [(3, 6, 2)]  # 3 rows, their 6 noisings, one sequence a row
    shared = gradients(loss)

    # the reference: the doubled batch, each half with its own clean copy
    x0, attention_mask, answer = batch["input_ids"], batch["attention_mask"], batch["answer_mask"]
    t = EPS + (1 - 2 * EPS) * KEYS.uniform("time", 1)[:, 0]
    u = KEYS.uniform("mask", x0.shape[1])
    hidden = torch.cat([answer & (u < t[:, None]), answer & (u >= t[:, None])])
    x2, a2, m2 = torch.cat([x0, x0]), torch.cat([attention_mask] * 2), torch.cat([answer] * 2)
    s2 = torch.cat([batch["score_mask"]] * 2).bool()
    xt = torch.where(hidden, module.mask_id, x2)
    logits, ar_logits = module.dlm.two_copy_logits(x2, xt, hidden, a2, m2, clean_targets=s2)
    t2 = torch.cat([t, 1 - t])[:, None].expand_as(hidden)[hidden]
    total = module.loss_fn.weighted_sum(logits, x2[hidden], t2, module.schedule)
    total = total + ar_weight * F.cross_entropy(ar_logits, x2[s2], reduction="sum")
    reference = total / (2 * int(answer.sum()))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["weighted_sum"], total, rtol=1e-5, atol=1e-5)
    if ar_weight:
        assert int(stats["n_scored"]) == int(s2.sum())
    doubled = gradients(reference)
    assert max(float(g.abs().max()) for g in doubled.values()) > 1e-3  # gradients that say something
    for name in lora:
        torch.testing.assert_close(shared[name], doubled[name], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- distillation from the base


def test_kl_without_mask_is_the_hand_computation():
    # vocabulary of 4, [MASK] = 2: its logits (huge here) never count, p and q renormalised over {0, 1, 3}
    teacher = torch.tensor([[1.0, 0.0, 9.0, -1.0], [0.0, 0.0, -5.0, 0.0]])
    student = torch.tensor([[0.0, 0.5, 7.0, 0.0], [2.0, 0.0, 8.0, 0.0]])

    def softmax(xs):
        z = sum(math.exp(x) for x in xs)
        return [math.exp(x) / z for x in xs]

    expected = []
    for tr, st in zip(teacher.tolist(), student.tolist()):
        p, q = softmax([tr[0], tr[1], tr[3]]), softmax([st[0], st[1], st[3]])
        expected.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    got = kl_without_mask(teacher, student, mask_id=2)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[0] > 0.1 and expected[1] > 0.1
    # only the [MASK] column differs: no divergence
    assert kl_without_mask(teacher, teacher + torch.tensor([0.0, 0.0, 3.0, 0.0]), 2).abs().max() < 1e-6


def perturb_lora_b(module, scale: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.dlm.model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def test_distillation_is_zero_at_block_size_one_with_fresh_adapters_and_not_after(tmp_path):
    module = module_of(
        tmp_path, "model.attention=block_causal", "model.block_size=1", "loss.distill_weight=1.0"
    )
    batch = rows(module.tokenizer.eos_token_id)
    x0, attention_mask, answer = batch["input_ids"], batch["attention_mask"], batch["answer_mask"]
    score = batch["score_mask"]
    hidden = answer.clone()  # every answer position masked, EOS padding included
    xt = torch.where(hidden, module.mask_id, x0)

    def kl() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            student = module.dlm.noised_logits(x0, xt, hidden, attention_mask, answer)
            return distill_sum(module.dlm, x0, attention_mask, hidden, score, student)

    kl_sum, count = kl()
    assert int(count) == int((hidden & score).sum()) == 4 + 3 + 4  # never the EOS padding
    assert int(count) < int(hidden.sum())
    assert abs(float(kl_sum)) < 1e-5 * int(count)  # LoRA B = 0: the block-1 student is the AR model
    perturb_lora_b(module)
    kl_sum, _ = kl()
    assert float(kl_sum) > 1e-2


def test_distillation_term_is_the_hand_kl_over_the_masked_scored_positions(block4, monkeypatch):
    """Block 4, both options on: the loss's numerator grows by distill_weight x the KL computed by hand
    (the full base model's logits at i - 1, softmax without [MASK]) over both halves' masked scored
    positions, which are every scored position exactly once."""
    module = block4
    batch = rows(module.tokenizer.eos_token_id)
    x0, attention_mask, answer = batch["input_ids"], batch["attention_mask"], batch["answer_mask"]
    score = batch["score_mask"]
    saved = {n: p.detach().clone() for n, p in module.dlm.model.named_parameters() if "lora_B" in n}
    perturb_lora_b(module)
    try:
        with torch.no_grad():
            _, stats = module.diffusion_loss(batch, keys=KEYS)
            monkeypatch.setattr(module.loss_fn, "distill_weight", 0.0)
            _, plain = module.diffusion_loss(batch, keys=KEYS)
            # by hand: the base AR model over the clean rows; the student per half
            with ar_mode(module.dlm.model) as base:
                base_logits = base(input_ids=x0, attention_mask=attention_mask).logits  # (B, L, V)
            t = EPS + (1 - 2 * EPS) * KEYS.uniform("time", 1)[:, 0]
            u = KEYS.uniform("mask", x0.shape[1])
            expected = 0.0
            for hidden in (answer & (u < t[:, None]), answer & (u >= t[:, None])):
                xt = torch.where(hidden, module.mask_id, x0)
                student = module.dlm.noised_logits(x0, xt, hidden, attention_mask, answer)
                for (b, i), q_logits in zip(hidden.nonzero().tolist(), student):
                    if not score[b, i]:
                        continue
                    keep = [v for v in range(q_logits.shape[0]) if v != module.mask_id]
                    p = base_logits[b, i - 1, keep].softmax(-1)
                    q = q_logits[keep].softmax(-1)
                    expected += float((p * (p / q).log()).sum())
    finally:
        with torch.no_grad():
            for n, p in module.dlm.model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    assert int(stats["n_distilled"]) == int(score.sum())  # each scored position once over the pair
    assert expected > 1e-2
    assert float(stats["distill_kl"]) == pytest.approx(expected, rel=1e-4)
    torch.testing.assert_close(stats["weighted_sum"] - plain["weighted_sum"], stats["distill_kl"])
    assert int(stats["count"]) == int(plain["count"])  # the same normaliser


def test_the_pair_runs_the_teacher_once_on_its_clean_rows(block4, monkeypatch):
    """With complementary masks the teacher (which sees only the clean rows) runs once on the B rows
    at the positions either half distils; each half's KL equals the doubled rows' own teacher's."""
    import diffllm.diffusion.distill as distill

    module = block4
    batch = rows(module.tokenizer.eos_token_id)
    x0, attention_mask, answer = batch["input_ids"], batch["attention_mask"], batch["answer_mask"]
    t = torch.tensor([0.3, 0.5, 0.8])
    u = torch.rand(answer.shape, generator=torch.Generator().manual_seed(1))
    pairs, _, xt, hidden = complementary_pair(batch, t, answer & (u < t[:, None]), module.mask_id)
    x2, a2, s2 = pairs["input_ids"], pairs["attention_mask"], pairs["score_mask"]
    saved = {n: p.detach().clone() for n, p in module.dlm.model.named_parameters() if "lora_B" in n}
    perturb_lora_b(module)
    teacher_rows: list[int] = []
    real = distill.base_next_token_logits

    def spy(dlm, input_ids, *args):
        teacher_rows.append(input_ids.shape[0])
        return real(dlm, input_ids, *args)

    monkeypatch.setattr(distill, "base_next_token_logits", spy)
    try:
        with torch.no_grad():
            student = module.dlm.noised_logits(x0, xt, hidden, attention_mask, answer, copies=2)
            shared = distill_sum(module.dlm, x2, a2, hidden, s2, student, copies=2)
            doubled = distill_sum(module.dlm, x2, a2, hidden, s2, student)
    finally:
        with torch.no_grad():
            for n, p in module.dlm.model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    assert teacher_rows == [3, 6]  # once on the 3 clean rows; the reference on the 6 doubled ones
    assert int(shared[1]) == int(doubled[1]) == int(batch["score_mask"].sum())
    assert float(doubled[0]) > 1e-2
    torch.testing.assert_close(shared[0], doubled[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- checked at start


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["loss.complementary=true", "schedule=cosine"],
            "schedule._target_='diffllm.diffusion.schedule.CosineSchedule' is out of range; valid: "
            "diffllm.diffusion.schedule.LinearSchedule with loss.complementary=true",
        ),
        (["loss.complementary=true", "time_sampler.eps=0.5"], "time_sampler.eps=0.5 is out of range"),
        (
            ["loss.distill_weight=0.5"],
            "model.attention='prefix_lm' is out of range; valid: block_causal with loss.distill_weight=0.5",
        ),
        (["loss.distill_weight=-1"], "loss.distill_weight=-1.0 is out of range; valid: a number >= 0"),
    ],
)
def test_recipe_options_are_refused_at_start_with_one_line(tmp_path, overrides, message):
    from diffllm.config.resolvers import compose

    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as err:
        check_run_config(compose([*overrides, f"output_dir={tmp_path}"]))
    assert "\n" not in str(err.value)


def test_recipe_options_pass_where_they_apply_and_objective_ar_ignores_them(tmp_path):
    from diffllm.config.resolvers import compose

    ok = [
        "loss.complementary=true",
        "loss.distill_weight=1",
        "model.attention=block_causal",
        "model.block_size=4",
    ]
    node = check_run_config(compose([*ok, f"output_dir={tmp_path}"]))
    assert (node.loss.complementary, node.loss.distill_weight) == (True, 1.0)
    # make train passes the same ARGS to the AR-SFT run, whose loss is its own
    check_run_config(compose(["objective=ar", "loss.distill_weight=1", "schedule=cosine",
                              "loss.complementary=true", f"output_dir={tmp_path}"]))  # fmt: skip


def test_distillation_needs_adapters_to_switch_off():
    # a module built without LoRA (lora=None: full fine-tuning) has no frozen teacher to distil from
    node = {"loss": {"distill_weight": 0.5}, "model": {"attention": "block_causal"}, "lora": None}
    with pytest.raises(
        ConfigError, match=r"^lora=None is out of range; valid: LoRA adapters with loss.distill_weight=0.5"
    ):
        check_loss_recipe(node)
    check_loss_recipe({**node, "lora": {"r": 8}})


@pytest.mark.slow
def test_a_run_with_both_options_trains_counts_its_tokens_once_and_reloads(tmp_path):
    """Two optimizer steps of the tiny default as a block-4 model with both options: one pass over its
    8 rows, so tokens_seen is their token count (the pair is not counted twice); the KL is logged; the
    checkpoint rebuilds the options."""
    from diffllm.config.resolvers import compose
    from diffllm.training.module import DiffusionLitModule
    from diffllm.training.run import train

    overrides = [
        "model.attention=block_causal",
        "model.block_size=4",
        "sampler.cache=block",
        "loss.complementary=true",
        "loss.distill_weight=0.5",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "report.enabled=false",
        "data.batch_size=4",
        "data.limit_train_rows=8",
        "data.limit_val_rows=4",
        f"output_dir={tmp_path}",
    ]
    metrics, objects = train(compose(overrides))
    module, datamodule = objects["module"], objects["datamodule"]
    assert len(datamodule.train_ds) == 8
    assert int(module.tokens_seen) == sum(len(r["input_ids"]) for r in datamodule.train_ds)
    assert math.isfinite(float(metrics["train/loss"]))
    assert float(metrics["train/distill_kl"]) > 0
    reloaded = DiffusionLitModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert (reloaded.loss_fn.complementary, reloaded.loss_fn.distill_weight) == (True, 0.5)
    assert isinstance(reloaded.time_sampler, ComplementaryTimes)
