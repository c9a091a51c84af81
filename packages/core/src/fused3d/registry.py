"""Finding and choosing backends.

Backends are discovered through the entry-point group ``fused3d.backends``; core never
imports one by name. The backend for a call is, in order: the ``backend=`` argument, the
innermost :func:`use_backend` context, the ``FUSED3D_BACKEND`` environment variable, and
finally ``auto`` (the fastest usable backend for the inputs' device).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata

import torch

from .backend import Backend, BackendError, CallSpec, UnknownBackendError

ENTRY_POINT_GROUP = "fused3d.backends"
ENV_VAR = "FUSED3D_BACKEND"
AUTO = "auto"

_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fused3d_backend", default=None
)
_lock = threading.RLock()
_entry_points: dict[str, metadata.EntryPoint] | None = None
_loaded: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}
_fallback_warnings_given: set[tuple] = set()


@dataclass(frozen=True)
class BackendStatus:
    """One row of :func:`available_backends`."""

    name: str
    available: bool
    reasons: tuple[str, ...]
    description: str
    versions: dict[str, str]


def _registered() -> dict[str, metadata.EntryPoint]:
    global _entry_points
    with _lock:
        if _entry_points is None:
            _entry_points = {
                entry.name: entry for entry in metadata.entry_points(group=ENTRY_POINT_GROUP)
            }
        return _entry_points


def backend_names() -> list[str]:
    """Every registered backend name, importable or not (nothing is imported)."""
    return sorted(_registered())


def _load(name: str) -> Backend | None:
    """Import one backend (only when it is asked for); None if its import failed."""
    with _lock:
        if name not in _loaded and name not in _load_errors:
            entry = _registered()[name]
            try:
                _loaded[name] = entry.load()
            except Exception as error:  # a broken install must not hide the others
                _load_errors[name] = f"import of {entry.value} failed: {error!r}"
        return _loaded.get(name)


def get_backend(name: str) -> Backend:
    """The backend object registered as ``name``; raises listing the known names."""
    if name not in _registered():
        raise UnknownBackendError(
            f"unknown fused3d backend {name!r}; known backends: "
            + ", ".join([AUTO, *backend_names()])
        )
    backend = _load(name)
    if backend is None:
        raise BackendError(
            f"backend {name!r} is installed but cannot be imported: {_load_errors[name]}"
        )
    return backend


def _unavailable(backend: Backend) -> list[str]:
    try:
        return list(backend.unavailable_reasons())
    except Exception as error:
        return [f"availability check failed: {error!r}"]


def available_backends() -> list[BackendStatus]:
    """Every registered backend, whether it can run here, and if not, why."""
    rows = []
    for name in backend_names():
        backend = _load(name)
        if backend is None:
            rows.append(BackendStatus(name, False, (_load_errors[name],), "", {}))
            continue
        reasons = _unavailable(backend)
        try:
            versions = dict(backend.versions())
        except Exception as error:
            versions = {"error": repr(error)}
        rows.append(
            BackendStatus(name, not reasons, tuple(reasons), backend.description, versions)
        )
    return rows


def requested_backend(explicit: str | None = None) -> str:
    """The backend name in force: argument, then context, then environment, then ``auto``."""
    for candidate in (explicit, _context_backend.get(), os.environ.get(ENV_VAR)):
        if candidate and candidate.strip():
            return candidate.strip().lower()
    return AUTO


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed calls on backend ``name`` (``"auto"`` allowed).

    The name is checked on entry. Under ``torch.compile`` the choice is fixed when a graph is
    traced.
    """
    name = name.strip().lower()
    if name != AUTO:
        get_backend(name)
    token = _context_backend.set(name)
    try:
        yield
    finally:
        _context_backend.reset(token)


def _reasons_for(backend: Backend, spec: CallSpec) -> list[str]:
    return _unavailable(backend) or list(backend.unsupported_reasons(spec))


def select_backend(explicit: str | None, spec: CallSpec) -> Backend:
    """Pick and load the backend for a call, raising with reasons when it cannot run."""
    name = requested_backend(explicit)
    if name != AUTO:
        backend = get_backend(name)
        reasons = _reasons_for(backend, spec)
        if reasons:
            raise BackendError(
                f"backend {name!r} cannot run this call ({spec.device_type}, {spec.dtype}): "
                + "; ".join(reasons)
            )
        backend.load()
        return backend

    # auto: the reference backend on CPU, else the highest-priority backend that can run.
    names = ["reference"] if spec.device_type == "cpu" else backend_names()
    skipped = [f"{name}: {_load_errors[name]}" for name in names if _load(name) is None]
    candidates = sorted(
        (_loaded[name] for name in names if name in _loaded),
        key=lambda b: b.auto_priority,
        reverse=True,
    )
    for backend in candidates:
        reasons = _reasons_for(backend, spec)
        if reasons:
            skipped.append(f"{backend.name}: {'; '.join(reasons)}")
            continue
        try:
            backend.load()
        except Exception as error:
            skipped.append(f"{backend.name}: failed to load: {error}")
            continue
        if skipped and spec.device_type != "cpu":
            key = (spec.device_type, backend.name, tuple(skipped))
            if key not in _fallback_warnings_given:
                _fallback_warnings_given.add(key)
                warnings.warn(
                    f"fused3d auto backend chose {backend.name!r} for {spec.device_type}; "
                    "skipped: " + " | ".join(skipped),
                    stacklevel=3,
                )
        return backend
    raise BackendError(
        f"no fused3d backend can run this call ({spec.device_type}, {spec.dtype}): "
        + (" | ".join(skipped) or "no backends are installed")
    )


_namespace_cache: dict[tuple[str, str, torch.dtype], str] = {}


@torch.compiler.assume_constant_result
def resolve_namespace(explicit: str | None, device_type: str, dtype: torch.dtype) -> str:
    """The ``torch.ops`` namespace serving a call. A constant while ``torch.compile`` traces.

    Takes plain values (not tensors, no shapes) so that Dynamo can run it once at trace time.
    The choice is cached per (requested name, device type, dtype): availability does not
    change within a process, and eager calls should not pay for the checks again.
    """
    key = (requested_backend(explicit), device_type, dtype)
    namespace = _namespace_cache.get(key)
    if namespace is None:
        namespace = select_backend(key[0], CallSpec(device_type, dtype)).namespace
        _namespace_cache[key] = namespace
    return namespace
