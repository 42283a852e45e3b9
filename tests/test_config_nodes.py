"""One home per default (issue 20, step 2) and the groups checked together (issue 18, section 6).

The typed nodes (``diffllm/config/schema.py``) hold every default and range; each ``conf/`` YAML
names its node and holds only what differs; the command line's keys are checked against the nodes
(one line naming key and node); the registry of classes a file may name is the nodes'; a block
model's settings that cannot work together are refused before anything loads.
"""

from __future__ import annotations

import sys
from dataclasses import fields

import pytest
import yaml
from hydra.utils import get_class, get_method
from omegaconf import OmegaConf

from diffllm.config.resolvers import CONF_DIR, compose
from diffllm.config.schema import (
    SAMPLER_FIELDS,
    ConfigError,
    ModelNode,
    SamplerNode,
    check_run_config,
    node_defaults,
)
from diffllm.config.store import NODES, check_overrides
from diffllm.config.trust import LEGACY_RUN_TARGETS, allowed_targets
from diffllm.diffusion.sampler import SamplerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TYPED_GROUPS = (
    "model",
    "lora",
    "data",
    "objective",
    "schedule",
    "time_sampler",
    "loss",
    "anneal",
    "sampler",
    "optimizer",
)


def option_files(group: str):
    return sorted((CONF_DIR / group).glob("*.yaml"))


def leaves(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict) and v:
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def lookup(node, key):
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def node_of(path) -> type:
    """The node a YAML names first in its defaults list (``/schema/<name>@_here_``, or a preset's parent)."""
    first = yaml.safe_load(path.read_text())["defaults"][0]
    if first.startswith("/schema/"):
        return NODES[first.removeprefix("/schema/").removesuffix("@_here_")]
    return node_of(path.parent / f"{first}.yaml")


# -- one home per default ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [p for g in TYPED_GROUPS for p in option_files(g)] + [CONF_DIR / "train.yaml"],
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_every_yaml_names_its_node_and_holds_only_what_differs(path):
    text = yaml.safe_load(path.read_text())
    defaults = text.pop("defaults")
    assert defaults[0].startswith("/schema/") or defaults[0] == "default", defaults  # its node, first
    assert "_self_" in defaults[:2]  # then its own values over the node's
    text.pop("hydra", None)  # Hydra's own settings (train.yaml)
    parent = OmegaConf.to_container(OmegaConf.structured(node_of(path)))
    if defaults[0] == "default":  # a sampler preset: the values of default.yaml over the node
        parent = OmegaConf.to_container(compose([f"sampler={defaults[0]}", "output_dir=/x"], "train").sampler)
    repeated = [f"{k}={v!r}" for k, v in leaves(text) if lookup(parent, k) == v]
    assert not repeated, f"{path.name} repeats its node's defaults: {repeated}"


def test_the_running_defaults_are_the_nodes():
    """The drifts of issue 20: the node's default is what a run without overrides gets."""
    cfg = compose(["output_dir=/x"])
    assert cfg.model.attention == ModelNode.attention == "prefix_lm"
    assert (
        compose(["data=alpaca", "output_dir=/x"]).data.val_size
        == node_defaults(NODES["data"])["val_size"]
        == 500
    )
    optimizer = node_defaults(NODES["optimizer"])
    assert OmegaConf.to_container(cfg.optimizer) == optimizer and optimizer["warmup_steps"] == 20
    # a group with nothing to say composes to its node exactly
    assert OmegaConf.to_container(cfg.lora) == node_defaults(NODES["lora"])
    assert OmegaConf.to_container(compose(["sampler=default", "output_dir=/x"]).sampler) == node_defaults(
        SamplerNode
    )


def test_the_sampler_fields_are_listed_once():
    """The node is the sampler's dataclass plus its ``_target_``; the CLI node is generated from it."""
    node = {f.name: f.default for f in fields(SamplerNode) if f.name != "_target_"}
    assert node == {f.name: f.default for f in fields(SamplerConfig)}
    assert tuple(f.name for f in fields(SamplerConfig)) == SAMPLER_FIELDS
    assert not (CONF_DIR / "cli" / "sampler_keep.yaml").exists()
    for name in ("generate", "evaluate"):
        sampler = compose(["ckpt_path=x"], config_name=name).sampler
        assert tuple(sampler) == SAMPLER_FIELDS  # every field, in the sampler's order ...
        assert all(OmegaConf.is_missing(sampler, k) for k in sampler)  # ... each "keep the checkpoint's"


