"""The LightningModule: orchestration only. The math lives in ``diffllm.diffusion``.

Every choice (schedule, time sampler, loss, annealing, sampler) is a Hydra node instantiated
here from the plain-dict config the module is built from; the module never branches on strings.
Checkpoints keep only the trainable weights (LoRA, a trained [MASK] row) plus the config: the
frozen base is rebuilt from ``model.pretrained`` when a checkpoint is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchmetrics import MeanMetric
from typing_extensions import override

from diffllm.config.schema import (
    MODULE_ARGS,
    ConfigError,
    OptimizerNode,
    ValLikelihoodNode,
    check_block_recipe,
    check_loss_recipe,
)
from diffllm.config.trust import module_args, read_hparams
from diffllm.config.upgrade import upgrade_model
from diffllm.data.template import end_of_answer_id
from diffllm.diffusion.complementary import ComplementaryTimes, complementary_pair
from diffllm.diffusion.distill import distill_sum
from diffllm.diffusion.forward import forward_process, keyed_forward_process
from diffllm.diffusion.keys import DrawKeys, key_seed
from diffllm.diffusion.likelihood import validation_seed
from diffllm.diffusion.sampler import generate
from diffllm.evaluation.compare import validation_scores
from diffllm.evaluation.names import FIGURES
from diffllm.evaluation.scoring import TOKENS_OF
from diffllm.model.attention import attention_of
from diffllm.model.blocks import check_block_size, scheduled_block_size
from diffllm.model.load import build_diffusion_model, trainable_line
from diffllm.training.distributed import GlobalNormaliser, draw_keys, nominal_batch_size
from diffllm.training.objectives import objective_of

# scoring-core row -> validation metric (per token, nats): val/<figure> of the one name map
VAL_METRICS = {row: f"val/{figure}" for row, (figure, _) in FIGURES.items() if row != "l2r_nll"}

log = logging.getLogger(__name__)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The LR multiplier at optimizer step ``step`` (0-based): linear warm-up, then cosine decay.

        step < W:  (step + 1) / W
        else:      r + (1 - r) * (1 + cos(pi * p)) / 2,   p = min((step - W) / max(T - W, 1), 1)

    with W = ``warmup_steps``, T = ``total_steps``, r = ``min_lr_ratio``: the first step already
    trains at lr / W, the LR reaches ``lr`` at step W and ``r * lr`` at step T (and stays there).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _plain(node: Any) -> Any:
    """A Hydra node (``_recursive_: false`` hands them over as DictConfig) -> plain containers."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


