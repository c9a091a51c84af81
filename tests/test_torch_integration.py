"""The block inside PyTorch: gradcheck, opcheck, torch.compile, CUDA graphs, streams, modules."""

from __future__ import annotations

import pytest
import torch

import fused3d

from checks import Case, make_inputs, random_like_output, run_backend


def _namespace(backend_name):
    """The backend's torch.ops namespace, its ops defined (as the first call would)."""
    backend = fused3d.get_backend(backend_name)
    backend.load()
    return getattr(torch.ops, backend.namespace)


@pytest.mark.parametrize("case", [Case(spatial=(2, 2, 3), in_channels=2, out_channels=3),
                                  Case(kernel_size=(2, 3, 1), stride=(1, 2, 2), padding=(0, 1, 0),
                                       output_padding=(0, 1, 1), spatial=(2, 2, 2),
                                       in_channels=2, out_channels=2, multiplier_shape="scalar")],
                         ids=["parity-path", "general-path"])
def test_gradcheck_float64(backend_name, device, generator, case):
    inputs = make_inputs(case, torch.float64, device, generator)
    leaves = tuple(t.detach().clone().requires_grad_() for t in inputs.tensors())

    def block(x, weight, bias, multiplier):
        return fused3d.fused_block(x, weight, bias, multiplier, *case.op_args(),
                                   backend=backend_name)

    # Windows whose top two values are closer than gradcheck's step would switch winners
    # mid-difference; random float64 inputs make that vanishingly rare at this size.
    assert torch.autograd.gradcheck(block, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def _op_args(inputs: object, allow_tf32: bool = True):
    case = inputs.case
    stride, padding, output_padding = (list(v) for v in case.op_args())
    return (*inputs.tensors(), stride, padding, output_padding, case.negative_slope, allow_tf32)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_opcheck_forward(backend_name, device, generator, bias):
    inputs = make_inputs(Case(bias=bias), torch.float64, device, generator)
    torch.library.opcheck(_namespace(backend_name).forward.default, _op_args(inputs))
    grad_inputs = make_inputs(Case(bias=bias), torch.float64, device, generator)
    args = list(_op_args(grad_inputs))
    for i in range(4):
        if args[i] is not None:
            args[i] = args[i].requires_grad_()
    torch.library.opcheck(_namespace(backend_name).forward.default, tuple(args))


def test_opcheck_backward(backend_name, device, generator):
    inputs = make_inputs(Case(), torch.float64, device, generator)
    ops = _namespace(backend_name)
    y, window_index = ops.forward(*_op_args(inputs))
    grad_y = random_like_output(y, generator)
    stride, padding, output_padding = (list(v) for v in inputs.case.op_args())
    for mask in ([True, True, True, True], [False, True, False, True]):
        args = (grad_y, y, window_index, *inputs.tensors(), stride, padding, output_padding,
                0.2, True, mask)
        torch.library.opcheck(ops.backward.default, args,
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))


def _compile_backend(device: str) -> str:
    return "inductor"


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_torch_compile_fullgraph(backend_name, device, generator, dynamic):
    """No graph break (fullgraph=True raises on one); same values and gradients as eager."""
    torch._dynamo.reset()

    def step(x, weight, bias, multiplier):
        y = fused3d.fused_block(x, weight, bias, multiplier, 2, 1, 1, backend=backend_name)
        return (y * y).sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend=_compile_backend(
        device))
    for spatial in [(3, 4, 5), (2, 3, 4)] if dynamic else [(3, 4, 5)]:
        inputs = make_inputs(Case(spatial=spatial), torch.float64, device, generator)
        eager_leaves = [t.detach().clone().requires_grad_() for t in inputs.tensors()]
        compiled_leaves = [t.detach().clone().requires_grad_() for t in inputs.tensors()]
        eager_loss = step(*eager_leaves)
        compiled_loss = compiled(*compiled_leaves)
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-12, atol=0)
        eager_grads = torch.autograd.grad(eager_loss, eager_leaves)
        compiled_grads = torch.autograd.grad(compiled_loss, compiled_leaves)
        for a, b in zip(compiled_grads, eager_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_compiled_model(backend_name, device, generator):
    model = fused3d.FusedModel(3, 5, 3, 2, 1, 1, (5, 1, 1, 1), backend=backend_name)
    model = model.to(device=device, dtype=torch.float64)
    x = make_inputs(Case(), torch.float64, device, generator).x
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=_compile_backend(device))
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-12, atol=0)


