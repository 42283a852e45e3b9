"""Ready for GPU nodes, checked on CPU: trainer configs, validation cadence, throughput/MFU logging,
the end-of-run report's device, gradient checkpointing."""

from __future__ import annotations

import csv
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from diffllm.config.resolvers import CONF_DIR, compose
from diffllm.training.callbacks import TokenThroughput, flops_per_token, parameter_count
from diffllm.training.trainer import build_trainer
from tests.conftest import TINY_RUN

pytestmark = pytest.mark.usefixtures("one_thread")


# -- trainer configs -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml")))
def test_every_trainer_config_composes_and_builds_on_cpu(name):
    cfg = compose([f"trainer={name}", "output_dir=/tmp/x"])
    assert cfg.trainer._target_ == "diffllm.training.trainer.build_trainer"
    from hydra.utils import instantiate

    # the same node on this CPU box: only the accelerator (and precision) differ from a GPU node
    trainer = instantiate(
        cfg.trainer, accelerator="cpu", precision="32-true", devices=2 if name == "ddp" else 1
    )
    assert trainer.max_steps == cfg.trainer.max_steps
    assert trainer.val_check_interval == cfg.trainer.val_every_n_steps * cfg.trainer.accumulate_grad_batches
    if name == "ddp":
        assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2


def test_readme_multi_gpu_overrides_compose():
    """What the README promises: ``trainer=ddp``, and ``trainer.devices=N trainer.strategy=ddp``."""
    cfg = compose(["+experiment=alpaca_lora", "trainer=ddp", "trainer.num_nodes=2", "output_dir=/tmp/x"])
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.num_nodes) == ("ddp", "auto", 2)
    assert cfg.trainer.precision == "bf16-mixed"  # ddp.yaml builds on gpu.yaml
    cfg = compose(
        ["+experiment=alpaca_lora", "trainer.devices=4", "trainer.strategy=ddp", "output_dir=/tmp/x"]
    )
    assert (cfg.trainer.strategy, cfg.trainer.devices) == ("ddp", 4)


def test_trainer_ddp_cfg_job_from_the_command_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffllm.train",
            "+experiment=alpaca_lora",
            "trainer=ddp",
            "trainer.devices=8",
            "--cfg",
            "job",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "strategy: ddp" in out.stdout and "devices: 8" in out.stdout


def test_validation_interval_is_in_optimizer_steps_and_conflicts_are_named():
    trainer = build_trainer(val_every_n_steps=5, accumulate_grad_batches=4, accelerator="cpu", max_steps=20)
    assert trainer.val_check_interval == 20 and trainer.accumulate_grad_batches == 4
    with pytest.raises(ValueError, match="val_every_n_steps"):
        build_trainer(val_every_n_steps=5, val_check_interval=10, accelerator="cpu")
    with pytest.raises(ValueError, match="positive whole number"):
        build_trainer(val_every_n_steps=0, accelerator="cpu")


# -- FLOPs per token -------------------------------------------------------------------------------
def test_flops_per_token_of_the_tiny_default_is_4n_plus_adapters():
    from diffllm.training.module import DiffusionLitModule

    cfg = compose(["output_dir=/tmp/x"])

    module = DiffusionLitModule.from_run_config(cfg)
    c = module.dlm.base.config  # d 128, 4 layers, 4 heads x 32, 2 KV heads, MLP 344, tied embeddings
    d, kv, layers, r = c.hidden_size, c.num_key_value_heads * c.head_dim, c.num_hidden_layers, cfg.lora.r
    block = d * d * 2 + d * kv * 2 + 3 * d * c.intermediate_size + 2 * d  # q,o + k,v + MLP + 2 norms
    n_base = layers * block + d  # + final norm; the embedding (tied head) is not counted
    n_lora = layers * r * ((d + d) * 2 + (d + kv) * 2)  # A (r x in) + B (out x r) on q, o, k, v
    assert (n_base, n_lora) == (726_144, 28_672)
    assert parameter_count(module) == (n_base + n_lora, n_lora)
    assert flops_per_token(module) == 4 * (n_base + n_lora) + 2 * n_lora == 3_076_608
    # full fine-tuning: every weight gets a gradient -> 6N
    for p in module.parameters():
        p.requires_grad_(True)
    assert flops_per_token(module) == 6 * (n_base + n_lora)


