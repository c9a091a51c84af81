"""Inputs on a GPU other than the current one: same results, nothing left on the current one."""

from __future__ import annotations

import pytest
import torch

from checks import Case, make_inputs, random_like_output, run_backend
from conftest import device_skip_reason


@pytest.fixture
def two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    reason = device_skip_reason("cuda")
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_second_device_matches_first_and_leaves_it_alone(backend_name, two_gpus, generator,
                                                         dtype):
    torch.cuda.set_device(0)
    inputs = make_inputs(Case(spatial=(4, 4, 4), in_channels=8, out_channels=6), dtype, "cuda:0",
                         generator)
    grad_y = random_like_output(torch.empty(2, 6, 4, 4, 4, dtype=dtype, device="cuda:0"),
                                generator)
    on_first = run_backend(backend_name, inputs, grad_y)
    torch.cuda.synchronize(0)
    before = torch.cuda.memory_allocated(0)

    for name in ("x", "weight", "bias", "multiplier"):
        setattr(inputs, name, getattr(inputs, name).to("cuda:1"))
    on_second = run_backend(backend_name, inputs, grad_y.to("cuda:1"))
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    assert torch.cuda.memory_allocated(0) == before, "the call allocated on cuda:0"
    assert torch.equal(on_second[1].cpu(), on_first[1].cpu()), "window index differs"
    # Same kernels, but an autotuner may pick another tile on the other device: the sums may
    # be ordered differently, so values agree to rounding, not bit for bit.
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for got, want in zip((on_second[0], *on_second[2]), (on_first[0], *on_first[2]),
                         strict=True):
        assert got.device == torch.device("cuda:1")
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=rtol, atol=rtol)
