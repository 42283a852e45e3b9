"""Benchmarks: ``python -m diffllm.bench.sampler`` (speed / quality of the samplers vs AR).

Benchmarks are not tests; only their pure table-building code is unit-tested.
"""