def test_flops_per_token_of_llama_3_2_1b_with_lora_on_the_meta_device():
    """The real run's figure (README): N = 16 blocks x 60,821,504 + final norm + LoRA r=8."""
    from diffllm.config.resolvers import to_plain
    from diffllm.model.load import build_from_config

    cfg = to_plain(compose(["+experiment=alpaca_lora", "output_dir=/tmp/x"]))
    architecture = cfg["model"].pop("config")
    dlm = build_from_config(architecture, cfg["lora"], device="meta", **cfg["model"])
    d, kv, ff = 2048, 8 * 64, 8192
    n_base = 16 * (2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d) + d
    assert n_base == 973_146_112
    assert parameter_count(dlm) == (n_base + 1_703_936, 1_703_936)  # PEFT's trainable figure
    assert flops_per_token(dlm) == 4 * (n_base + 1_703_936) + 2 * 1_703_936 == 3_902_808_064


# -- one short run with gradient accumulation: cadence, metrics, report device --------------------
class _ValidationCounter(L.Callback):
    def __init__(self) -> None:
        self.at_steps: list[int] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.at_steps.append(trainer.global_step)


@pytest.fixture(scope="module")
def accumulated_run(tmp_path_factory):
    """4 optimizer steps of 2 micro-batches, validation every 2 optimizer steps, report on."""
    import diffllm.evaluation.scoring
    from diffllm.training.run import train

    out = tmp_path_factory.mktemp("accumulated")
    counter = _ValidationCounter()
    devices: list[tuple[torch.device, torch.device]] = []  # (report's input device, module's device)
    original = (
        diffllm.evaluation.scoring.elbo_nll
    )  # the scoring core's bound: validation and the report call it

    def spy(dlm, input_ids, *args, **kwargs):
        devices.append((input_ids.device, next(dlm.parameters()).device))
        return original(dlm, input_ids, *args, **kwargs)

    overrides = [o for o in TINY_RUN if not o.startswith(("trainer.max_steps", "trainer.val_every"))] + [
        "trainer.max_steps=4",
        "trainer.val_every_n_steps=2",
        "trainer.accumulate_grad_batches=2",
        "trainer.log_every_n_steps=1",
        "callbacks.throughput.window=2",
        "callbacks.throughput.peak_flops=1.0e12",
        f"output_dir={out}",
        # on a CUDA machine the same run trains on the GPU: the report-device check then bites
        f"trainer.accelerator={'gpu' if torch.cuda.is_available() else 'cpu'}",
    ]
    mp = pytest.MonkeyPatch()
    mp.setattr(diffllm.evaluation.scoring, "elbo_nll", spy)
    orig_build = build_trainer

    def with_counter(**kw):
        kw["callbacks"] = [*kw.get("callbacks", []), counter]
        return orig_build(**kw)

    mp.setattr("diffllm.training.trainer.build_trainer", with_counter)
    try:
        metrics, objs = train(compose(overrides))
    finally:
        mp.undo()
    return out, metrics, objs, counter, devices


@pytest.mark.slow
def test_validation_runs_every_n_optimizer_steps_with_accumulation(accumulated_run):
    _, _, objs, counter, _ = accumulated_run
    assert objs["trainer"].global_step == 4
    assert counter.at_steps == [2, 4]  # micro-batch counting would validate 4 times: steps 1, 2, 3, 4


