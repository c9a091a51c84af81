"""The backend's kernel sources: CUDA C++ compiles with nvcc for sm_90 without register
spills or serialised warpgroup MMAs; generated Triton kernels match their generator.

Runs wherever nvcc exists (CI has it, no GPU needed); the report shows registers per kernel.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import fused3d

# What a Hopper (cc 9.0) build of the extension uses: the sm_90a target, wgmma kernels on.
NVCC_FLAGS = ["-c", "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-DFUSED3D_WGMMA",
              "-Xptxas", "-v"]


def _sources(backend_name):
    return fused3d.get_backend(backend_name).kernel_sources()


def test_kernel_sources_compile_for_sm90_without_spills(backend_name, tmp_path):
    """Also fails where ptxas serialises wgmma instructions (its C7520 note), which it does,
    for example, to MMAs behind a branch it cannot prove warp-uniform: correct, but slower."""
    sources = _sources(backend_name)
    if not sources:
        pytest.skip(f"backend {backend_name!r} ships no CUDA C++ sources")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: install the CUDA toolkit to run the compile check")
    for source in sources:
        result = subprocess.run([nvcc, *NVCC_FLAGS, str(source), "-o",
                                 str(tmp_path / (source.stem + ".o"))],
                                capture_output=True, text=True)
        report = result.stdout + result.stderr
        print(f"--- {source.name}\n{report}")
        assert result.returncode == 0, f"nvcc failed on {source}:\n{report}"
        functions = re.findall(r"Compiling entry function '([^']+)'", report)
        assert functions, f"{source.name}: no kernel was instantiated, nothing to check"
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
        assert not any(spills), f"{source.name} spills registers:\n{report}"
        serialised = re.findall(r"[^\n]*wgmma\.mma_async instructions are serialized[^\n]*", report)
        assert not serialised, f"{source.name}: ptxas serialised warpgroup MMAs:\n" + "\n".join(
            serialised)


def test_cuda_sources_compile_for_gpus_before_hopper(backend_name, tmp_path):
    """The cuda backend compiles every kernel file for the GPU it runs on: the files holding the
    Hopper kernels (wgmma, bulk tensor copies) must still compile for an A100 (sm_80), where
    those kernels are never launched. (Their TMA and mbarrier instructions once made such a
    build fail.)"""
    if backend_name != "cuda":
        pytest.skip("only the cuda backend builds every kernel file for the device's own target")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: install the CUDA toolkit to run the compile check")
    hopper_files = [source for source in _sources(backend_name) if "wgmma" in source.name]
    assert hopper_files, "no wgmma kernel files found: the check would prove nothing"
    for source in hopper_files:
        result = subprocess.run([nvcc, "-c", "-std=c++17", "-O3",
                                 "-gencode=arch=compute_80,code=sm_80", str(source), "-o",
                                 str(tmp_path / (source.stem + ".o"))],
                                capture_output=True, text=True)
        assert result.returncode == 0, f"nvcc (sm_80) failed on {source}:\n{result.stderr}"


def test_generated_triton_kernels_match_their_generator(backend_name):
    """parity_kernels.py is written by tools/generate_parity_kernels.py: an edit to one side
    only (by hand, or a generator change not rerun) would ship kernels nobody generated."""
    if backend_name != "triton":
        pytest.skip("the generated kernels belong to the triton backend: checked in its session")
    import importlib.util
    from pathlib import Path

    tool = (Path(__file__).resolve().parents[1] / "packages" / "backend_triton" / "tools"
            / "generate_parity_kernels.py")
    spec = importlib.util.spec_from_file_location("generate_parity_kernels", tool)
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert generator.TARGET.read_text() == generator.render(), (
        f"{generator.TARGET} differs from what {tool.name} writes: edit the generator and run "
        f"`python {tool.relative_to(Path(__file__).resolve().parents[1])}`"
    )
