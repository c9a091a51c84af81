"""DDP over gloo on the CPU, two processes, matches one process on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import device_skip_reason

HERE = os.path.dirname(__file__)


def test_ddp_gloo_two_processes_match_single_process(backend_name, tmp_path):
    reason = device_skip_reason("cpu", torch.float64)
    if reason:
        pytest.skip(f"the gloo DDP test runs on CPU tensors: {reason}")
    import ddp_worker

    seed = int.from_bytes(os.urandom(2), "little")
    with socket.socket() as probe:  # a free loopback port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        init_method = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
           # Loopback only: gloo otherwise binds the address the host name resolves to.
           "GLOO_SOCKET_IFNAME": "lo"}
    ranks = [
        subprocess.Popen([sys.executable, os.path.join(HERE, "ddp_worker.py"), str(rank), "2",
                          init_method, str(tmp_path), str(seed), backend_name], env=env)
        for rank in range(2)
    ]
    try:
        codes = [process.wait(timeout=300) for process in ranks]
    finally:
        for process in ranks:  # never leave a rank behind, whatever happened
            process.kill()
    assert codes == [0, 0], f"DDP ranks exited with {codes}"
    distributed = torch.load(tmp_path / "ddp.pt")

    # One process, whole batch: MSE over the batch is the mean of the two shards' MSEs,
    # which is what DDP's gradient averaging computes.
    model = ddp_worker.build(seed, backend_name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = ddp_worker.global_batch(seed)
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()
    start = ddp_worker.build(seed, backend_name).state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-10, atol=1e-12, msg=name)
        assert not torch.equal(value, start[name]), f"{name} did not train"
