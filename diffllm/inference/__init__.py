"""Inference: loading a trained run or an export, generating answers, exporting, notebook helpers."""
