"""``python -m fused3d info``: every backend, whether it runs here and why not, with versions."""

from __future__ import annotations

import importlib
import platform

import torch

from .registry import ENV_VAR, available_backends, requested_backend


def environment() -> dict[str, str]:
    """Versions and the device, as reported in info, test headers and benchmark rows."""
    facts = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda (torch)": str(torch.version.cuda),
    }
    for module in ("triton", "cupy"):
        try:
            facts[module] = importlib.import_module(module).__version__
        except Exception:
            facts[module] = "not installed"
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        facts["gpu"] = (
            f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)"
        )
        facts["gpu count"] = str(torch.cuda.device_count())
    else:
        facts["gpu"] = "none"
    facts["cudnn.allow_tf32"] = str(torch.backends.cudnn.allow_tf32)
    return facts


def report() -> str:
    """The text that ``python -m fused3d info`` prints."""
    lines = ["fused3d environment"]
    for key, value in environment().items():
        lines.append(f"  {key:<18} {value}")
    lines.append(f"  {ENV_VAR:<18} {requested_backend()}")
    lines.append("backends")
    for row in available_backends():
        state = "available" if row.available else "unavailable"
        lines.append(f"  {row.name:<10} {state:<12} {row.description}")
        for reason in row.reasons:
            lines.append(f"  {'':<10} - {reason}")
        if row.versions:
            versions = ", ".join(f"{k} {v}" for k, v in row.versions.items())
            lines.append(f"  {'':<10}   {versions}")
    return "\n".join(lines)
