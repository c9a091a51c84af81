"""Op-registration glue shared by every backend (DESIGN section 5).

Each backend owns ``<namespace>::forward`` and ``<namespace>::backward`` with the schemas
below. How the ops are *defined* differs per toolchain (``torch.library.custom_op``,
``torch.library.triton_op``, or C++ ``TORCH_LIBRARY_IMPL`` behind :func:`define_schemas`);
what is attached to them is the same for all and lives here once:

* the fake (meta) implementations, so ``torch.compile`` and ``opcheck`` know the shapes;
* the autograd formula, which saves only x, weight, bias, multiplier, the uint8 window index
  and, for backends that read it, the pooled output y (nothing conv-sized; DESIGN section 3)
  and calls the backend's backward op.

Backward outputs that the needs-grad mask does not ask for are returned as empty tensors
(``numel() == 0``): custom-op schemas cannot return ``None``; the autograd glue maps them back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .config import BlockConfig

FORWARD_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor multiplier, int[] stride, int[] padding, "
    "int[] output_padding, float negative_slope, bool allow_tf32) -> (Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_y, Tensor? y, Tensor window_index, Tensor x, Tensor weight, Tensor? bias, "
    "Tensor multiplier, int[] stride, int[] padding, int[] output_padding, "
    "float negative_slope, bool allow_tf32, bool[] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


def config_from_op_args(
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    output_padding: Sequence[int],
    negative_slope: float,
) -> BlockConfig:
    """Rebuild the :class:`BlockConfig` inside an op body (arguments already validated)."""
    return BlockConfig(
        kernel_size=tuple(weight.shape[2:]),
        stride=tuple(stride),
        padding=tuple(padding),
        output_padding=tuple(output_padding),
        negative_slope=float(negative_slope),
    )


def output_shape(x: torch.Tensor, weight: torch.Tensor, stride, padding, output_padding):
    """``(N, C_out, Dp, Hp, Wp)`` of the block for these op arguments."""
    config = config_from_op_args(weight, stride, padding, output_padding, 0.0)
    return config.output_shape(x.shape, weight.shape[1])


def empty_outputs(x, weight, stride, padding, output_padding):
    """Allocate ``(y, window_index)`` for a forward op: y in x's dtype, index uint8."""
    shape = output_shape(x, weight, stride, padding, output_padding)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8)


def skipped_grad(like: torch.Tensor) -> torch.Tensor:
    """The placeholder a backward op returns for a gradient the mask did not ask for."""
    return like.new_empty((0,))


def finish_channel_grad(per_channel: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Turn a per-output-channel gradient ``(C_out,)`` into ``target``'s shape and dtype.

    Used for dbias and dmultiplier: a multiplier of shape (1, 1, 1, 1) is broadcast over the
    channels, so its gradient is the sum over them.
    """
    if target.numel() == 1 and per_channel.numel() != 1:
        per_channel = per_channel.sum()
    return per_channel.reshape(target.shape).to(target.dtype)


# --------------------------------------------------------------------------- fake kernels


def _fake_forward(x, weight, bias, multiplier, stride, padding, output_padding, negative_slope,
                  allow_tf32):
    return empty_outputs(x, weight, stride, padding, output_padding)


def _fake_backward(grad_y, y, window_index, x, weight, bias, multiplier, stride, padding,
                   output_padding, negative_slope, allow_tf32, output_mask):
    def grad_or_skip(wanted: bool, like):
        if like is None:
            return x.new_empty((0,))
        return torch.empty_like(like, memory_format=torch.contiguous_format) if wanted else (
            skipped_grad(like)
        )

    return (
        grad_or_skip(output_mask[0], x),
        grad_or_skip(output_mask[1], weight),
        grad_or_skip(output_mask[2], bias),
        grad_or_skip(output_mask[3], multiplier),
    )


# --------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output, saves_output: bool) -> None:
    x, weight, bias, multiplier, stride, padding, output_padding, negative_slope, allow_tf32 = (
        inputs
    )
    y, window_index = output
    ctx.mark_non_differentiable(window_index)
    # No zero tensor for the index's (non-existent) gradient, nor for an unused y.
    ctx.set_materialize_grads(False)
    # y is kept only for backends whose backward reads it: holding it would otherwise keep
    # a pooled-size tensor alive that the caller may have dropped.
    ctx.save_for_backward(x, weight, bias, multiplier, window_index,
                          y if saves_output else None)
    ctx.op_args = (list(stride), list(padding), list(output_padding), negative_slope,
                   allow_tf32)


def _backward(ctx, grad_y, backward_op: Callable) -> tuple:
    """The nine input gradients (None where not wanted) from the backend's backward op."""
    x, weight, bias, multiplier, window_index, y = ctx.saved_tensors
    wanted = list(ctx.needs_input_grad[:4])
    if bias is None:
        wanted[2] = False
    if grad_y is None or not any(wanted):
        return (None,) * 9
    grads = backward_op(
        grad_y.contiguous(), y, window_index, x, weight, bias, multiplier, *ctx.op_args,
        wanted,
    )
    return tuple(g if w else None for g, w in zip(grads, wanted, strict=True)) + (None,) * 5


def _make_setup_context(saves_output: bool):
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output, saves_output)

    return setup_context


