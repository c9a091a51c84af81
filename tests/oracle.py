"""The float64 oracle: eager PyTorch ops on the CPU, sharing no code with any backend.

Forward: ``F.conv_transpose3d -> leaky -> * m -> leaky -> F.max_pool3d(return_indices=True)``.
PyTorch's own max_pool3d decides the winner of each window (first maximum, last NaN), so the
oracle's window index is PyTorch's rule, not ours.

Gradients are routed through a *given* window index: where two values of a window are closer
than the backend's rounding, either may legitimately win; the test then checks that the backend's
winner is a maximum to within that rounding, and that its gradients are exact for that winner.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _as64(tensor):
    return None if tensor is None else tensor.detach().to("cpu", torch.float64)


def activated(x, weight, bias, multiplier, stride, padding, output_padding, slope):
    """leaky(m * leaky(conv_transpose3d(x))) in whatever dtype the inputs have."""
    conv = F.conv_transpose3d(x, weight, bias, stride=stride, padding=padding,
                              output_padding=output_padding)
    return F.leaky_relu(F.leaky_relu(conv, slope) * multiplier.reshape(-1, 1, 1, 1), slope)


def forward(x, weight, bias, multiplier, stride, padding, output_padding, slope):
    """(y, window_index) in float64 on the CPU; index = dd*4 + dh*2 + dw."""
    values = activated(_as64(x), _as64(weight), _as64(bias), _as64(multiplier),
                       stride, padding, output_padding, slope)
    y, flat = F.max_pool3d(values, kernel_size=2, return_indices=True)
    _, _, _, height, width = values.shape
    d, h, w = flat // (height * width), (flat // width) % height, flat % width
    window_index = ((d % 2) * 4 + (h % 2) * 2 + (w % 2)).to(torch.uint8)
    return y, window_index, values


def window_values(values: torch.Tensor) -> torch.Tensor:
    """All 8 values of each pool window, shape (N, C, Dp, Hp, Wp, 8), in index order."""
    n, c, d, h, w = values.shape
    dp, hp, wp = d // 2, h // 2, w // 2
    cropped = values[:, :, : 2 * dp, : 2 * hp, : 2 * wp]
    return (
        cropped.reshape(n, c, dp, 2, hp, 2, wp, 2)
        .permute(0, 1, 2, 4, 6, 3, 5, 7)
        .reshape(n, c, dp, hp, wp, 8)
    )


def gradients(x, weight, bias, multiplier, stride, padding, output_padding, slope, grad_y,
              window_index):
    """float64 (dx, dweight, dbias, dmultiplier) with each window's gradient sent to
    ``window_index`` (the backend's choice). dbias is None without bias."""
    leaves = [_as64(t).requires_grad_() if t is not None else None
              for t in (x, weight, bias, multiplier)]
    values = activated(leaves[0], leaves[1], leaves[2], leaves[3].reshape(multiplier.shape),
                       stride, padding, output_padding, slope)
    picked = torch.gather(window_values(values), -1,
                          window_index.to("cpu", torch.long).unsqueeze(-1)).squeeze(-1)
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(picked, wanted, _as64(grad_y), allow_unused=True))
    return tuple(next(grads) if t is not None else None for t in leaves)
