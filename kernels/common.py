"""Triton helpers shared by every kernel module."""
import os

import triton
import triton.language as tl

# Programs a launch's grid holds along x: 2**31 - 1.
MAX_PROGRAMS = 2**31 - 1
# Under Triton's CPU interpreter (TRITON_INTERPRET=1), which multiplies bfloat16 as raw integers: kernels with
# bfloat16 products upcast their operands there, and only there.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def outer_chunks(outer: int, inner: int):
    """Launches [o0, o1) over the outer index of a one-program-per-row kernel of outer * inner rows, each of at
    most MAX_PROGRAMS rows (the kernels number rows from program_id 0, so more rows than a grid holds take several
    launches on slices of the tensors along their outer dim)."""
    step = MAX_PROGRAMS // max(inner, 1)
    if step == 0:
        raise ValueError(f"fastnn (Triton): {inner} rows per outer index exceed a grid's {MAX_PROGRAMS} programs")
    for o0 in range(0, outer, step):
        yield o0, min(outer, o0 + step)


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
    """(row, base, stride) of this program's row (program_id 0): see row_geometry."""
    return row_geometry(tl.program_id(0), n_cols, inner, LASTDIM)


@triton.jit
def row_geometry(row, n_cols, inner, LASTDIM: tl.constexpr):
    """(row, base, stride) of row `row` of a reduction over a dim of n_cols elements, `inner` apart: element c of
    the row is at base + c * stride. Non-last dims are addressed in place rather than transposed; the last dim gets
    the literal stride 1, so its loads vectorize.

    row, base and a non-literal stride are int64: Triton passes an integer argument below 2**31 as int32 and keeps
    int32 products int32, so (row * n_cols) or (c * inner) would wrap for a tensor past 2**31 elements. With the
    literal stride 1, c * stride is at most n_cols."""
    row = row.to(tl.int64)
    if LASTDIM:
        base = row * n_cols
        stride = 1
    else:
        stride = inner.to(tl.int64)
        base = (row // stride) * n_cols * stride + row % stride
    return row, base, stride
