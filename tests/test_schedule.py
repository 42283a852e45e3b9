"""Noise schedules, time samplers and their Hydra nodes."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from diffllm.config.resolvers import compose
from diffllm.diffusion.schedule import (
    CosineSchedule,
    LinearSchedule,
    LogLinearSchedule,
    PolynomialSchedule,
)
from diffllm.diffusion.time import AntitheticTimeSampler, UniformTimeSampler

SCHEDULES = {
    "linear": LinearSchedule(),
    "cosine": CosineSchedule(),
    "loglinear": LogLinearSchedule(eps=1e-3),
    "polynomial_2": PolynomialSchedule(exponent=2.0),
    "polynomial_half": PolynomialSchedule(exponent=0.5),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_endpoints_and_monotone(name):
    schedule = SCHEDULES[name]
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    alpha = schedule.alpha(t)
    assert alpha[0].item() == 1.0
    assert alpha[-1].item() == pytest.approx(0.0, abs=1.01e-3)  # log-linear stops at eps = 1e-3
    assert (alpha[1:] <= alpha[:-1]).all(), "alpha must be non-increasing"
    assert torch.allclose(schedule.mask_prob(t), 1 - alpha)
    assert (schedule.alpha_prime(t[1:-1]) <= 0).all()


@pytest.mark.parametrize("name", SCHEDULES)
def test_weight_matches_finite_difference(name):
    schedule = SCHEDULES[name]
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    h = 1e-6
    alpha_prime_fd = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    assert torch.allclose(schedule.alpha_prime(t), alpha_prime_fd, rtol=1e-6, atol=1e-8)
    expected = -alpha_prime_fd / (1 - schedule.alpha(t))
    assert torch.allclose(schedule.weight(t), expected, rtol=1e-6)


def test_weight_closed_forms():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(LinearSchedule().weight(t), 1 / t)
    assert torch.allclose(LogLinearSchedule(eps=1e-3).weight(t), 1 / t)
    assert torch.allclose(PolynomialSchedule(exponent=3.0).weight(t), 3 / t)
    assert torch.allclose(CosineSchedule().weight(t), (math.pi / 2) / torch.tan(math.pi * t / 4))
    # cosine near 0 behaves like 2/t without cancellation, also in float32
    assert CosineSchedule().weight(torch.tensor([1e-4])).item() == pytest.approx(2e4, rel=1e-3)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="exponent"):
        PolynomialSchedule(exponent=0.0)
    with pytest.raises(ValueError, match="eps"):
        LogLinearSchedule(eps=1.0)
    with pytest.raises(ValueError, match="eps"):
        AntitheticTimeSampler(eps=-0.1)


@pytest.mark.parametrize("batch_size", [1, 2, 7, 64])
def test_antithetic_one_time_per_stratum(batch_size):
    eps = 1e-3
    sampler = AntitheticTimeSampler(eps=eps)
    gen = torch.Generator().manual_seed(batch_size)
    for _ in range(20):
        t = sampler(batch_size, device="cpu", generator=gen)
        assert t.shape == (batch_size,)
        assert (t >= eps).all() and (t <= 1).all()
        stratum = ((t - eps) / (1 - eps) * batch_size).floor().long().clamp_max(batch_size - 1)
        assert sorted(stratum.tolist()) == list(range(batch_size))


def test_antithetic_order_is_random_and_reproducible():
    sampler = AntitheticTimeSampler(eps=0.0)
    a = sampler(16, generator=torch.Generator().manual_seed(0))
    b = sampler(16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    orders = {
        tuple(sampler(16, generator=torch.Generator().manual_seed(s)).argsort().tolist()) for s in range(5)
    }
    assert len(orders) == 5  # not the sorted order every time


def test_uniform_sampler_range():
    t = UniformTimeSampler(eps=0.25)(1000, generator=torch.Generator().manual_seed(0))
    assert (t >= 0.25).all() and (t <= 1).all()
    assert t.mean().item() == pytest.approx(0.625, abs=0.03)


@pytest.mark.parametrize(
    ("path", "cls", "attrs"),
    [
        ("schedule/linear.yaml", LinearSchedule, {}),
        ("schedule/cosine.yaml", CosineSchedule, {}),
        ("schedule/loglinear.yaml", LogLinearSchedule, {"eps": 1e-3}),
        ("schedule/polynomial.yaml", PolynomialSchedule, {"exponent": 2.0}),
        ("time_sampler/uniform.yaml", UniformTimeSampler, {"eps": 1e-3}),
        ("time_sampler/antithetic.yaml", AntitheticTimeSampler, {"eps": 1e-3}),
    ],
)
def test_config_nodes_instantiate(path, cls, attrs):
    group, option = path.removesuffix(".yaml").split("/")
    obj = instantiate(compose([f"{group}={option}", "output_dir=/x"])[group])  # the node + the option
    assert type(obj) is cls
    for key, value in attrs.items():
        assert getattr(obj, key) == value
