"""Every bad input of DESIGN section 3 raises a clear error naming the argument."""

from __future__ import annotations

import pytest
import torch

import fused3d
from fused3d import BackendError, UnknownBackendError

from conftest import DEVICE_TYPES, device_skip_reason


def _device_for_checks() -> str:
    """Validation runs before any kernel, but a usable device keeps the path realistic."""
    for device in DEVICE_TYPES:
        if device_skip_reason(device) is None:
            return device
    return "cpu"


def _good(device=None, dtype=torch.float32):
    device = device or _device_for_checks()
    x = torch.rand(2, 3, 3, 4, 5, device=device, dtype=dtype)
    weight = torch.randn(3, 5, 3, 3, 3, device=device, dtype=dtype)
    bias = torch.randn(5, device=device, dtype=dtype)
    multiplier = torch.randn(5, 1, 1, 1, device=device, dtype=dtype)
    return {"x": x, "weight": weight, "bias": bias, "multiplier": multiplier, "stride": 2,
            "padding": 1, "output_padding": 1}


def _call(backend_name, **overrides):
    args = {**_good(), **overrides}
    return fused3d.fused_block(**args, backend=backend_name)


BAD = [
    ("x-4d", lambda g: {"x": g["x"][0]}, ValueError, r"x must be a 5-D tensor"),
    ("weight-4d", lambda g: {"weight": g["weight"][0]}, ValueError, r"weight must be a 5-D"),
    ("channel-mismatch", lambda g: {"x": torch.rand(2, 4, 3, 4, 5, device=g["x"].device)},
     ValueError, r"x has 4 channels but weight expects C_in=3"),
    ("bias-shape", lambda g: {"bias": g["bias"][:4]}, ValueError, r"bias must have shape \(5,\)"),
    ("multiplier-shape", lambda g: {"multiplier": g["multiplier"][:2]}, ValueError,
     r"multiplier must broadcast to \(C_out, 1, 1, 1\)"),
    ("multiplier-flat", lambda g: {"multiplier": g["multiplier"].reshape(5)}, ValueError,
     r"multiplier must broadcast"),
    ("mixed-dtype", lambda g: {"weight": g["weight"].double()}, TypeError,
     r"weight has dtype torch.float64 but x has torch.float32"),
    ("int-dtype", lambda g: {k: g[k].to(torch.int32) for k in ("x", "weight", "bias",
                                                                  "multiplier")},
     TypeError, r"x has dtype torch.int32; supported dtypes"),
    ("mixed-device", lambda g: {"multiplier": g["multiplier"].to("meta")}, ValueError,
     r"multiplier is on meta but x is on"),
    ("output-padding", lambda g: {"output_padding": 2}, ValueError,
     r"output_padding must satisfy 0 <= output_padding < stride"),
    ("stride-zero", lambda g: {"stride": 0}, ValueError, r"stride must be >= 1"),
    ("padding-negative", lambda g: {"padding": -1}, ValueError, r"padding must be >= 0"),
    ("padding-too-large", lambda g: {"padding": 9}, ValueError,
     r"ConvTranspose3d output would be empty"),
    ("pool-empty", lambda g: {"x": g["x"][:, :, :1], "weight": g["weight"][:, :, :1],
                              "stride": 1, "padding": 0, "output_padding": 0}, ValueError,
     r"MaxPool3d\(2\) needs at least 2"),
    ("stride-tuple-length", lambda g: {"stride": (2, 2)}, TypeError,
     r"stride must be an int or a sequence of 3 ints"),
    ("stride-float", lambda g: {"stride": 2.0}, TypeError, r"stride must be an int"),
    ("x-not-tensor", lambda g: {"x": [[1.0]]}, TypeError, r"x must be a torch.Tensor"),
]


@pytest.mark.parametrize("make, error, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_message(backend_name, make, error, message):
    with pytest.raises(error, match=message):
        _call(backend_name, **make(_good()))


def test_negative_slope_must_be_finite_float(backend_name):
    with pytest.raises(ValueError, match=r"negative_slope must be finite"):
        fused3d.fused_block(*list(_good().values())[:4], 2, 1, 1, float("nan"),
                            backend=backend_name)
    with pytest.raises(TypeError, match=r"negative_slope must be a float"):
        fused3d.fused_block(*list(_good().values())[:4], 2, 1, 1, "0.2", backend=backend_name)


def test_unknown_backend_lists_known_names(backend_name):
    pattern = rf"unknown fused3d backend 'nope'.*{backend_name}"
    with pytest.raises(UnknownBackendError, match=pattern):
        _call("nope")
    with pytest.raises(UnknownBackendError, match=r"known backends: auto, .*reference"):
        with fused3d.use_backend("nope"):
            pass


def test_unusable_device_raises_with_reasons(backend_name):
    """A tensor on a device the backend cannot use: an error with the backend's reasons."""
    unusable = [d for d in DEVICE_TYPES if device_skip_reason(d) is not None
                and (d != "cuda" or torch.cuda.is_available())]
    args = {**_good(device="cpu" if "cpu" in unusable else "meta")}
    if "cpu" not in unusable:
        args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(BackendError, match=rf"backend '{backend_name}' cannot run this call"):
        fused3d.fused_block(**args, backend=backend_name)


def _valid_call(backend_name, **args) -> None:
    """A call that passes validation: it runs, or, where the backend cannot run on this
    machine, backend selection (which comes after validation) refuses it."""
    if device_skip_reason(args["x"].device.type) is None:
        fused3d.fused_block(**args, backend=backend_name)
    else:
        with pytest.raises(BackendError, match=rf"backend '{backend_name}' cannot run"):
            fused3d.fused_block(**args, backend=backend_name)


def test_bad_input_after_the_same_good_call(backend_name):
    """Repeated calls skip re-validation (a per-signature cache), but only an identical call
    does: a bool that equals a cached int, or another shape, is still checked."""
    good = {**_good(), "stride": 1, "padding": 0, "output_padding": 0}
    for _ in range(2):
        _valid_call(backend_name, **good)
    with pytest.raises(TypeError, match=r"stride must be an int or a sequence of 3 ints, got bool"):
        fused3d.fused_block(**{**good, "stride": True}, backend=backend_name)
    _valid_call(backend_name, **{**good, "padding": (0, 0, 0)})
    with pytest.raises(TypeError, match=r"padding must be an int or a sequence of 3 ints"):
        fused3d.fused_block(**{**good, "padding": (False, 0, 0)}, backend=backend_name)
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        fused3d.fused_block(**{**good, "bias": good["bias"][:4]}, backend=backend_name)