# -- the command line against the nodes --------------------------------------------------------------
@pytest.mark.parametrize(
    "override,named",
    [
        ("model.attentionx=prefix_lm", "model.attentionx: 'attentionx' is not a key of model (ModelNode"),
        ("+model.prefix_lm=true", "'prefix_lm' is not a key of model (ModelNode"),
        ("report.quality.row=3", "'row' is not a key of report.quality (QualityNode"),
        ("sed=1", "sed: 'sed' is not a key of the run config (TrainNode"),
        ("lora.r=abc", "lora.r: Value 'abc' of type 'str' could not be converted to Integer"),
        ("lora.r=2,abc", "lora.r: Value 'abc'"),  # every value of a sweep
        ("model.mask_token.moed=add", "'moed' is not a key of model.mask_token (MaskTokenSpec"),
    ],
)
def test_a_key_no_node_has_or_a_value_of_the_wrong_type_is_one_line(override, named):
    with pytest.raises(ConfigError) as err:
        check_overrides("train", [override])
    message = str(err.value)
    assert named in message and "\n" not in message, message
    if "not a key" in named:
        assert "diffllm/config/schema.py" in message


def test_what_the_nodes_do_not_type_passes_to_hydra():
    check_overrides(
        "train",
        [
            "model=smollm2",
            "+experiment=tiny_sweep",
            "hydra/launcher=slurm",
            "hydra.run.dir=/x",
            "trainer.max_steps=3",
            "callbacks.throughput=null",
            "~callbacks.samples",
            "schedule.eps=0.1",
            "seed=3",
            "output_dir=${hydra:runtime.output_dir}",
            "lora.r=2,4",
        ],
    )
    with pytest.raises(ConfigError, match=r"sampler\.foo: 'foo' is not a key of sampler \(SamplerNode"):
        check_overrides("generate", ["prompt=hi", "sampler.foo=1"])


def test_the_train_command_line_names_an_unknown_key_in_one_line(monkeypatch, capsys):
    from diffllm.cli import train

    argv = ["diffllm.train", "model.attentionx=1", "hydra.run.dir=/tmp/diffllm_unused_run"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        train.main()
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: model.attentionx: 'attentionx' is not a key of model "
        "(ModelNode in diffllm/config/schema.py); "
        "its keys: " + ", ".join(f.name for f in fields(ModelNode))
    ]


