"""Every option of every config group, and every experiment file, trains one step on the CPU.

Options that need the hub or a GPU run on local stand-ins: a model node whose weights are on the
hub (``llama3_2_1b``, ``smollm2``) gets a tiny random model of the same ``model_type`` (built from
the node's ``model.config`` with tiny sizes; SmolLM2 is a LLaMA), hub data (``alpaca``) gets the
local tiny task set, and every trainer is composed as written and then forced to one CPU process in
fp32. Everything else (dtype, templates, LoRA, losses, accumulation, loggers, callbacks) runs as
configured.
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from diffllm.assets import TINY_AR_BASE
from diffllm.config.resolvers import CONF_DIR, asset_path, compose
from diffllm.training.run import train

# conf/train.yaml's defaults: group -> option (the default run covers them once)
DEFAULTS = {
    k: v
    for d in OmegaConf.to_container(OmegaConf.load(CONF_DIR / "train.yaml").defaults)
    if isinstance(d, dict)
    for k, v in d.items()
}
# (cli/: nodes of the generate / evaluate command lines, not options of a training run)
GROUPS = sorted(
    p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("experiment", "hydra", "cli")
)
# options that only fit with another one: data=tiny_long's rows (up to 146 tokens, max_length 192)
# need the 256 positions of its own base
COMPANIONS = {"data=tiny_long": ["model=tiny_long"]}
CASES = (
    [[]]
    + [
        # a group the defaults list does not hold (recipe) is appended: +group=option
        [f"{'' if group in DEFAULTS else '+'}{group}={p.stem}", *COMPANIONS.get(f"{group}={p.stem}", [])]
        for group in GROUPS
        for p in sorted((CONF_DIR / group).glob("*.yaml"))
        if DEFAULTS.get(group) != p.stem
    ]
    + [[f"+experiment={p.stem}"] for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))]
)

# one optimizer step, nothing else: no validation, no report, a handful of rows
ONE_STEP = [
    "trainer.max_steps=1",
    "trainer.limit_val_batches=0",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "report.enabled=false",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "data.limit_train_rows=16",  # gpu / ddp accumulate 4 micro-batches per step
    "data.limit_val_rows=4",
    "data.num_workers=0",
]
# the trainer as composed, then one CPU process in fp32
ON_CPU = [
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.strategy=auto",
    "trainer.precision=32-true",
]
TINY_SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
# a ChatML-like template (data.template=chat) whose turns end with a token of their own
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """model_type -> a folder with a tiny random model of that type and the tiny tokenizer (+ chat template)."""
    made: dict[str, str] = {}

    def folder(model_node) -> str:
        node = model_node.get("config")  # null for a folder-only node (SmolLM2: a LLaMA)
        architecture = (
            OmegaConf.to_container(node, resolve=True) if node is not None else {"model_type": "llama"}
        )
        model_type = architecture.pop("model_type")
        if model_type not in made:
            path = tmp_path_factory.mktemp(f"tiny_{model_type}")
            tok = AutoTokenizer.from_pretrained(TINY_AR_BASE)
            tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
            tok.chat_template = CHAT_TEMPLATE
            architecture.update(TINY_SIZES, vocab_size=len(tok), bos_token_id=tok.bos_token_id)
            architecture.update(eos_token_id=tok.eos_token_id, max_position_embeddings=256)
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(
                AutoConfig.for_model(model_type, **architecture)
            ).save_pretrained(path)
            tok.save_pretrained(path)
            made[model_type] = str(path)
        return made[model_type]

    return folder


def offline(overrides: list[str], stand_ins) -> list[str]:
    """Local stand-ins for what the composed config would fetch from the hub."""
    cfg = compose(overrides + ["output_dir=/tmp/unused"])
    extra = []
    data_path = str(OmegaConf.to_container(cfg.data)["path"])
    # data=self_generated is drawn from a chat model (a build of hours, tested in
    # test_self_generated.py): here its rows are the tiny task set, read through the chat template
    # of a stand-in that has one
    if not str(OmegaConf.to_container(cfg.model)["pretrained"]).startswith("${asset:") or (
        data_path.startswith("${self_generated:")
    ):
        extra.append(f"model.pretrained={stand_ins(cfg.model)}")
    # a block-size curriculum must reach its final size before trainer.max_steps (checked at start):
    # the one-step run trains at the final size (the curriculum runs in tests/test_block_recipe.py)
    if cfg.model.get("block_schedule"):
        extra.append("model.block_schedule=null")
    if not data_path.startswith("${asset:"):
        extra += [
            f"data.path={asset_path('tiny/train.jsonl')}",
            f"data.val_path={asset_path('tiny/val.jsonl')}",
            "data.max_length=128",  # within the stand-in models' positions (the schema checks it)
        ]
    return extra


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: o[0] if o else "default")
def test_option_trains_one_step(overrides, stand_ins, tmp_path):
    if overrides == ["logger=wandb"]:
        pytest.importorskip("wandb", reason="logger=wandb needs the optional wandb package")
    extra = offline(overrides, stand_ins)
    cfg = compose(overrides + ONE_STEP + ON_CPU + extra + [f"output_dir={tmp_path}"])
    metrics, objects = train(cfg)
    module, trainer = objects["module"], objects["trainer"]
    assert trainer.global_step == 1
    assert math.isfinite(metrics["train/loss"])
    moved = [p for n, p in module.named_parameters() if "lora_B" in n]
    assert moved and any(p.abs().sum() > 0 for p in moved), "LoRA B starts at 0: the step must move it"
    # AR-SFT trains the causal model; every other run the model node's mode
    expected = "causal" if cfg.objective._target_.endswith("ARObjective") else cfg.model.attention
    assert module.dlm.attention == expected
