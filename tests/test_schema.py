"""The config schema (diffllm/config/schema.py): ranges checked before anything loads, the module built
from its nodes, the LR schedule, and files read as data (crafted checkpoints and export cards)."""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from diffllm.config.resolvers import CONF_DIR, compose, to_plain
from diffllm.config.schema import MODULE_ARGS, ConfigError, ModuleNode, check_run_config, max_positions
from diffllm.config.trust import allowed_targets, check_card, check_untrusted, module_args
from diffllm.config.upgrade import upgrade_model
from diffllm.training.module import DiffusionLitModule, lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = (
    "objective",
    "model",
    "lora",
    "schedule",
    "time_sampler",
    "loss",
    "anneal",
    "sampler",
    "data",
    "optimizer",
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# -- the schema is the config tree's ------------------------------------------------------------------
@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_fits_the_schema(group, option):
    cfg = compose([f"{group}={option}", "output_dir=/tmp/unused"])
    node = check_run_config(cfg)
    assert node.seed == 0


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_fits_the_schema_and_holds_only_what_it_changes(experiment):
    check_run_config(compose([f"+experiment={experiment}", "output_dir=/tmp/unused"]))
    text = yaml.safe_load((CONF_DIR / "experiment" / f"{experiment}.yaml").read_text())

    # the same group choices without the experiment's own values: every value it sets must differ
    # (a plain name in the defaults list is another experiment this one extends; /group/option, an
    # option of a group the defaults list does not hold, is appended as +group=option)
    def choice_of(d) -> list[str]:
        if isinstance(d, str) and d.startswith("/"):
            group, option = d[1:].rsplit("/", 1)
            return [f"+{group}={option}"]
        if isinstance(d, str):
            return [f"+experiment={d}"]
        return [f"{k.split('/')[-1]}={v}" for k, v in d.items()]

    choices = [choice for d in text.pop("defaults", []) for choice in choice_of(d)]
    base = OmegaConf.to_container(compose([*choices, "output_dir=/tmp/unused"]), resolve=False)

    def leaves(node, prefix=""):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    repeated = []
    for key, value in leaves(text):
        here = base
        for part in key.split("."):
            here = here.get(part) if isinstance(here, dict) else None
        if here == value:
            repeated.append(f"{key}={value!r}")
    assert not repeated, f"{experiment}.yaml repeats values it already has: {repeated}"


def test_module_arguments_equal_the_schema_node_and_the_composed_wiring():
    params = [p for p in inspect.signature(DiffusionLitModule.__init__).parameters if p != "self"]
    assert tuple(params) == MODULE_ARGS
    # TrainNode wires the module from MODULE_ARGS (no YAML lists them again)
    node = OmegaConf.to_container(compose(["output_dir=/tmp/unused"]).module, resolve=False)
    assert node.pop("_target_") == ModuleNode._target_ and node.pop("_recursive_") is False
    assert tuple(node) == MODULE_ARGS and all(v == f"${{{k}}}" for k, v in node.items())


def test_generate_and_evaluate_share_one_sampler_node():
    gen = compose(["ckpt_path=x"], config_name="generate").sampler
    ev = compose(["ckpt_path=x"], config_name="evaluate").sampler
    assert OmegaConf.to_container(gen) == OmegaConf.to_container(ev)
    for name in ("generate", "evaluate"):
        assert "sampler" not in yaml.safe_load((CONF_DIR / f"{name}.yaml").read_text())


def test_legacy_prefix_lm_maps_to_attention():
    assert upgrade_model({"prefix_lm": True})["attention"] == "prefix_lm"
    assert upgrade_model({"prefix_lm": False})["attention"] == "bidirectional"
    assert "prefix_lm" not in upgrade_model({"prefix_lm": False})
    assert upgrade_model({"attention": "causal"}) == {"attention": "causal"}
    assert upgrade_model({})["attention"] == "bidirectional"  # what the loader built without the key


# -- ranges: one line naming key, value and range, before the model or data load --------------------
BAD = [
    ("lora.r=0", "lora.r=0", ">= 1"),
    ("lora.lora_alpha=0", "lora.lora_alpha=0", "> 0"),
    ("lora.lora_dropout=1.5", "lora.lora_dropout=1.5", "0 <= lora_dropout < 1"),
    ("optimizer.lr=-0.001", "optimizer.lr=-0.001", "> 0"),
    ("optimizer.warmup_steps=-1", "optimizer.warmup_steps=-1", ">= 0"),
    ("data.batch_size=0", "data.batch_size=0", ">= 1"),
    ("data.max_length=0", "data.max_length=0", ">= 1"),
    ("data.max_length=100000", "data.max_length=100000", "max_position_embeddings"),
    ("sampler.threshold=2 sampler.steps=null", "sampler.threshold=2", "0 < threshold <= 1"),
    (
        "sampler.threshold=0.5 sampler.steps=null sampler.strategy=entropy",
        "sampler.strategy='entropy'",
        "margin",
    ),
    ("sampler.steps=0", "sampler.steps=0", ">= 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0", ">= 1"),
    ("++model.attention=sideways", "model.attention='sideways'", "block_causal"),
    ("lora.r=abc", "lora.r", "abc"),
    ("+data.foo=1", "data.foo", "diffllm/config/schema.py"),  # an unknown key: a typo, named
]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if the model or the data is touched."""

    def refuse(*_, **__):
        raise AssertionError("the model or the data was loaded before the config was checked")

    monkeypatch.setattr("diffllm.training.module.build_diffusion_model", refuse)
    monkeypatch.setattr("diffllm.data.datamodule.AlpacaDataModule.__init__", refuse)
    monkeypatch.setattr("diffllm.training.run.prepare_assets", lambda cfg: None)


@pytest.mark.parametrize("override,named,valid", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_refused_before_anything_loads(override, named, valid, nothing_loads):
    from diffllm.training.run import train

    with pytest.raises(ConfigError) as err:
        train(compose([*override.split(), "output_dir=/tmp/unused"]))
    message = str(err.value)
    assert "\n" not in message and named in message and valid in message, message


def test_max_length_is_read_from_config_json_only(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 128}))
    assert max_positions({"pretrained": str(tmp_path), "config": None}) == 128  # no weights in the folder
    assert max_positions({"pretrained": "x", "config": {"max_position_embeddings": 7}}) == 7
    # a folder that exists wins over the dry run's architecture: it is what gets loaded
    assert max_positions({"pretrained": str(tmp_path), "config": {"max_position_embeddings": 7}}) == 128
    assert max_positions({"pretrained": str(tmp_path / "nowhere"), "config": None}) is None


def test_train_cli_exits_nonzero_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "diffllm.train", "lora.r=0", "hydra.run.dir=/tmp/diffllm_unused_run"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: lora.r=0 is out of range; valid: an integer >= 1"
    assert "Traceback" not in proc.stderr


GEN_BAD = [
    ("sampler.threshold=2", "sampler.threshold=2"),
    ("sampler.threshold=0.5 sampler.strategy=entropy", "sampler.strategy='entropy'"),
    ("sampler.gen_length=0", "sampler.gen_length=0"),
    ("batch_size=0", "batch_size=0"),
]


@pytest.mark.parametrize("override,named", GEN_BAD, ids=[b[0] for b in GEN_BAD])
def test_generate_refuses_bad_values_before_loading(override, named, tmp_path, monkeypatch):
    from diffllm.cli import generate
    from diffllm.inference import generation

    monkeypatch.setattr(generation, "load_quietly", lambda *a, **k: pytest.fail("loaded before checking"))
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    cfg = compose([f"ckpt_path={ckpt}", "prompt=hi", *override.split()], config_name="generate")
    with pytest.raises(generate.InputError, match=r"^[^\n]*$") as err:
        generate.run(cfg)
    assert named in str(err.value)


@pytest.mark.parametrize(
    "kwargs,named",
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"rows": 0}, "rows=0"),
        ({"sampler": {"threshold": 1.5}}, "sampler.threshold=1.5"),
        ({"likelihood": {"num_samples": 0}}, "val_likelihood.num_samples=0"),
    ],
)
def test_evaluate_refuses_bad_values_before_loading(kwargs, named, monkeypatch):
    from diffllm.inference import evaluate

    monkeypatch.setattr(evaluate, "load_for_inference", lambda *a, **k: pytest.fail("loaded before checking"))
    with pytest.raises(ConfigError) as err:
        evaluate.evaluate("x.ckpt", **kwargs)
    assert named in str(err.value) and "\n" not in str(err.value)


# -- the LR schedule ----------------------------------------------------------------------------------
def test_lr_factor_exact_values():
    w, t, r = 20, 600, 0.1
    assert lr_factor(0, w, t, r) == 1 / 20  # the first step trains at lr / W
    assert lr_factor(9, w, t, r) == 10 / 20
    assert lr_factor(19, w, t, r) == 1.0
    assert lr_factor(20, w, t, r) == 1.0  # cosine starts at the peak
    assert lr_factor(310, w, t, r) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-15)  # mid-decay
    assert lr_factor(600, w, t, r) == pytest.approx(0.1, abs=1e-15)  # the floor at the end
    assert lr_factor(900, w, t, r) == pytest.approx(0.1, abs=1e-15)  # and after it
    assert lr_factor(0, 0, 10, 0.0) == 1.0  # no warm-up


def test_lr_factor_is_transformers_cosine_after_warmup():
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, 20, 600, min_lr_rate=0.1)
    theirs = sched.lr_lambdas[0]
    assert all(lr_factor(s, 20, 600, 0.1) == pytest.approx(theirs(s), abs=1e-12) for s in range(20, 601))
    # warm-up: one step ahead of transformers' step / W (the first step does not train at lr 0)
    assert all(lr_factor(s, 20, 600, 0.1) == pytest.approx(theirs(s + 1)) for s in range(19))


def test_configure_optimizers_uses_the_schedule(tiny_run):
    module = DiffusionLitModule.load_from_checkpoint(tiny_run[1], map_location="cpu")
    module._trainer = type("T", (), {"estimated_stepping_batches": 6})()
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lr, w = module.optim.lr, module.optim.warmup_steps
    seen = []
    for _ in range(8):
        seen.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    total = max(6, w + 1)
    assert seen == [pytest.approx(lr * lr_factor(s, w, total, module.optim.min_lr_ratio)) for s in range(8)]
    module._trainer = None


# -- untrusted files ----------------------------------------------------------------------------------
def test_registry_is_the_typed_nodes_targets():
    reg = allowed_targets()
    assert reg["schedule"] == {
        f"diffllm.diffusion.schedule.{c}Schedule" for c in ("Linear", "Cosine", "LogLinear", "Polynomial")
    }
    assert "diffllm.training.objectives.ARObjective" in reg["objective"]
    assert not any("os." in t or "builtins" in t for ts in reg.values() for t in ts)


CRAFTED = [
    ("schedule", {"_target_": "os.system", "_args_": ["touch {sentinel}"]}, "schedule._target_='os.system'"),
    (
        "anneal",
        {"_target_": "builtins.exec", "_args_": ["open('{sentinel}', 'w')"]},
        "anneal._target_='builtins.exec'",
    ),
    (
        "loss",
        {"_target_": "diffllm.training.run.train"},
        "loss._target_='diffllm.training.run.train'",
    ),  # not in the registry
    (
        "schedule",
        {"_target_": "diffllm.diffusion.time.UniformTimeSampler"},
        "schedule._target_=",
    ),  # another group's
    (
        "data",
        {"_target_": "diffllm.data.datamodule.AlpacaDataModule", "path": "${oc.env:HOME}"},
        "data.path='${oc.env:HOME}'",
    ),
]


def _craft(node: dict, sentinel: Path) -> dict:
    return json.loads(json.dumps(node).replace("{sentinel}", str(sentinel)))


@pytest.fixture(scope="module")
def ckpt_dict(tiny_run):
    return torch.load(tiny_run[1], map_location="cpu", weights_only=True)


@pytest.mark.parametrize(
    "key,node,named", CRAFTED, ids=[c[2].split("=")[0] + "=" + c[1]["_target_"] for c in CRAFTED]
)
def test_crafted_checkpoint_is_refused_without_side_effect(key, node, named, ckpt_dict, tmp_path):
    from diffllm.inference.loading import load_for_inference

    sentinel = tmp_path / "sentinel"
    ckpt = {**ckpt_dict, "hyper_parameters": {**ckpt_dict["hyper_parameters"], key: _craft(node, sentinel)}}
    torch.save(ckpt, tmp_path / "crafted.ckpt")
    with pytest.raises(ConfigError) as err:
        load_for_inference(tmp_path / "crafted.ckpt")
    assert named in str(err.value) and "crafted.ckpt" in str(err.value)
    assert not sentinel.exists()


def test_crafted_old_style_checkpoint_is_refused(ckpt_dict, tmp_path):
    sentinel = tmp_path / "sentinel"
    old = {"cfg": {**ckpt_dict["hyper_parameters"], "schedule": _craft(CRAFTED[0][1], sentinel)}}
    torch.save({**ckpt_dict, "hyper_parameters": old}, tmp_path / "old.ckpt")
    with pytest.raises(ConfigError, match="schedule._target_='os.system'"):
        DiffusionLitModule.load_from_checkpoint(tmp_path / "old.ckpt")
    assert not sentinel.exists()


def test_trust_remote_code_from_a_file_is_refused_unless_passed(ckpt_dict, tmp_path):
    hp = ckpt_dict["hyper_parameters"]
    crafted = {**hp, "model": {**hp["model"], "trust_remote_code": True}}
    torch.save({**ckpt_dict, "hyper_parameters": crafted}, tmp_path / "remote.ckpt")
    from diffllm.inference.loading import load_for_inference

    with pytest.raises(
        ConfigError, match="model.trust_remote_code=True .* trust_remote_code=true on the command line"
    ):
        load_for_inference(tmp_path / "remote.ckpt")
    # passed by the user: honoured (the tiny model ships no code, so it loads)
    args = module_args(crafted, "remote.ckpt", trust_remote_code=True)
    assert args["model"]["trust_remote_code"] is True
    # a file saying false never turns the user's flag into the file's
    assert module_args(hp, "x", trust_remote_code=False)["model"]["trust_remote_code"] is False


def test_pickled_object_in_a_checkpoint_is_refused(ckpt_dict, tmp_path):
    sentinel = tmp_path / "sentinel"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    torch.save({**ckpt_dict, "hyper_parameters": {"cfg": Payload()}}, tmp_path / "pickle.ckpt")
    with pytest.raises(ConfigError, match="not a plain Lightning checkpoint"):
        DiffusionLitModule.load_from_checkpoint(tmp_path / "pickle.ckpt")
    assert not sentinel.exists()


def test_out_of_range_value_in_a_checkpoint_is_refused(ckpt_dict):
    hp = {**ckpt_dict["hyper_parameters"], "lora": {**ckpt_dict["hyper_parameters"]["lora"], "r": 0}}
    with pytest.raises(ConfigError, match="lora.r=0"):
        check_untrusted(hp, "x.ckpt")


def _card(ckpt_dict) -> dict:
    hp = ckpt_dict["hyper_parameters"]
    return {
        "format": "diffllm-export/1",
        "kind": "merged",
        "mask_id": 5,
        "shift": True,
        "model": {k: v for k, v in hp["model"].items() if k != "config"},
        "lora": hp["lora"],
        "sampler": {k: v for k, v in hp["sampler"].items() if k != "_target_"},
        "run_config": hp,
    }


@pytest.mark.parametrize(
    "edit,named",
    [
        (
            lambda c, s: c["run_config"].update(schedule=_craft(CRAFTED[0][1], s)),
            "schedule._target_='os.system'",
        ),
        (
            lambda c, s: c["run_config"].update(anneal=_craft(CRAFTED[1][1], s)),
            "anneal._target_='builtins.exec'",
        ),
        (lambda c, s: c["model"].update(trust_remote_code=True), "model.trust_remote_code=True"),
        (lambda c, s: c["sampler"].update(threshold=3.0, steps=None), "sampler.threshold=3.0"),
    ],
    ids=["os.system", "builtins.exec", "trust_remote_code", "threshold"],
)
def test_crafted_export_card_is_refused_without_side_effect(edit, named, ckpt_dict, tmp_path):
    from diffllm.inference.loading import load_for_inference

    sentinel = tmp_path / "sentinel"
    card = json.loads(json.dumps(_card(ckpt_dict)))
    check_card(card, "diffllm.json")  # the honest card passes
    edit(card, sentinel)
    folder = tmp_path / "export" / "merged"
    folder.mkdir(parents=True)
    (folder / "diffllm.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError) as err:
        load_for_inference(folder.parent)
    assert named in str(err.value) and "diffllm.json" in str(err.value)
    assert not sentinel.exists()


# -- checkpoints: new and old ------------------------------------------------------------------------
def test_old_cfg_checkpoint_still_loads(tiny_run, ckpt_dict, tmp_path):
    """A checkpoint written before the named arguments: one ``cfg`` hyperparameter holding the whole
    run config (``model.prefix_lm``, no ``diffllm.limit_val_batches``), as the old module saved it."""
    out, _, _ = tiny_run
    run_config = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"), resolve=True)
    model = dict(run_config["model"])
    model["prefix_lm"] = model.pop("attention", "prefix_lm") == "prefix_lm"  # the old key
    old = {
        **ckpt_dict,
        "hyper_parameters": {"cfg": {**run_config, "model": model}},
        "diffllm": {k: v for k, v in ckpt_dict["diffllm"].items() if k != "limit_val_batches"},
    }
    torch.save(old, tmp_path / "old.ckpt")
    new = DiffusionLitModule.load_from_checkpoint(tiny_run[1], map_location="cpu")
    legacy = DiffusionLitModule.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu")
    assert legacy.hparams["model"]["attention"] == new.hparams["model"]["attention"] == "prefix_lm"
    assert to_plain(dict(legacy.hparams)) == to_plain(dict(new.hparams))
    assert legacy.cfg["trainer"]["limit_val_batches"] == run_config["trainer"]["limit_val_batches"]
    for key, value in new.state_dict().items():
        assert torch.equal(legacy.state_dict()[key], value), key
    assert math.isclose(legacy.optim.lr, run_config["optimizer"]["lr"])


def test_a_checkpoint_written_before_the_layout_move_loads_with_the_same_classes(
    tiny_run, ckpt_dict, tmp_path
):
    """Targets under the modules that moved (``diffllm.objectives``, ``diffllm.callbacks``, ...)
    name the same classes: the old checkpoint loads, and an unknown module is still refused."""
    from diffllm.config.upgrade import MOVED_MODULES, upgrade_targets

    hparams = dict(ckpt_dict["hyper_parameters"])
    target = hparams["objective"]["_target_"]
    new_module, _, name = target.rpartition(".")
    old_module = next(old for old, new in MOVED_MODULES.items() if new == new_module)
    old = {
        **ckpt_dict,
        "hyper_parameters": {
            **hparams,
            "objective": {**hparams["objective"], "_target_": f"{old_module}.{name}"},
        },
    }
    torch.save(old, tmp_path / "old.ckpt")
    legacy = DiffusionLitModule.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu")
    assert type(legacy.objective).__name__ == name and legacy.hparams["objective"]["_target_"] == target
    assert upgrade_targets({"a": [{"_target_": "diffllm.lit_module.X"}]}) == {
        "a": [{"_target_": "diffllm.training.module.X"}]
    }
    crafted = {
        **ckpt_dict,
        "hyper_parameters": {**hparams, "objective": {"_target_": "diffllm.nowhere.ARObjective"}},
    }
    torch.save(crafted, tmp_path / "crafted.ckpt")
    with pytest.raises(ConfigError, match="diffllm.nowhere.ARObjective"):
        DiffusionLitModule.load_from_checkpoint(tmp_path / "crafted.ckpt", map_location="cpu")


def test_sampler_config_refuses_a_threshold_it_cannot_compare():
    """The sampler (maths) checks its own fields with plain ValueErrors naming the sampler.* key; the
    config layer's node is derived from it and says the same as a ConfigError."""
    from diffllm.config.schema import SamplerNode, check_node
    from diffllm.diffusion.sampler import SamplerConfig

    for kwargs, message in (
        ({"threshold": 0.5, "strategy": "entropy"}, "strategy='entropy' cannot take sampler.threshold=0.5"),
        ({"threshold": 1.5}, "sampler.threshold=1.5 is out of range"),
    ):
        with pytest.raises(ValueError, match=message) as err:
            SamplerConfig(gen_length=4, **kwargs)
        assert not isinstance(err.value, ConfigError)
        with pytest.raises(ConfigError, match=message):
            check_node(SamplerNode, {"gen_length": 4, **kwargs})
    assert SamplerConfig(gen_length=4, threshold=1.0, strategy="margin").threshold == 1.0