def test_the_generate_command_line_names_an_unknown_sampler_key(monkeypatch, capsys):
    from diffllm.cli import generate
    from diffllm.inference.inputs import EXIT_BAD_INPUT

    monkeypatch.setattr(sys, "argv", ["diffllm.generate", "ckpt_path=x.ckpt", "prompt=hi", "sampler.stpes=4"])
    with pytest.raises(SystemExit) as stop:
        generate.main()
    assert stop.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: sampler.stpes: 'stpes' is not a key of sampler (SamplerNode")


# -- the registry of classes a file may name ---------------------------------------------------------
def yaml_targets(node, group):
    """(group, _target_) of every ``_target_`` in a plain YAML node (the Lightning groups)."""
    if isinstance(node, dict):
        found = {(group, node["_target_"])} if "_target_" in node else set()
        return found.union(*(yaml_targets(v, group) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(yaml_targets(v, group) for v in node))
    return set()


def option_targets():
    """(group, _target_) of every class a group option builds: a typed option's node with its own
    values over it; a Lightning group's YAML as written."""
    found = set()
    for group in TYPED_GROUPS:
        for path in option_files(group):
            body = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "defaults"}
            node = OmegaConf.merge(OmegaConf.structured(node_of(path)), body)
            if "_target_" in node:
                found.add((group, node._target_))
    for group in ("trainer", "callbacks", "logger"):
        for path in option_files(group):
            found |= yaml_targets(yaml.safe_load(path.read_text()), group)
    return found


def test_the_registry_holds_every_class_the_conf_tree_builds_and_nothing_else():
    registry = allowed_targets()
    composed = option_targets() | {("module", compose(["output_dir=/x"]).module._target_)}
    assert {(g, t) for g, t in composed if t not in registry.get(g, ())} == set()
    # every class the registry allows exists under its path (a renamed class would be refused in files)
    for group, targets in registry.items():
        for target in targets:
            assert (get_method if target.endswith("build_trainer") else get_class)(target), (group, target)
    # and nothing the conf tree cannot build (module aside: the LightningModule a checkpoint names),
    # but the classes older files name (LEGACY_RUN_TARGETS: they keep loading)
    legacy = {(g, t) for g, ts in LEGACY_RUN_TARGETS.items() for t in ts}
    assert {(g, t) for g, ts in registry.items() for t in ts if g != "module"} - legacy == composed - {
        ("module", t) for t in registry["module"]
    }


# -- the groups together (issue 18, section 6) -------------------------------------------------------
@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if the model or the data is touched."""

    def refuse(*_, **__):
        raise AssertionError("the model or the data was loaded before the config was checked")

    monkeypatch.setattr("diffllm.training.module.build_diffusion_model", refuse)
    monkeypatch.setattr("diffllm.data.datamodule.AlpacaDataModule.__init__", refuse)
    monkeypatch.setattr("diffllm.training.run.prepare_assets", lambda cfg: None)


BLOCK = ["model.attention=block_causal", "model.block_size=4"]
REFUSED = [
    # the old crash: trained, then died in validation (sampler.block_length=16 of the old +experiment=smollm2)
    (["sampler.block_length=16"], "sampler.block_length=16: set null (or 4)"),
    (["+experiment=smollm2_prefix_lm"], "sampler.block_length=16: set null (or 4)"),
    (["sampler.cache=prefix"], "sampler.cache=prefix: set block (exact) or none"),
    (
        ["sampler.gen_length=18", "sampler.steps=null"],
        "sampler.gen_length=18 is not a whole number of blocks",
    ),
    (["sampler.steps=2"], "sampler.steps=2 cannot be spread evenly over 4 blocks: set a multiple of 4"),
    (["anneal=linear"], "anneal.steps=200"),
    (["data.answer_pad_to=6"], "data.answer_pad_to=6 is not a whole number of blocks"),
]


@pytest.mark.parametrize("extra,named", REFUSED, ids=[" ".join(r[0]) for r in REFUSED])
def test_a_block_model_that_cannot_decode_is_refused_before_anything_loads(extra, named, nothing_loads):
    from diffllm.training.run import train

    cfg = compose([*extra, *BLOCK, "output_dir=/tmp/unused"])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert "\n" not in message and named in message and "model.block_size=4" in message, message
    # objective=ar trains the causal model: the same settings pass (make train's ARGS go to both runs)
    cfg.objective._target_ = "diffllm.training.objectives.ARObjective"
    check_run_config(cfg)


def test_every_broken_rule_is_named_in_the_one_line():
    with pytest.raises(ConfigError) as err:
        check_run_config(
            compose(["+experiment=smollm2_prefix_lm", *BLOCK, "sampler.cache=prefix", "output_dir=/x"])
        )
    message = str(err.value)
    assert "sampler.block_length=16" in message and "sampler.cache=prefix" in message


def test_block_settings_that_decode_pass():
    check_run_config(compose(["+experiment=block_diffusion", "output_dir=/x"]))
    # the recipe defaults (issue 18): block 4, a curriculum from AR, the causal clean stream + AR term
    for name in ("smollm2", "alpaca_lora"):
        cfg = compose([f"+experiment={name}", "output_dir=/x"])
        check_run_config(cfg)
        schedule = [list(p) for p in cfg.model.block_schedule]
        assert cfg.model.attention == "block_causal" and cfg.model.block_size == 4 == schedule[-1][1]
        assert schedule[0] == [0, 1] and cfg.model.clean_stream == "causal" and cfg.loss.ar_weight == 2.0
        assert schedule[-1][0] / cfg.trainer.max_steps == 0.1  # at block 4 for the last nine tenths
        assert cfg.time_sampler.eps == 0.3  # training times clipped below (measured on SmolLM2)
        assert cfg.loss.complementary  # each row with its mask and the complement (measured on SmolLM2)
    # each block left to right (2.0 exact-match points over confidence order on SmolLM2 and on the tiny
    # set), at tau 0.99 where measured; Llama 3.2 on Alpaca one token per step
    for name in ("smollm2", "tiny_recipe"):
        sampler = compose([f"+experiment={name}", "output_dir=/x"]).sampler
        assert (sampler.strategy, sampler.threshold, sampler.steps, sampler.block_length) == (
            "left_to_right",
            0.99,
            None,
            4,
        )
    sampler = compose(["+experiment=alpaca_lora", "output_dir=/x"]).sampler
    assert (sampler.strategy, sampler.threshold, sampler.steps, sampler.block_length) == (
        "left_to_right",
        None,
        128,
        4,
    )
    # the old default keeps every old value, the training times included
    assert compose(["+experiment=smollm2_prefix_lm", "output_dir=/x"]).time_sampler.eps == 1e-3
    # +recipe=prefix_lm undoes every recipe key on any experiment; the old SmolLM2 default is that
    # recipe on +experiment=smollm2 with its one 16-position block
    for name in ("smollm2", "alpaca_lora", "tiny_recipe"):
        cfg = compose([f"+experiment={name}", "+recipe=prefix_lm", "output_dir=/x"])
        check_run_config(cfg)
        assert (cfg.model.attention, cfg.model.block_size, cfg.model.block_schedule) == (
            "prefix_lm",
            None,
            None,
        )
        assert (cfg.model.clean_stream, cfg.loss.ar_weight, cfg.time_sampler.eps) == ("block", 0.0, 1e-3)
        assert not cfg.loss.complementary
        assert (cfg.sampler.cache, cfg.sampler.block_length, cfg.sampler.strategy, cfg.sampler.threshold) == (
            "prefix",
            None,
            "low_confidence",
            None,
        )
    from diffllm.bench.train import PREFIX_LM, compose_run  # the step the training benchmark measures

    bench = compose_run(["+experiment=alpaca_lora", *PREFIX_LM])
    assert (bench["model"]["attention"], bench["loss"]["ar_weight"], bench["sampler"]["cache"]) == (
        "prefix_lm",
        0.0,
        "none",
    )
    old = compose(["+experiment=smollm2_prefix_lm", "output_dir=/x"])
    by_hand = compose(
        ["+experiment=smollm2", "+recipe=prefix_lm", "sampler.block_length=16", "sampler.threshold=0.9"]
        + ["output_dir=/x"]
    )
    assert OmegaConf.to_container(old) == OmegaConf.to_container(by_hand)
    # the quality grid's k=8 gives 2 steps for 4 blocks: not refused, the sweep keeps it as a skipped row
    check_run_config(compose([*BLOCK, "report.quality.tokens_per_step=[1,2,4,8]", "output_dir=/x"]))
    check_run_config(
        compose(
            [*BLOCK, "sampler.cache=block", "sampler.block_length=4", "report.enabled=false", "output_dir=/x"]
        )
    )


@pytest.mark.parametrize(
    "extra,named",
    [
        (
            ["model.attn_implementation=flash_attention_2"],
            "attn_implementation='flash_attention_2' cannot take",
        ),
        (["model.block_size=4"], "model.block_size=4 is read only by model.attention=block_causal"),
    ],
)
def test_what_the_loader_refuses_the_schema_refuses_first(extra, named, nothing_loads):
    from diffllm.training.run import train

    with pytest.raises(ConfigError, match=named):
        train(compose([*extra, "output_dir=/tmp/unused"]))
    # flash attention takes no custom mask; a native mode it can run
    check_run_config(
        compose(
            ["model.attention=bidirectional", "model.attn_implementation=flash_attention_2", "output_dir=/x"]
        )
    )
