"""The vector ISA the CPU kernels are built for (setup.py's FASTNN_CPU_ISA, recorded in fastnn/_build_config.py) and
the import-time check that refuses a build whose instructions this CPU lacks."""
import platform

import pytest

import fastnn


def test_build_records_its_isa():
    from fastnn import _build_config

    assert fastnn.CPU_ISA == _build_config.CPU_ISA
    if platform.machine() in ("x86_64", "AMD64"):
        assert fastnn.CPU_ISA in ("avx2", "avx512")
        assert bool(_build_config.CPU_FLAGS_REQUIRED) == (fastnn.CPU_ISA == "avx512")


def test_this_cpu_has_what_the_build_needs():
    from fastnn import _build_config

    have = fastnn._cpu_flags()
    if have is None:
        pytest.skip("no /proc/cpuinfo")
    assert set(_build_config.CPU_FLAGS_REQUIRED) <= have
    assert fastnn._check_cpu_isa(have) == fastnn.CPU_ISA


def test_a_cpu_without_the_isa_gets_a_clear_error():
    from fastnn import _build_config

    if not _build_config.CPU_FLAGS_REQUIRED:
        pytest.skip(f"built for {fastnn.CPU_ISA}, which every x86-64 CPU fastnn supports runs")
    with pytest.raises(ImportError, match="FASTNN_CPU_ISA=avx2") as e:
        fastnn._check_cpu_isa({"avx2", "fma", "avx512f"})
    assert "avx512bw" in str(e.value)
