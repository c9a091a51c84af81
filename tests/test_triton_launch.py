"""The triton backend's eager launches (fused3d_triton._fast_launch): after a shape's first
call, kernels go through the compiled kernels' own launcher, and give exactly what Triton's
ordinary launch path gives."""

from __future__ import annotations

import pytest
import torch

from checks import Case, make_inputs, random_like_output, run_backend


def test_eager_launches_take_the_short_path(backend_name, cuda_device, generator, monkeypatch):
    if backend_name != "triton":
        pytest.skip("the short launch path belongs to the triton backend: checked in its session")
    from fused3d_triton import _fast_launch

    if not _fast_launch.active():
        pytest.fail("eager launches take Triton's ordinary path: FUSED3D_TRITON_FAST_LAUNCH=0, "
                    "or this Triton lacks the internals _fast_launch uses")
    case = Case(spatial=(4, 6, 8), batch=3, in_channels=4, out_channels=8)  # the parity path
    inputs = make_inputs(case, torch.float32, cuda_device, generator)
    y, _, _ = run_backend(backend_name, inputs)
    grad_y = random_like_output(y, generator)
    first = run_backend(backend_name, inputs, grad_y)  # compiles what the first call missed
    compiled = _fast_launch.cached_kernels()
    assert compiled >= 4, "forward, dz, dweight and dx should each be held compiled"
    short = run_backend(backend_name, inputs, grad_y)
    assert _fast_launch.cached_kernels() == compiled, "a repeated call compiled again"
    monkeypatch.setattr(_fast_launch, "_usable", False)
    ordinary = run_backend(backend_name, inputs, grad_y)
    for name, results in (("short path", short), ("ordinary path", ordinary)):
        assert torch.equal(results[0], first[0]) and torch.equal(results[1], first[1]), name
        for got, want in zip(results[2], first[2], strict=True):
            assert torch.equal(got, want), f"{name}: gradients differ from the first call's"
