"""The CUDA sources run without a GPU: every file of csrc/cuda compiled whole as host C++ against the emulator of
tools/cuda_emu (a thread per CUDA thread; warp shuffles, barriers, mma / ldmatrix / cp.async, grid.sync), with its
own launchers, and each CUDA op compared with the C++ CPU kernel of the same schema on the paths the launchers
choose between (tools/cuda_emu/checks.py). Built with ASan + UBSan: a kernel touching memory outside a tensor
fails the run, and so do a launch the hardware would refuse (grid, block or shared-memory limits, more than 48 KB
of dynamic shared memory not granted by cudaFuncSetAttribute) and a launch that hangs."""
import re

from helpers import run_cuda_emulator


def test_every_cuda_op_against_the_cpu_kernels_in_the_emulator():
    out = run_cuda_emulator("checks", "--sanitizer", "asan", timeout=2400)
    m = re.search(r"cuda_emu checks: (\d+) ok, (\d+) bad", out)
    assert m and int(m.group(2)) == 0 and int(m.group(1)) >= 200, out[-4000:]
    # the paths the cases are there to reach, by kernel name
    for kernel in ("softmax_fwd_online", "softmax_fwd_cached<float, 4, true>", "softmax_bwd_cached<float, 2, true>",
                   "softmax_fwd_strided", "ce_fwd_grad_kernel", "ce_bwd_inplace_kernel", "bce_finish_kernel",
                   "attn_fwd_tc_kernel<c10::Half, 128>", "attn_fwd_tc_kernel<c10::BFloat16, 256>", "attn_bwd_tc_kernel",
                   "attn_bwd_dq_kernel<double, double>", "attn_fwd_kernel<c10::BFloat16, float>",
                   "layer_fwd_persistent_kernel", "layer_bwd_persistent_kernel", "cell_fwd_kernel<c10::BFloat16>"):
        assert kernel in out, f"no launch of {kernel}"