def test_cuda_graph_replay(backend_name, cuda_device, generator):
    """Forward and backward captured once, replayed on new data, match direct calls."""
    inputs = make_inputs(Case(spatial=(4, 4, 4), in_channels=8, out_channels=8), torch.float32,
                         cuda_device, generator)
    leaves = [t.detach().clone().requires_grad_() for t in inputs.tensors()]
    static_x = leaves[0]
    grad_y = random_like_output(torch.empty(2, 8, 4, 4, 4, device=cuda_device), generator)

    def step():
        y = fused3d.fused_block(static_x, *leaves[1:], 2, 1, 1, backend=backend_name)
        return (y, *torch.autograd.grad(y, leaves, grad_y))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        fresh = make_inputs(inputs.case, torch.float32, cuda_device, generator).x
        with torch.no_grad():
            static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        expected = step()
        for got, want in zip(captured, expected, strict=True):
            assert torch.equal(got, want)


def test_non_default_stream(backend_name, cuda_device, generator):
    inputs = make_inputs(Case(spatial=(4, 4, 4)), torch.float32, cuda_device, generator)
    grad_y = random_like_output(torch.empty(2, 5, 4, 4, 4, device=cuda_device), generator)
    expected = run_backend(backend_name, inputs, grad_y)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = run_backend(backend_name, inputs, grad_y)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    for a, b in zip(got[2], expected[2], strict=True):
        assert torch.equal(a, b)


def test_state_dict_interchange(backend_name):
    plain = fused3d.Model(3, 5, 3, 2, 1, 1, (5, 1, 1, 1))
    fused = fused3d.FusedModel(3, 5, 3, 2, 1, 1, (5, 1, 1, 1), backend=backend_name)
    assert list(plain.state_dict()) == list(fused.state_dict())
    assert set(fused.state_dict()) == {"conv_transpose.weight", "conv_transpose.bias",
                                       "multiplier"}
    fused.load_state_dict(plain.state_dict())
    plain.load_state_dict(fused.state_dict())
    for a, b in zip(plain.state_dict().values(), fused.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_training_loop_moves_multiplier(backend_name, device, generator):
    """Five SGD steps through the backend land where eager PyTorch lands (float64)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    eager = fused3d.Model(3, 5, 3, 2, 1, 1, (5, 1, 1, 1)).double().to(device)
    fused = fused3d.FusedModel(3, 5, 3, 2, 1, 1, (5, 1, 1, 1), backend=backend_name)
    fused = fused.double().to(device)
    fused.load_state_dict(eager.state_dict())
    start = fused.multiplier.detach().clone()
    x = make_inputs(Case(), torch.float64, device, generator).x
    target = torch.randn(2, 5, 3, 4, 5, generator=generator, dtype=torch.float64).to(device)
    for model in (eager, fused):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(5):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), target)
            loss.backward()
            optimizer.step()
    assert not torch.allclose(fused.multiplier, start), "the multiplier did not move"
    for (name, a), b in zip(eager.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize(("dtype", "allow_tf32"),
                         [(torch.float32, True), (torch.float32, False), (torch.float64, True)],
                         ids=["float32", "float32-ieee", "float64"])
def test_backward_op_without_saved_output(backend_name, device, generator, dtype, allow_tf32):
    """``y=None`` means "not saved": the gradients are the same, recomputed (with TF32 allowed
    and not: the cuda and cupy backends' IEEE-fp32 backwards recompute them per element)."""
    from fused3d.testing import relative_error, tolerance_for

    inputs = make_inputs(Case(in_channels=8, out_channels=6), dtype, device, generator)
    ops = _namespace(backend_name)
    y, window_index = ops.forward(*_op_args(inputs, allow_tf32))
    grad_y = random_like_output(y, generator)
    stride, padding, output_padding = (list(v) for v in inputs.case.op_args())
    mask = [True, True, True, True]
    common = (window_index, *inputs.tensors(), stride, padding, output_padding, 0.2, allow_tf32,
              mask)
    with_y = ops.backward(grad_y, y, *common)
    without_y = ops.backward(grad_y, None, *common)
    tol = tolerance_for(backend_name, dtype, device, allow_tf32)
    for name, a, b in zip(("dx", "dweight", "dbias", "dmultiplier"), with_y, without_y,
                          strict=True):
        assert a.shape == b.shape, name
        assert relative_error(a, b) <= tol.gradient, name
