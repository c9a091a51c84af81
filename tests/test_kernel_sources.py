"""The backend's torch-free CUDA sources compile with nvcc for sm_90, with no register spills.

Runs wherever nvcc exists (CI has it, no GPU needed); the report shows registers per kernel.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import fused3d

NVCC_FLAGS = ["-c", "-std=c++17", "-O3", "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v"]


def _sources(backend_name):
    return fused3d.get_backend(backend_name).kernel_sources()


def test_kernel_sources_compile_for_sm90_without_spills(backend_name, tmp_path):
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
