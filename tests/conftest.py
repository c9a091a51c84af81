"""The one conformance suite, run once per backend: ``FUSED3D_BACKEND`` names the backend.

Every test takes the ``backend_name`` (and usually a ``device``) fixture; a device the backend
cannot use on this machine is skipped with the backend's own reason.
"""

from __future__ import annotations

import os

import pytest
import torch

import fused3d
from fused3d.backend import CallSpec
from fused3d.info import environment
from fused3d.registry import ENV_VAR, backend_names

DEFAULT_BACKEND = "reference"
DEVICE_TYPES = ("cpu", "cuda")


def _backend_under_test() -> str:
    name = os.environ.get(ENV_VAR, "").strip().lower() or DEFAULT_BACKEND
    if name == "auto" or name not in backend_names():
        raise pytest.UsageError(
            f"{ENV_VAR}={name!r} is not a backend this suite can test; installed backends: "
            + ", ".join(backend_names())
        )
    return name


BACKEND_NAME = _backend_under_test()


def pytest_report_header(config):
    lines = [f"fused3d backend under test: {BACKEND_NAME}"]
    lines += [f"  {key}: {value}" for key, value in environment().items()]
    status = {row.name: row for row in fused3d.available_backends()}[BACKEND_NAME]
    lines.append(
        f"  {BACKEND_NAME} available: {status.available}"
        + ("" if status.available else f" ({'; '.join(status.reasons)})")
    )
    return lines


def device_skip_reason(device_type: str, dtype: torch.dtype = torch.float32) -> str | None:
    """Why the backend under test cannot run on ``device_type`` here (None when it can)."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device on this machine"
    backend = fused3d.get_backend(BACKEND_NAME)
    reasons = backend.unavailable_reasons() or backend.unsupported_reasons(
        CallSpec(device_type, dtype)
    )
    if reasons:
        return f"backend {BACKEND_NAME!r} cannot run on {device_type}: " + "; ".join(reasons)
    return None


@pytest.fixture(scope="session")
def backend_name() -> str:
    return BACKEND_NAME


@pytest.fixture(params=DEVICE_TYPES)
def device(request) -> str:
    reason = device_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture
def cuda_device() -> str:
    reason = device_skip_reason("cuda")
    if reason:
        pytest.skip(reason)
    return "cuda"


@pytest.fixture(autouse=True)
def _restore_tf32():
    saved = torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def generator() -> torch.Generator:
    """Fresh random inputs each run: the seed is drawn anew and printed on failure.

    FUSED3D_TEST_SEED=<seed> replays a printed seed (every test then uses it).
    """
    replay = os.environ.get("FUSED3D_TEST_SEED")
    seed = int(replay) if replay else int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)