def _make_backward(backward_op: Callable):
    def backward(ctx, grad_y, grad_window_index):
        return _backward(ctx, grad_y, backward_op)

    return backward


#: Whether each registered namespace's backward reads y (see :func:`register_block_ops`).
_SAVES_OUTPUT: dict[str, bool] = {}


class _EagerBlock(torch.autograd.Function):
    """Eager training calls: the registered formula (the same two functions), applied without
    torch.library's per-call Python wrapper, which re-binds the arguments and redispatches.
    (Old-style forward(ctx, ...): a separate setup_context makes apply() bind arguments by
    signature on every call. Under torch.func transforms the registered op runs instead.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, multiplier, stride, padding, output_padding,
                negative_slope, allow_tf32, namespace):
        ops = getattr(torch.ops, namespace)
        with torch._C._AutoDispatchBelowAutograd():
            output = ops.forward.default(x, weight, bias, multiplier, stride, padding,
                                         output_padding, negative_slope, allow_tf32)
        _setup_context(ctx, (x, weight, bias, multiplier, stride, padding, output_padding,
                             negative_slope, allow_tf32), output, _SAVES_OUTPUT[namespace])
        ctx.backward_op = ops.backward.default
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_window_index):
        return (*_backward(ctx, grad_y, ctx.backward_op), None)


def call_forward(namespace: str, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, multiplier: torch.Tensor, stride: Sequence[int],
                 padding: Sequence[int], output_padding: Sequence[int], negative_slope: float,
                 allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a backend's forward op as the public API does: ``(y, window_index)``.

    Under torch.compile or torch.func transforms the op is called as registered (its autograd
    formula is what the compiler traces); in eager mode the same formula runs through
    :class:`_EagerBlock`, or, when no gradient is needed, the op's kernel is called directly.
    """
    args = (x, weight, bias, multiplier, stride, padding, output_padding, negative_slope,
            allow_tf32)
    op = getattr(torch.ops, namespace).forward.default
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return op(*args)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, multiplier)
    ):
        return _EagerBlock.apply(*args, namespace)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# --------------------------------------------------------------------------- definition


def define_schemas(namespace: str) -> torch.library.Library:
    """Define ``namespace::forward`` and ``::backward`` with no kernels yet.

    For backends that register their kernels elsewhere (C++ ``TORCH_LIBRARY_IMPL``). Keep the
    returned Library alive as long as the ops should exist.
    """
    library = torch.library.Library(namespace, "DEF")
    library.define("forward" + FORWARD_SCHEMA)
    library.define("backward" + BACKWARD_SCHEMA)
    return library


def register_block_ops(namespace: str, *, saves_output: bool = False) -> None:
    """Attach core's fake implementations and autograd formula to a backend's two ops.

    ``saves_output``: the backend's backward reads the pooled output ``y`` (its ``y`` argument);
    otherwise autograd does not keep y alive and the backward gets ``y=None``.
    """
    forward_name, backward_name = f"{namespace}::forward", f"{namespace}::backward"
    torch.library.register_fake(forward_name, _fake_forward)
    torch.library.register_fake(backward_name, _fake_backward)
    backward_op = getattr(torch.ops, namespace).backward.default
    _SAVES_OUTPUT[namespace] = saves_output
    torch.library.register_autograd(
        forward_name, _make_backward(backward_op),
        setup_context=_make_setup_context(saves_output),
    )


def define_python_ops(
    namespace: str,
    forward_impl: Callable,
    backward_impl: Callable,
    *,
    factory: str = "custom_op",
    saves_output: bool = False,
) -> None:
    """Define a backend's ops from Python implementations and attach core's glue.

    ``factory`` is ``"custom_op"`` (``torch.library.custom_op``: opaque to the compiler) or
    ``"triton_op"`` (``torch.library.triton_op``: the compiler sees the Triton kernels
    launched through ``wrap_triton``). The implementations take the arguments named in
    :data:`FORWARD_SCHEMA` / :data:`BACKWARD_SCHEMA`.
    """
    if factory == "custom_op":
        make = torch.library.custom_op
    elif factory == "triton_op":
        make = torch.library.triton_op
    else:
        raise ValueError(f"factory must be 'custom_op' or 'triton_op', got {factory!r}")
    make(f"{namespace}::forward", forward_impl, mutates_args=(), schema=FORWARD_SCHEMA)
    make(f"{namespace}::backward", backward_impl, mutates_args=(), schema=BACKWARD_SCHEMA)
    register_block_ops(namespace, saves_output=saves_output)