@pytest.mark.slow
def test_throughput_mfu_and_padding_reach_metrics_csv(accumulated_run):
    out, metrics, objs, _, _ = accumulated_run
    rows = list(csv.DictReader((out / "logs" / "metrics.csv").read_text().splitlines()))
    logged = [r for r in rows if r.get("train/tokens_per_sec")]
    assert len(logged) >= 2
    for r in logged:
        tokens, nonpad = float(r["train/tokens_per_sec"]), float(r["train/nonpad_tokens_per_sec"])
        pad = float(r["train/pad_frac"])
        assert 0 < nonpad < tokens and 0 < pad < 1
        assert nonpad == pytest.approx(tokens * (1 - pad), rel=1e-4)
        # MFU = FLOPs/token x non-pad tokens/s / peak (1e12 FLOP/s set for this CPU)
        fpt = flops_per_token(objs["module"])
        assert float(r["train/mfu"]) == pytest.approx(fpt * nonpad / 1.0e12, rel=1e-4)


@pytest.mark.slow
def test_report_runs_on_the_training_device(accumulated_run):
    """Lightning's teardown moves the module to the CPU after fit; the report must run where it trained.

    On this CPU box both are the CPU; on a CUDA machine (``tests/`` run there) the same assertion
    is the one that failed before the fix (the report's batches went to a CPU module).
    """
    _, metrics, objs, _, devices = accumulated_run
    root = objs["trainer"].strategy.root_device
    assert "report/nll_bound" in metrics or any(k.startswith("report/") for k in metrics)
    assert devices, "the report computed no likelihood"
    for batch_device, module_device in devices:
        assert batch_device.type == module_device.type == root.type
    assert all(p.device.type == root.type for p in objs["module"].parameters())


def test_no_throughput_without_a_peak_on_cpu():
    cb = TokenThroughput(window=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    cb.setup(trainer, torch.nn.Linear(2, 2), "fit")
    assert cb.peak_flops is None  # Lightning knows no CPU peak: no train/mfu rather than a made-up one
    with pytest.raises(ValueError, match="window"):
        TokenThroughput(window=0)


# -- gradient checkpointing ------------------------------------------------------------------------
LORA = {
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "init_lora_weights": False,  # B != 0, so A gets a gradient too
}


def _lora_grads(model_dir: str, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    from diffllm.model.load import build_diffusion_model

    torch.manual_seed(0)
    dlm, tok = build_diffusion_model(
        model_dir, LORA, shift=True, attention="prefix_lm", gradient_checkpointing=checkpointing
    )
    dlm.train()
    calls = []
    # count the runs of a module inside the block (hooks do not fire on the backward's recompute)
    mlp = dlm.base.model.layers[0].mlp
    mlp_forward = mlp.forward
    mlp.forward = lambda *a, **k: calls.append(1) or mlp_forward(*a, **k)
    torch.manual_seed(1)
    ids = torch.randint(4, len(tok) - 1, (2, 12))
    targets = torch.zeros_like(ids, dtype=torch.bool)
    targets[:, 6:] = True
    xt = torch.where(targets & (torch.rand(ids.shape) < 0.5), dlm.mask_id, ids)
    logits = dlm.logits_at(xt, targets, torch.ones_like(ids), canvas_mask=targets)
    torch.nn.functional.cross_entropy(logits, ids[targets]).backward()
    grads = {n: p.grad.clone() for n, p in dlm.named_parameters() if p.requires_grad and "lora" in n}
    return grads, len(calls)


def test_gradient_checkpointing_gives_the_same_lora_gradients(tiny_model_dir):
    plain, plain_calls = _lora_grads(tiny_model_dir, checkpointing=False)
    ckpt, ckpt_calls = _lora_grads(tiny_model_dir, checkpointing=True)
    assert plain_calls == 1 and ckpt_calls == 2  # the block really was recomputed in the backward
    assert plain.keys() == ckpt.keys() and len(plain) == 2 * 2 * 4  # A, B x 4 projections x 2 layers
    for name in plain:
        assert plain[name].abs().sum() > 0, name  # every LoRA matrix gets a gradient through the checkpoint
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_key_composes():
    assert compose(["model.gradient_checkpointing=true", "output_dir=/tmp/x"]).model.gradient_checkpointing
    assert compose(["+experiment=alpaca_lora", "output_dir=/tmp/x"]).model.gradient_checkpointing is False
