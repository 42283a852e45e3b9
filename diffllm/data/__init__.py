"""Data side: the prompt template, the Alpaca datamodule and the project's own tiny task set."""
