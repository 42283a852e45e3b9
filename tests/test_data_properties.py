"""Property-based: random unicode rows rendered, tokenised and masked with every prompt format.

Never a crash, and the masks always agree: the prompt comes first and is never supervised, the
answer span decodes to the row's output plus the end token, the counts add up, and padding is
never attended nor supervised.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from diffllm.assets import TINY_AR_BASE
from diffllm.data.collate import Collator
from diffllm.data.datamodule import encode_rows
from diffllm.data.reader import check_alpaca_row
from diffllm.data.template import end_of_answer_id, get_format

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TEMPLATES = ["raw", "chat", "Q: {instruction} [{input}] A:", "alpaca"]  # "alpaca" is the default


@pytest.fixture(scope="module")
def toks():
    """The project's byte-level tokenizer, and a copy with a chat template (it has none of its own)."""
    plain = AutoTokenizer.from_pretrained(TINY_AR_BASE)
    chat = AutoTokenizer.from_pretrained(TINY_AR_BASE)
    chat.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    chat.chat_template = CHAT_TEMPLATE
    return plain, chat


text = st.text(max_size=40)  # any unicode (no surrogates): blanks, controls, combining marks, CJK ...
row = st.fixed_dictionaries({"instruction": text, "input": text, "output": text})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(row, min_size=1, max_size=4),
    template=st.sampled_from(TEMPLATES),
    max_length=st.integers(min_value=4, max_value=120),
    answer_pad_to=st.sampled_from([None, 1, 8]),
)
def test_random_rows_render_and_mask_consistently(toks, rows, template, max_length, answer_pad_to):
    tok = toks[1] if template == "chat" else toks[0]
    fmt = get_format(template)
    usable = [r for r in rows if check_alpaca_row(r) is None]
    for r in rows:  # the reader's rule: blank instruction or output -> rejected with a reason
        assert (check_alpaca_row(r) is None) == bool(r["instruction"].strip() and r["output"].strip())
    if not usable:
        return
    end = end_of_answer_id(tok, template)
    enc = encode_rows(
        {k: [r[k] for r in usable] for k in usable[0]}, tok, template, max_length, answer_pad_to
    )
    encoded = []
    for i, r in enumerate(usable):
        ids, answer, score = enc["input_ids"][i], enc["answer_mask"][i], enc["score_mask"][i]
        p = enc["prompt_len"][i]
        assert len(ids) == len(answer) == len(score) == enc["length"][i]
        assert ids[:p] == fmt.prompt_ids(r, tok)  # the prompt first, whole, as the format renders it
        n_answer = len(ids) - p
        assert answer == [0] * p + [1] * n_answer  # prompt never supervised, answer contiguous after it
        assert all(s <= a for s, a in zip(score, answer))  # scored tokens are supervised tokens
        full = tok(r["output"].strip(), add_special_tokens=False)["input_ids"] + [end]
        pad = (-len(full) % answer_pad_to) if answer_pad_to else 0
        assert n_answer == max(0, min(len(full) + pad, max_length - p))
        assert enc["truncated"][i] == (p + len(full) > max_length)
        n_scored = sum(score)
        assert n_scored == min(len(full), n_answer)
        assert ids[p : p + n_scored] == full[:n_scored]
        assert ids[p + n_scored :] == [end] * (n_answer - n_scored)  # padding is the end id only
        if not enc["truncated"][i]:  # the answer decodes back to the output and ends with the end token
            text = tok.decode(ids[p : p + n_scored - 1], clean_up_tokenization_spaces=False)
            assert text == r["output"].strip() and ids[p + n_scored - 1] == end
        encoded.append({k: enc[k][i] for k in ("input_ids", "answer_mask", "score_mask")})
    batch = Collator(tok.pad_token_id)(encoded)
    attention = batch["attention_mask"].bool()
    assert (
        not (batch["answer_mask"] & ~attention).any()
        and not (batch["score_mask"] & ~batch["answer_mask"]).any()
    )
    assert batch["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in encoded]
