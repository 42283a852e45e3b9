"""Evaluation: the scoring core, metrics, quality, the comparison, the report, tables and plots."""
