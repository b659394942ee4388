"""fastnn's CPU caching allocator (csrc/cpu/alloc.h): the blocks of 2 MiB and more the native CPU kernels allocate
their outputs from are kept when freed and handed to the next request they fit.

Each test runs in a fresh process, so the cache's counters and its bound (FASTNN_CPU_CACHE_MB) are its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

MiB = 2**20


def run(code: str, cache_mb: int | None = None) -> dict:
    """Runs `code` (which defines `out`, a JSON-able value) in a fresh process and returns `out`."""
    env = {k: v for k, v in os.environ.items() if k != "FASTNN_CPU_CACHE_MB"}
    if cache_mb is not None:
        env["FASTNN_CPU_CACHE_MB"] = str(cache_mb)
    prog = "import json, torch, fastnn\n" \
           "def output(mib):  # a fresh native-kernel output of about `mib` MiB (float32 softmax)\n" \
           "    return torch.ops.fastnn.softmax_fwd(torch.randn(int(mib * 2**18) // 1024, 1024), -1, False)\n" \
           + textwrap.dedent(code) + "\nprint(json.dumps(out))\n"
    proc = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_default_bound_is_a_quarter_of_memory():
    out = run("out = fastnn.cpu_cache_info()")
    phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert out["limit_bytes"] == phys // 4
    assert out["held_bytes"] == out["hits"] == out["misses"] == out["evictions"] == 0


def test_a_freed_block_serves_the_next_request_of_its_size():
    # Larger than the old fixed bound of 256 MiB: a 4096 x 32000 float32 softmax frees two 500 MiB blocks a step,
    # and a cache that could not hold them faulted both in again every step.
    out = run("""
        y = output(300); p = y.data_ptr(); del y
        held = fastnn.cpu_cache_info()["held_bytes"]
        y = output(300)
        out = dict(same=y.data_ptr() == p, held=held, **fastnn.cpu_cache_info())
    """)
    assert out["same"] and out["held"] >= 300 * MiB
    assert out["hits"] == 1 and out["held_bytes"] == 0


def test_fit_allows_an_eighth_to_spare():
    # A batch a little smaller than the last (a translator's varying lengths) reuses its block; a much smaller
    # one does not pin it.
    out = run("""
        del_ = output(64); p = del_.data_ptr(); del del_
        a = output(60)    # within 1/8 of 64 MiB: the kept block
        same = a.data_ptr() == p; del a
        b = output(40)    # 40 MiB would leave 24 of 64 unused: a fresh block
        out = dict(same=same, other=b.data_ptr() != p, **fastnn.cpu_cache_info())
    """)
    assert out["same"] and out["other"]
    assert out["hits"] == 1 and out["misses"] == 2


def test_bound_evicts_the_longest_kept_blocks():
    out = run("""
        a, b, c = output(20), output(20), output(20)
        pa, pc = a.data_ptr(), c.data_ptr()
        del a; del b; del c      # the third no longer fits 48 MiB with the other two: the first goes
        info = fastnn.cpu_cache_info()
        x = output(20); y = output(20); z = output(20)
        out = dict(info=info, reused_c=pc in (x.data_ptr(), y.data_ptr()), held_after=fastnn.cpu_cache_info())
    """, cache_mb=48)
    assert out["info"]["evictions"] == 1 and out["info"]["held_bytes"] == 2 * 20 * MiB
    assert out["reused_c"]
    assert out["held_after"]["held_bytes"] == 0 and out["held_after"]["hits"] == 2


def test_a_block_larger_than_the_bound_is_freed_and_zero_turns_the_cache_off():
    out = run("""
        del_ = output(64); del del_
        big = fastnn.cpu_cache_info()
        out = dict(big=big)
    """, cache_mb=32)
    assert out["big"]["held_bytes"] == 0 and out["big"]["evictions"] == 0
    out = run("""
        for _ in range(3):
            y = output(8); del y
        out = fastnn.cpu_cache_info()
    """, cache_mb=0)
    assert out["held_bytes"] == 0 and out["hits"] == 0 and out["misses"] == 3


def test_empty_cpu_cache_frees_what_is_kept():
    out = run("""
        y = output(16); del y
        before = fastnn.cpu_cache_info()["held_bytes"]
        fastnn.empty_cpu_cache()
        out = dict(before=before, after=fastnn.cpu_cache_info()["held_bytes"])
    """)
    assert out["before"] >= 16 * MiB and out["after"] == 0
