"""Data-parallel training: DDP matches one process on the same global batch.

gloo on CPU with two processes (any machine where the backend runs on CPU), and NCCL with one
process per GPU (two GPUs or more).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import device_skip_reason

HERE = os.path.dirname(__file__)
#: NVLink multicast stays off on the lent multi-GPU machines (it can take the host's GPUs down).
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


def _free_loopback_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def _ddp_matches_single_process(backend_name: str, tmp_path, dist_backend: str,
                                device: str) -> None:
    import ddp_worker

    seed = int.from_bytes(os.urandom(2), "little")
    env = {**os.environ, **NO_MULTICAST,
           "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
           # Loopback only: gloo otherwise binds the address the host name resolves to.
           "GLOO_SOCKET_IFNAME": "lo"}
    init_method = _free_loopback_address()
    ranks = [
        subprocess.Popen([sys.executable, os.path.join(HERE, "ddp_worker.py"), str(rank), "2",
                          init_method, str(tmp_path), str(seed), backend_name, dist_backend],
                         env=env)
        for rank in range(2)
    ]
    try:
        codes = [process.wait(timeout=300) for process in ranks]
    finally:
        for process in ranks:  # never leave a rank behind, whatever happened
            process.kill()
    assert codes == [0, 0], f"DDP ranks exited with {codes}"
    distributed = torch.load(tmp_path / "ddp.pt")

    model = ddp_worker.build(seed, backend_name, device)
    ddp_worker.train(model, *ddp_worker.global_batch(seed, device))
    start = ddp_worker.build(seed, backend_name).state_dict()
    for name, value in model.state_dict().items():
        value = value.cpu()
        torch.testing.assert_close(distributed[name], value, rtol=1e-10, atol=1e-12, msg=name)
        assert not torch.equal(value, start[name]), f"{name} did not train"


def test_ddp_gloo_two_processes_match_single_process(backend_name, tmp_path):
    reason = device_skip_reason("cpu", torch.float64)
    if reason:
        pytest.skip(f"the gloo DDP test runs on CPU tensors: {reason}")
    _ddp_matches_single_process(backend_name, tmp_path, "gloo", "cpu")


def test_ddp_nccl_two_gpus_match_single_gpu(backend_name, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    reason = device_skip_reason("cuda", torch.float64)
    if reason:
        pytest.skip(reason)
    _ddp_matches_single_process(backend_name, tmp_path, "nccl", "cuda:0")
