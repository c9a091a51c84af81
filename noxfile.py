"""Sessions: test-<backend> (core, cuda, triton, cupy), test (all of them), lint, bench, plots.

Each test session installs core, one backend and the test tools into its own virtualenv, sets
FUSED3D_BACKEND and runs the one shared suite in tests/. With ``nox --no-venv`` nothing is
installed: the sessions run in the current Python (a GPU machine that already has torch,
triton and cupy).

Torch comes from ``FUSED3D_TORCH`` (default ``torch==2.13.0``); set it to e.g.
``torch --index-url ...`` for another build.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys

import nox

nox.options.sessions = ["lint", "test"]
nox.options.reuse_venv = "yes"
nox.options.error_on_external_run = True

TORCH = shlex.split(os.environ.get("FUSED3D_TORCH", "torch==2.13.0"))
HAS_GPU = shutil.which("nvidia-smi") is not None

#: session suffix -> (backend name, package folder or None, pip extras)
BACKENDS = {
    "core": ("reference", None, ""),
    "cuda": ("cuda", "packages/backend_cuda", ""),
    "triton": ("triton", "packages/backend_triton", ""),
    "cupy": ("cupy", "packages/backend_cupy", "[cuda13]" if HAS_GPU else ""),
}


def _in_venv(session: nox.Session) -> bool:
    return session.venv_backend != "none"


def _python(session: nox.Session) -> str:
    """The session's interpreter: the virtualenv's, or with ``--no-venv`` the one running nox
    (a GPU image may have only ``python3`` on PATH)."""
    return "python" if _in_venv(session) else sys.executable


def _install(session: nox.Session, *args: str) -> None:
    """pip install, unless the session runs without a virtualenv (``--no-venv``)."""
    if _in_venv(session):
        session.install(*args)
    else:
        session.log(f"--no-venv: not installing {' '.join(args)}")


def _install_packages(session: nox.Session, *folders_with_extras: str) -> None:
    _install(session, *TORCH)
    _install(session, "-e", "packages/core[test,plots]")
    for folder in folders_with_extras:
        _install(session, "-e", folder)


def _run_suite(session: nox.Session, backend: str) -> None:
    env = {"FUSED3D_BACKEND": backend}
    if backend == "triton" and not HAS_GPU:
        env["TRITON_INTERPRET"] = "1"  # run the real kernels on CPU tensors
    code = session.run(_python(session), "-m", "pytest", "tests", "-q", *session.posargs, env=env,
                       success_codes=[0, 5])
    if code == 5:  # pytest's "no tests collected": a run that proves nothing is a failure
        session.error(f"pytest collected no tests for backend {backend!r}")


def _make_test_session(suffix: str, backend: str, folder: str | None, extras: str):
    @nox.session(name=f"test-{suffix}")
    def test_backend(session: nox.Session) -> None:
        _install_packages(session, *([folder + extras] if folder else []))
        _run_suite(session, backend)

    test_backend.__doc__ = f"Run the shared suite against the {backend!r} backend."
    return test_backend


for _suffix, (_backend, _folder, _extras) in BACKENDS.items():
    globals()[f"test_{_suffix}"] = _make_test_session(_suffix, _backend, _folder, _extras)


@nox.session
def test(session: nox.Session) -> None:
    """Run the suite for every backend this machine can run (GPU tests skip without a GPU)."""
    for suffix in BACKENDS:
        session.notify(f"test-{suffix}", posargs=session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole repository."""
    _install(session, "ruff>=0.6")
    session.run("ruff", "check", ".")


def _bench_install(session: nox.Session) -> None:
    extras = [f + e for _, f, e in BACKENDS.values() if f]
    _install_packages(session, *extras)
    _install(session, "-e", "packages/core[plots]")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmark every available backend against eager and torch.compile (args pass through)."""
    _bench_install(session)
    env = {} if HAS_GPU else {"TRITON_INTERPRET": "1"}
    session.run(_python(session), "-m", "fused3d.bench", *session.posargs, env=env)


@nox.session
def plots(session: nox.Session) -> None:
    """Draw the figures in plots/ from the measured data (no GPU needed)."""
    _install(session, "-e", "packages/core[plots]")
    session.run(_python(session), "-m", "fused3d.bench.plots", *session.posargs)
