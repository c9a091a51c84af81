"""Choosing backends, reporting them, and the KernelBench entry points."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import fused3d
from fused3d import kernelbench
from fused3d.backend import Backend, CallSpec
from fused3d.registry import ENV_VAR, requested_backend, select_backend


def test_backend_object_fills_the_protocol(backend_name):
    backend = fused3d.get_backend(backend_name)
    assert isinstance(backend, Backend)
    assert backend.name == backend_name
    assert backend.namespace == f"fused3d_{backend_name}"
    assert isinstance(backend.unavailable_reasons(), list)


def test_available_backends_reports_every_backend_with_reasons(backend_name):
    rows = {row.name: row for row in fused3d.available_backends()}
    assert "reference" in rows and rows["reference"].available
    assert backend_name in rows
    for row in rows.values():
        assert row.available == (not row.reasons), row


def test_info_cli_lists_backends_and_versions(backend_name):
    result = subprocess.run([sys.executable, "-m", "fused3d", "info"], capture_output=True,
                            text=True, check=True)
    assert "reference" in result.stdout and backend_name in result.stdout
    assert f"torch              {torch.__version__}" in result.stdout


def test_selection_order_argument_context_environment(backend_name, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert requested_backend() == "reference"
    with fused3d.use_backend(backend_name):
        assert requested_backend() == backend_name
        assert requested_backend("reference") == "reference"
    monkeypatch.delenv(ENV_VAR)
    assert requested_backend() == "auto"


def test_auto_is_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert select_backend(None, CallSpec("cpu", torch.float32)).name == "reference"


def test_auto_on_cuda_picks_a_usable_backend(cuda_device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chosen = select_backend("auto", CallSpec("cuda", torch.float32))
    assert not chosen.unavailable_reasons()


def test_kernelbench_entry_points(backend_name, device):
    init = kernelbench.get_init_inputs()
    (x,) = kernelbench.get_inputs()
    assert tuple(x.shape) == (16, 16, 16, 32, 32) and init[:6] == [16, 32, 3, 2, 1, 1]
    torch.manual_seed(0)
    model = kernelbench.Model(*init).to(device)
    candidate = kernelbench.ModelNew(*init).to(device)
    candidate.backend = backend_name
    candidate.load_state_dict(model.state_dict())
    small = x[:1, :, :4, :8, :8].to(device)  # the full problem is a GPU-sized job
    torch.backends.cudnn.allow_tf32 = False
    torch.testing.assert_close(candidate(small), model(small), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["", "  "])
def test_blank_environment_means_auto(monkeypatch, name):
    monkeypatch.setenv(ENV_VAR, name)
    assert requested_backend() == "auto"
