"""Hermetic fixtures: a tokenizer trained here, a tiny random LLaMA saved to a temp folder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (``pytestmark = usefixtures("one_thread")``).

    Tiny matmuls gain nothing from a second OpenMP thread, and on a shared 2-core box the spin-waits
    make them 10-50x slower whenever another process is busy.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WORDS = (
    "### Instruction : Input : Response : reverse the words sort copy add what is cat dog red blue "
    "green apple pear one two three four five the list of numbers 0 1 2 3 4 5 6 7 8 9 + = ?"
).split()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained in-process (BOS/EOS/PAD/UNK, no [MASK]: conversion adds it)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<reserved_0>"])
    tok.train_from_iterator([" ".join(WORDS)] * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


# The tests' LLaMA: 2 layers, hidden 32, grouped-query attention (4 heads, 2 KV heads).
TINY_LLAMA_FIELDS = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama_config(vocab_size: int, attn_implementation: str = "sdpa") -> LlamaConfig:
    """The saved tiny model's config (untied head, the tokenizer's BOS/EOS/PAD ids)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        attn_implementation=attn_implementation,
        **TINY_LLAMA_FIELDS,
    )


def tiny_llama(
    vocab_size: int, attn_implementation: str = "sdpa", seed: int = 0, **overrides
) -> LlamaForCausalLM:
    """A random tiny LLaMA in eval mode, seeded: the model of the unit tests.

    ``overrides`` are extra ``LlamaConfig`` fields (``initializer_range``, ``max_position_embeddings``).
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, attn_implementation=attn_implementation, **(TINY_LLAMA_FIELDS | overrides)
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A saved tiny random causal LM + tokenizer, loadable by ``from_pretrained`` offline."""
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# A few optimizer steps of the embedded default on CPU: enough for every CLI/notebook test that
# needs "a checkpoint of a real run". Shared by the whole session (about 20 s).
TINY_RUN = [
    "trainer.max_steps=6",
    "trainer.val_every_n_steps=3",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=1",
    "trainer.enable_progress_bar=false",
    "data.limit_train_rows=128",
    "data.limit_val_rows=16",
    "data.batch_size=8",
    "data.num_sample_prompts=2",
    "report.num_rows=8",
    "report.likelihood_samples=2",
    "sampler.gen_length=8",
    "sampler.steps=8",
    "val_likelihood.num_samples=2",
]


# The AR-SFT baseline of the tiny run (objective=ar): 16 training rows in batches of 8, so its 6
# steps are exactly 3 epochs and every row is seen 3 times (the tokens-seen provenance is exact).
TINY_AR_RUN = TINY_RUN + [
    "objective=ar",
    "data.limit_train_rows=16",
    "trainer.val_every_n_steps=2",
    "report.num_rows=4",
]


@pytest.fixture(scope="session")
def tiny_ar_run(tmp_path_factory):
    """(run folder, last.ckpt path, metrics, objects) of a short objective=ar run (about 10 s)."""
    from diffllm.config.resolvers import compose
    from diffllm.training.run import train

    out = tmp_path_factory.mktemp("tiny_ar_run")
    metrics, objects = train(compose(TINY_AR_RUN + [f"output_dir={out}"]))
    return out, out / "checkpoints" / "last.ckpt", metrics, objects


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_ar_run):
    """(run folder, last.ckpt path, metrics) of a short embedded-default run; its report carries the
    AR-SFT row of ``tiny_ar_run`` (report.ar_ckpt_path), as ``make train`` does."""
    from diffllm.config.resolvers import compose
    from diffllm.training.run import train

    out = tmp_path_factory.mktemp("tiny_run")
    metrics, _ = train(compose(TINY_RUN + [f"output_dir={out}", f"report.ar_ckpt_path={tiny_ar_run[1]}"]))
    return out, out / "checkpoints" / "last.ckpt", metrics
