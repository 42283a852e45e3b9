"""Downstream evaluation: the lm-evaluation-harness adapter and the project's own harness tasks."""
