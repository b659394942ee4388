"""Triton helpers shared by every kernel module."""
import triton
import triton.language as tl


@triton.jit
def cast_rtne(x, dtype: tl.constexpr):
    """x (float32/float64) -> dtype, rounding to nearest even.

    bfloat16 is rounded by hand on the float32 bits: Triton's interpreter truncates fp32 -> bf16 (which would
    double the error the tests allow), and the GPU rounds exactly the same way, so one code path serves both.
    """
    if dtype == tl.bfloat16:
        x32 = x.to(tl.float32)
        bits = x32.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        rounded = bits.to(tl.float32, bitcast=True)
        return tl.where(x32 != x32, x32, rounded).to(tl.bfloat16)  # NaN payloads must not carry into +0
    else:
        return x.to(dtype)


@triton.jit
def row_start(n_cols, inner, LASTDIM: tl.constexpr):
    """(row, base, stride) of this program's row (program_id 0) of a reduction over a dim of n_cols elements,
    `inner` apart: element c of the row is at base + c * stride. Non-last dims are addressed in place rather
    than transposed; the last dim gets the literal stride 1, so its loads vectorize."""
    row = tl.program_id(0).to(tl.int64)
    if LASTDIM:
        base = row * n_cols
        stride = 1
    else:
        base = (row // inner) * n_cols * inner + row % inner
        stride = inner
    return row, base, stride
