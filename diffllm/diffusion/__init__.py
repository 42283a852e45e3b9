"""Masked-diffusion math: schedules, the forward process, the loss, likelihoods, the sampler.

Pure tensor code: no Lightning, no Hydra. Every module's docstring states its formula.
"""
