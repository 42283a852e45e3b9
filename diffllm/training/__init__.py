"""Training: the LightningModule, objectives, callbacks, the trainer, distributed helpers, a run."""