class DiffusionLitModule(L.LightningModule):
    """Masked-diffusion fine-tuning of a bidirectional LoRA-adapted causal LM.

    Every argument is a config node (``diffllm.config.schema.ModuleNode``; the run config's
    ``module``, wired by ``TrainNode`` and instantiated with ``_recursive_: false``), saved as plain
    hyperparameters, so ``load_from_checkpoint(path)`` rebuilds the same run. Checkpoints written
    before this signature (one ``cfg`` hyperparameter holding the whole run config) load too.
    """

    def __init__(
        self,
        *,
        model: Mapping[str, Any],
        lora: Mapping[str, Any] | None,
        data: Mapping[str, Any],
        objective: Mapping[str, Any],
        schedule: Mapping[str, Any],
        time_sampler: Mapping[str, Any],
        loss: Mapping[str, Any],
        anneal: Mapping[str, Any],
        sampler: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        val_likelihood: Mapping[str, Any],
        seed: int,
    ) -> None:
        super().__init__()
        args = {k: _plain(v) for k, v in locals().items() if k in MODULE_ARGS}
        args["model"] = upgrade_model(args["model"])  # legacy prefix_lm: true|false
        self.save_hyperparameters(args)
        self.strict_loading = False  # the checkpoint holds the trainable weights only
        self.seed = int(seed)
        self.optim = OptimizerNode(**args["optimizer"])  # typed: ranges checked, defaults from the schema
        self.val_likelihood = ValLikelihoodNode(**args["val_likelihood"])
        self.limit_val_batches: int | float | None = None  # recorded in checkpoints for evaluate
        # objective=diffusion (this module's diffusion_loss) or objective=ar (AR-SFT, the baseline);
        # read through the project's registry, as a checkpoint's config is data
        self.objective = objective_of({"objective": args["objective"]})
        # config time, before the model is built (AR-SFT trains the causal model: no blocks)
        if attention_of(args["model"]) == "block_causal" and self.objective.attention is None:
            check_block_size(args["model"].get("block_size"), args["data"].get("answer_pad_to"))
        # block_schedule, clean_stream and ar_weight together (run configs are checked before this too)
        check_block_recipe(args["model"], args["data"], args["loss"])
        check_loss_recipe(args)  # loss.complementary / loss.distill_weight against their keys, before loading
        self.dlm, self.tokenizer = build_diffusion_model(lora=args["lora"], **args["model"])
        # The end-of-answer id (EOS, or the chat template's end of turn) the sampler stops at.
        self.eos_id = end_of_answer_id(self.tokenizer, args["data"]["template"])
        self.dlm.train()  # from_pretrained returns eval mode; LoRA dropout must be live in training
        log.info("%s", trainable_line(self.dlm.model))
        if self.objective.attention is not None:  # AR-SFT: the model it trains is causal
            self.dlm.attention = self.objective.attention
        # the block-size curriculum (model.block_schedule), a block model's only: AR-SFT ignores it
        self.block_schedule = args["model"].get("block_schedule") if self.dlm.block_size is not None else None
        self.schedule = instantiate(args["schedule"])  # training only: bounds use evaluation.EVAL_SCHEDULE
        self.time_sampler = instantiate(args["time_sampler"])
        self.loss_fn = instantiate(args["loss"])
        if self.loss_fn.complementary:  # t in [eps, 1 - eps], so both halves of the pair have a finite w
            self.time_sampler = ComplementaryTimes(self.time_sampler)
        # annealing composes with model.attention (diffllm.diffusion.annealing), block_causal aside
        self.annealing = instantiate(args["anneal"])
        if self.dlm.block_size is not None and self.annealing.steps > 0:
            raise ValueError(
                f"model.attention=block_causal cannot be combined with attention annealing ({self.annealing}): "
                "its mask is over the two-copy training layout; use anneal=none"
            )
        self.sampler_config = instantiate(args["sampler"])
        self.val_loss = MeanMetric()
        # the rows this objective's validation scores: its own model's NLL and the base AR model's
        self.val_rows = [self.objective.role, "ar_base", "ar_base_no_end"]
        self.val_nll = torch.nn.ModuleDict({row: MeanMetric() for row in self.val_rows})
        # non-pad tokens of every training batch (all ranks, all micro-batches): report provenance
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long), persistent=False)
        self.normaliser = GlobalNormaliser()  # the loss normaliser of the whole optimizer step

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> DiffusionLitModule:
        """The module of a whole run config (a composed ``train`` config, DictConfig or plain): its
        top-level nodes, as ``conf/train.yaml``'s ``module`` node wires them."""
        plain = _plain(cfg)
        return cls(**{k: plain[k] for k in MODULE_ARGS})

    @property
    def cfg(self) -> dict[str, Any]:
        """The run's config as far as the module knows it (its nodes, plain), for loaders and reports;
        ``trainer.limit_val_batches`` is the validation length ``evaluate`` reproduces."""
        out = {k: self.hparams[k] for k in MODULE_ARGS}
        if self.limit_val_batches is not None:
            out["trainer"] = {"limit_val_batches": self.limit_val_batches}
        return out

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        *,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> DiffusionLitModule:
        """Lightning's ``load_from_checkpoint``, with the checkpoint's hyperparameters read as data:
        checked against the schema (``diffllm.config.trust.check_untrusted``: no ``_target_`` outside the
        project's registry, no ``trust_remote_code`` the caller did not pass) before anything is
        built. Old checkpoints (one ``cfg`` hyperparameter) are read into today's arguments."""
        args = module_args(
            read_hparams(checkpoint_path), checkpoint_path, trust_remote_code=trust_remote_code
        )
        return super().load_from_checkpoint(
            checkpoint_path,
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            **{**args, **kwargs},
        )

    @property
    def mask_id(self) -> int:
        return self.dlm.mask_id

    def block_size_at(self, step: int) -> int | None:
        """The block size training uses at optimizer step ``step`` (``model.block_schedule``); None
        without a schedule (the model's own ``block_size`` throughout). A pure function of the step:
        a resumed run trains at the size the uninterrupted one would. Validation, bounds, the sampler
        and the export always use the final size, ``model.block_size``, so ``val/nll_bound`` (and
        ``best.ckpt``, chosen by it) compares every step at the size the model is used at."""
        return scheduled_block_size(self.block_schedule, step)

    # -- the objective ---------------------------------------------------------------------------
    def diffusion_loss(
        self,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator | None = None,
        keys: DrawKeys | None = None,
        block_size: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sample t, hide answer tokens w.p. 1 - alpha(t), predict them back; returns (loss, stats).

        The draws come from ``keys`` (training: keyed per row) or else from ``generator``.
        ``block_size``: a block model's blocks for this loss (training: the curriculum's size in
        force, ``block_size_at``); None: the model's own.
        With ``loss.ar_weight`` w > 0 the clean copy's next-token CE on the scored tokens (``score_mask``:
        answer + first end token) is added, from the same forward pass:
        ``weighted_sum`` = S_diffusion + w * S_AR over the same ``count`` Z (``diffllm.diffusion.loss``).
        stats: n_answer, n_hidden, the loss's numerator ``weighted_sum`` and normaliser ``count``, and
        with the AR term ``ar_sum`` (its unweighted CE sum, nats) and ``n_scored``.
        ``loss.complementary``: the rows are doubled after the draws (``complementary_pair``), so
        every count covers both halves, while the forward pass takes the rows once with their two
        noisings (``copies=2``: a block model computes a pair's clean stream once, L + 2A columns a
        row instead of 2 (L + A)); ``loss.distill_weight``: ``distill_sum``'s KL joins the numerator.
        """
        x0, attention_mask, answer_mask = batch["input_ids"], batch["attention_mask"], batch["answer_mask"]
        if keys is not None:
            t = self.time_sampler.keyed(keys, device=x0.device)  # (B,)
            xt, hidden = keyed_forward_process(
                x0, answer_mask, self.schedule.mask_prob(t), self.mask_id, keys
            )
        else:
            t = self.time_sampler(x0.shape[0], device=x0.device, generator=generator)  # (B,)
            xt, hidden = forward_process(x0, answer_mask, self.schedule.mask_prob(t), self.mask_id, generator)
        # annealing's (B, L, L) draw (None when off), from the same keys / generator as t and the masks
        visible = self.annealing.visible(
            *x0.shape, self.global_step, device=x0.device, generator=generator, keys=keys
        )
        # the rows as drawn: the forward pass computes their clean stream once for every noising
        row_x0, row_attention, row_answer, row_visible, copies = x0, attention_mask, answer_mask, visible, 1
        if self.loss_fn.complementary:  # each row again, with the complement of its mask at 1 - t
            batch, t, xt, hidden = complementary_pair(batch, t, hidden, self.mask_id)
            x0, attention_mask, answer_mask = (
                batch["input_ids"],
                batch["attention_mask"],
                batch["answer_mask"],
            )
            copies = 2  # the pair's two noisings share one clean row (DiffusionLM.noised_logits)
        ar_weight, ar_stats = self.loss_fn.ar_weight, {}
        if ar_weight > 0:  # one pass: the denoising logits and the clean copy's next-token ones
            scored = batch.get("score_mask", answer_mask).bool()  # (K B, L) answer + its first end token
            one = scored[: row_x0.shape[0]]  # the clean stream's rows, computed once
            logits, ar_logits = self.dlm.two_copy_logits(
                row_x0,
                xt,
                hidden,
                row_attention,
                row_answer,
                block_size=block_size,
                clean_targets=one,
                copies=copies,
            )  # (N, V) at hidden positions, (M, V) at the rows' scored ones
            # nats over the scored tokens of every row of the (doubled) batch: a pair's clean stream is one
            # computation, its next-token loss counted for both rows, as when each had its own copy
            ar_sum = copies * F.cross_entropy(ar_logits.float(), row_x0[one], reduction="sum")
            ar_stats = {"ar_sum": ar_sum.detach(), "n_scored": scored.sum()}
        else:
            logits = self.dlm.noised_logits(
                row_x0,
                xt,
                hidden,
                row_attention,
                row_answer,
                extra_mask=row_visible,
                block_size=block_size,
                copies=copies,
            )  # (N, V) only at hidden positions
        t_pos = t[:, None].expand_as(x0)[hidden]  # (N,) the t of each hidden token's row
        n_answer = answer_mask.sum()
        weighted_sum = self.loss_fn.weighted_sum(logits, x0[hidden], t_pos, self.schedule)
        if ar_weight > 0:
            weighted_sum = weighted_sum + ar_weight * ar_sum
        count = self.loss_fn.count(n_answer=n_answer, n_hidden=hidden.sum(), n_tokens=attention_mask.sum())
        recipe = {}
        if self.loss_fn.distill_weight > 0:  # the teacher: the inner model with its adapters off, no grad
            score_mask = batch.get("score_mask", answer_mask)
            kl_sum, n_distilled = distill_sum(
                self.dlm, x0, attention_mask, hidden, score_mask, logits, copies=copies
            )
            weighted_sum = weighted_sum + self.loss_fn.distill_weight * kl_sum
            recipe = {"distill_kl": kl_sum.detach(), "n_distilled": n_distilled}
        loss = weighted_sum / count.clamp_min(1)
        return loss, {
            "n_answer": n_answer,
            "n_hidden": hidden.sum(),
            "weighted_sum": weighted_sum,
            "count": count,
            **ar_stats,
            **recipe,
        }

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Backward runs on the unnormalised sum; ``on_before_optimizer_step`` divides by the global count."""
        trainer, seed, bs = self.trainer, self.seed, batch["input_ids"].shape[0]
        k, rank, world = trainer.accumulate_grad_batches, trainer.global_rank, trainer.world_size
        micro_bs = nominal_batch_size(trainer.train_dataloader, default=bs)
        keys = draw_keys(seed, self.global_step, batch_idx, bs, micro_bs, k, rank, world)
        # LoRA dropout stays on the global RNG: PEFT draws it over the whole (B, L, d) input of each
        # adapted layer, so per-row keys would take a generator per row and layer every step (and on
        # CUDA a row's numbers would still depend on the tensor's size). Reseeded from (seed, step,
        # rank, micro-batch): ranks differ, and a resumed step redraws the same masks.
        torch.manual_seed(key_seed(seed, self.global_step, rank, batch_idx % k, "dropout"))
        if batch_idx % k == 0:  # a new accumulation window (Lightning's): drop any unfinished one
            self.normaliser.reset()
        block_size = self.block_size_at(self.global_step)  # the curriculum's size in force, or None
        _, stats = self.objective.loss(self, batch, keys=keys, block_size=block_size)
        self.tokens_seen += trainer.strategy.reduce(batch["attention_mask"].sum(), reduce_op="sum")
        self.normaliser.add(stats["weighted_sum"], stats["count"])
        self.log("train/hidden_frac", stats["n_hidden"] / stats["n_answer"].clamp_min(1), batch_size=bs)
        if block_size is not None:
            self.log("train/block_size", float(block_size), batch_size=bs)
        if "ar_sum" in stats:  # the clean stream's AR CE per scored token (nats), this micro-batch
            self.log("train/ar_ce", stats["ar_sum"] / stats["n_scored"].clamp_min(1), batch_size=bs)
        if "distill_kl" in stats:  # nats per distilled position (loss.distill_weight)
            self.log(
                "train/distill_kl", stats["distill_kl"] / stats["n_distilled"].clamp_min(1), batch_size=bs
            )
        return stats["weighted_sum"]

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        trainer = self.trainer
        loss = self.normaliser.finish(
            (p for p in self.parameters() if p.requires_grad),
            trainer.accumulate_grad_batches,
            trainer.world_size,
            lambda x: trainer.strategy.reduce(x, reduce_op="sum"),
        )
        self.log("train/loss", loss, prog_bar=True)  # the step's loss over its whole global batch

    # -- validation ------------------------------------------------------------------------------
    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        seed = validation_seed(self.seed, batch_idx)
        gen = torch.Generator(device=batch["input_ids"].device).manual_seed(seed)
        loss, stats = self.objective.loss(self, batch, generator=gen)
        self.val_loss.update(loss, weight=stats["n_answer"])
        scores = validation_scores(
            batch,
            batch_idx,
            seed=self.seed,
            likelihood=dataclasses.asdict(self.val_likelihood),
            end_id=self.eos_id,
            ar_base=self.dlm,
            **{self.objective.role: self.dlm},
        )
        for row, metric in self.val_nll.items():
            count = scores[TOKENS_OF[row]]
            keep = count > 0
            metric.update(scores[row][keep] / count[keep], weight=count[keep])

    @override
    def on_validation_epoch_end(self) -> None:
        figures = {VAL_METRICS[row]: metric.compute() for row, metric in self.val_nll.items()}
        ar = figures["val/ar_nll"]
        extra = {"val/ar_ppl": torch.exp(ar)}
        if "val/nll_bound" in figures:
            nll = figures["val/nll_bound"]
            extra.update({"val/gap": nll - ar, "val/ppl_bound": torch.exp(nll)})
        self.log_dict({"val/loss": self.val_loss.compute(), **figures, **extra}, prog_bar=False)
        for m in (self.val_loss, *self.val_nll.values()):
            m.reset()
        # the sampler's answers on fixed prompts (EM, ROUGE-L, a table): diffllm.training.samples (callbacks.samples)

    def sample(self, prompt_ids: list[list[int]], seed: int = 0, **overrides: Any) -> list[str]:
        """Decode answers for token-id prompts with the configured sampler (overrides replace fields)."""
        config = self.sampler_config.with_overrides(overrides)
        out = generate(
            self.dlm,
            prompt_ids,
            config,
            eos_id=self.eos_id,
            pad_id=self.tokenizer.pad_token_id,
            seed=seed,
        )
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out.tokens]

    # -- optimisation ----------------------------------------------------------------------------
    @override
    def configure_optimizers(self) -> dict[str, Any]:
        opt_cfg = self.optim
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay, betas=tuple(opt_cfg.betas)
        )
        warmup = opt_cfg.warmup_steps
        total = max(int(self.trainer.estimated_stepping_batches), warmup + 1)
        lr_lambda = partial(
            lr_factor, warmup_steps=warmup, total_steps=total, min_lr_ratio=opt_cfg.min_lr_ratio
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoints: trainable weights + config only ---------------------------------------------
    def trainable_state_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["diffllm"] = {
            "mask_id": self.mask_id,
            "trainable": trainable_line(self.dlm.model),
            "tokens_seen": int(self.tokens_seen),
            # the validation length evaluate reproduces (a Trainer setting, not a module argument)
            "limit_val_batches": self.trainer.limit_val_batches
            if self._trainer is not None
            else self.limit_val_batches,
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = self.trainable_state_keys() - set(checkpoint["state_dict"])
        if missing:
            raise RuntimeError(
                f"checkpoint lacks {len(missing)} trainable tensor(s) of this config (e.g. {sorted(missing)[:3]}); "
                "it was written by a run with another lora/model config: load it with that config"
            )
        # The frozen base was rebuilt from model.pretrained: complete the state dict with it so the
        # load is exact and quiet (nothing is reported missing).
        for key, value in self.state_dict().items():
            checkpoint["state_dict"].setdefault(key, value)
        saved_model = checkpoint.get("hyper_parameters", {}).get("model") or {}
        saved_schedule = saved_model.get("block_schedule")
        if saved_schedule != self.hparams["model"].get("block_schedule"):  # the size in force is f(step)
            raise ConfigError(
                f"the checkpoint was trained with model.block_schedule={saved_schedule}, this run says "
                f"{self.hparams['model'].get('block_schedule')}; resume with the checkpoint's schedule"
            )
        extra = checkpoint.get("diffllm", {})
        self.tokens_seen.fill_(int(extra.get("tokens_seen", 0)))
        legacy = checkpoint.get("hyper_parameters", {}).get("cfg") or {}  # a checkpoint of the cfg= era
        self.limit_val_batches = extra.get(
            "limit_val_batches", (legacy.get("trainer") or {}).get("limit_val_batches")
        )
