# The tracer's op census: GEMM shapes by aten op and the bytes memory-bound ops move; views move nothing.
import torch

from moreh_ap.graph.op_census import OpCensus, gemm_shape, moved_bytes

aten = torch.ops.aten


def _note(census: OpCensus, node: str, op, *args):
    census.note(node, op, args, {}, op(*args))


def test_gemm_shapes_of_each_gemm_op():
    a, b, bias = torch.ones(4, 3), torch.ones(3, 5), torch.ones(5)
    x, y = torch.ones(2, 4, 3), torch.ones(2, 3, 5)
    assert gemm_shape("mm", (a, b)) == (4, 3, 5, 1)
    assert gemm_shape("addmm", (bias, a, b)) == (4, 3, 5, 1)
    assert gemm_shape("bmm", (x, y)) == (4, 3, 5, 2)
    assert gemm_shape("baddbmm", (torch.ones(2, 4, 5), x, y)) == (4, 3, 5, 2)
    assert gemm_shape("mm", (a, 2.0)) is None


def test_census_counts_gemms_largest_first_and_bytes_of_the_rest():
    census = OpCensus()
    a, b = torch.ones(4, 3), torch.ones(3, 5)
    _note(census, "blk", aten.mm.default, a, b)
    _note(census, "blk", aten.mm.default, a, b)
    _note(census, "blk", aten.bmm.default, torch.ones(2, 8, 3), torch.ones(2, 3, 8))
    _note(census, "blk", aten.add.Tensor, a, a)           # reads 2 x 48 bytes, writes 48
    _note(census, "blk", aten.view.default, a, [12])       # a view moves nothing
    _note(census, "blk", aten.t.default, a)
    assert census.node_gemms("blk") == ((8, 3, 8, 2, 1), (4, 3, 5, 1, 2))
    assert census.moved["blk"] == 3 * 4 * 3 * 4
    assert census.node_gemms("other") == () and "other" not in census.moved


def test_moved_bytes_counts_nested_tensors_by_dtype():
    half = torch.ones(10, dtype=torch.bfloat16)
    assert moved_bytes((half, [torch.ones(3)]), {"w": torch.ones(2, dtype=torch.float64)}, half) == 20 + 12 + 16 + 20


def test_attention_calls_and_their_flops_as_traced_and_as_run():
    """Attention calls are kept by shape and mode; a square mask counts in full as traced, causal as run."""
    from moreh_ap.graph.op_census import ATTN_CAUSAL, ATTN_FULL, ATTN_SQUARE_MASK, attention_flops

    census = OpCensus()
    for mode in (ATTN_CAUSAL, ATTN_SQUARE_MASK, ATTN_SQUARE_MASK, ATTN_FULL):
        census.note_attention("blk", bh=8, tq=16, tk=16, d=4, dv=4, mode=mode)
    calls = census.node_attention("blk")
    assert calls == ((8, 16, 16, 4, 4, ATTN_FULL, 1), (8, 16, 16, 4, 4, ATTN_CAUSAL, 1),
                     (8, 16, 16, 4, 4, ATTN_SQUARE_MASK, 2))
    square = 2 * 8 * 16 * 16 * (4 + 4)  # QK^T and PV over every query x key
    assert attention_flops(calls, as_run=False) == square + square / 2 + 2 * square
    assert attention_flops(calls, as_run=True) == square + square / 2 + 2 * square / 2
    assert census.node_attention("other") == ()
