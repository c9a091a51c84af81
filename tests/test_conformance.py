"""Forward, window index and the four gradients against the float64 oracle, over a sweep."""

from __future__ import annotations

import pytest
import torch

from checks import Case, check_against_oracle, make_inputs

# Kernel 1-5, stride 1-3, padding, output_padding < stride, tuples, odd sizes, batch 0/1,
# channel counts that are not powers of two, bias on/off, both multiplier shapes.
SWEEP = [
    Case(),  # the benchmark configuration at a small size
    Case(spatial=(4, 4, 4), batch=1, in_channels=8, out_channels=8),
    Case(spatial=(2, 3, 2), in_channels=16, out_channels=7, bias=False, multiplier_shape="scalar"),
    Case(spatial=(5, 3, 4), batch=3, in_channels=1, out_channels=1),
    Case(kernel_size=1, stride=1, padding=0, output_padding=0, spatial=(3, 5, 4)),
    Case(kernel_size=2, stride=1, padding=0, output_padding=0, spatial=(3, 3, 4)),
    Case(kernel_size=2, stride=2, padding=0, output_padding=0, spatial=(2, 3, 3)),
    Case(kernel_size=2, stride=2, padding=0, output_padding=1, spatial=(3, 2, 3), bias=False),
    Case(kernel_size=3, stride=1, padding=1, output_padding=0, spatial=(4, 3, 5)),
    Case(kernel_size=3, stride=1, padding=0, output_padding=0, spatial=(2, 2, 3),
         multiplier_shape="scalar"),
    Case(kernel_size=3, stride=3, padding=1, output_padding=2, spatial=(2, 3, 2)),
    Case(kernel_size=3, stride=2, padding=0, output_padding=0, spatial=(3, 3, 3), in_channels=6),
    Case(kernel_size=4, stride=2, padding=1, output_padding=0, spatial=(3, 2, 4)),
    Case(kernel_size=4, stride=3, padding=2, output_padding=1, spatial=(2, 3, 3)),
    Case(kernel_size=5, stride=2, padding=2, output_padding=1, spatial=(3, 2, 2), out_channels=3),
    Case(kernel_size=5, stride=3, padding=0, output_padding=2, spatial=(2, 2, 2), in_channels=2),
    Case(kernel_size=5, stride=1, padding=2, output_padding=0, spatial=(3, 3, 3), bias=False),
    Case(kernel_size=(3, 2, 1), stride=(2, 1, 3), padding=(1, 0, 0), output_padding=(1, 0, 2),
         spatial=(3, 4, 2)),
    Case(kernel_size=(1, 3, 5), stride=(1, 2, 3), padding=(0, 1, 2), output_padding=(0, 1, 1),
         spatial=(4, 3, 2), in_channels=5, out_channels=6),
    Case(kernel_size=3, stride=2, padding=1, output_padding=0, spatial=(3, 3, 3)),  # odd conv out
    Case(kernel_size=2, stride=1, padding=0, output_padding=0, spatial=(1, 1, 1)),  # 2^3 -> 1
    Case(kernel_size=1, stride=1, padding=0, output_padding=0, spatial=(3, 2, 5)),  # odd edges
    Case(batch=0),
    Case(batch=1, in_channels=12, out_channels=9, spatial=(3, 3, 3), multiplier_shape="scalar"),
]


@pytest.mark.parametrize("case", SWEEP, ids=[c.label() for c in SWEEP])
@pytest.mark.parametrize("negative", [False, True], ids=["mixed-multiplier", "negative-multiplier"])
def test_matches_float64_oracle(backend_name, device, generator, case, negative):
    case = Case(**{**case.__dict__, "negative_multiplier": negative})
    inputs = make_inputs(case, torch.float64, device, generator)
    check_against_oracle(backend_name, inputs, generator)


@pytest.mark.parametrize("allow_tf32", [True, False], ids=["tf32-allowed", "ieee"])
@pytest.mark.parametrize("case", [Case(), Case(kernel_size=4, stride=3, padding=1,
                                                 output_padding=2, spatial=(2, 3, 3))],
                         ids=["parity-path", "general-path"])
def test_float32(backend_name, device, generator, case, allow_tf32):
    inputs = make_inputs(Case(**{**case.__dict__, "in_channels": 8, "out_channels": 6}),
                         torch.float32, device, generator)
    check_against_oracle(backend_name, inputs, generator, allow_tf32=allow_tf32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", [Case(), Case(kernel_size=2, stride=1, padding=0,
                                                 output_padding=0, spatial=(3, 3, 2))],
                         ids=["parity-path", "general-path"])
def test_half_types(backend_name, device, generator, case, dtype):
    inputs = make_inputs(Case(**{**case.__dict__, "in_channels": 8, "out_channels": 6}),
                         dtype, device, generator)
    check_against_oracle(backend_name, inputs, generator)


# The fast paths cut the work into tiles (the cuda backend: 8 x 32 pooled positions, 32 output
# channels, C_in in mma steps of 8, rows copied 16 bytes at a time when W % 4 == 0 for fp32 and
# W % 8 == 0 for half types). These cases cross every edge: H and W past one tile (W a multiple
# of 8, of 4 only, and neither), C_out past one channel chunk and not a multiple of 8, C_in
# taking one, two and three mma steps (and 1 to 4 groups of 4 in the FFMA backward kernels).
TILE_EDGES = [
    Case(batch=2, in_channels=16, out_channels=32, spatial=(2, 9, 36)),
    Case(batch=2, in_channels=12, out_channels=20, spatial=(3, 9, 40)),
    Case(batch=1, in_channels=20, out_channels=40, spatial=(2, 10, 33)),
    Case(batch=1, in_channels=3, out_channels=36, spatial=(3, 17, 3)),
]
TILE_EDGE_DTYPES = {"tf32": torch.float32, "ieee": torch.float32, "bfloat16": torch.bfloat16,
                    "float16": torch.float16}


@pytest.mark.parametrize("precision", list(TILE_EDGE_DTYPES))
@pytest.mark.parametrize("case", TILE_EDGES, ids=[c.label() for c in TILE_EDGES])
def test_tile_edges(backend_name, device, generator, case, precision):
    dtype = TILE_EDGE_DTYPES[precision]
    inputs = make_inputs(case, dtype, device, generator)
    check_against_oracle(backend_name, inputs, generator, allow_tf32=precision != "ieee")


def test_benchmark_channels(backend_name, device, generator):
    """The benchmark problem's channel counts (16 -> 32) at a small spatial size, fp32."""
    case = Case(batch=1, in_channels=16, out_channels=32, spatial=(2, 4, 3))
    inputs = make_inputs(case, torch.float32, device, generator)
    check_against_oracle(backend_name, inputs, generator, allow_tf32=False)


@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_backward_in_batch_chunks(backend_name, device, generator, precision):
    """A batch the cuda backward walks in two chunks (its dz scratch holds 4M floats: 8 images
    of 32 x 16 x 32 x 32, plus one); its gradients accumulate across them, and the second
    chunk's kernels start early. TF32 (tensor-core kernels) and IEEE fp32 (FFMA kernels), the
    oracle on the GPU (float64)."""
    if torch.device(device).type != "cuda":
        pytest.skip("a GPU-sized problem: the float64 oracle would take minutes on the CPU")
    case = Case(batch=9, in_channels=16, out_channels=32, spatial=(16, 32, 32))
    inputs = make_inputs(case, torch.float32, device, generator)
    check_against_oracle(backend_name, inputs, generator, allow_tf32=precision == "tf32",
                         oracle_device=device)
