"""This CPU's feature flags. Plain Python with no imports from fastnn or torch: setup.py loads this file by path
to choose the build's vector ISA, and fastnn/__init__.py checks the built ISA against it before the extension
loads."""

AVX512_FLAGS = ("avx512f", "avx512dq", "avx512bw", "avx512vl")  # /proc/cpuinfo names, also the -m flags


def cpu_flags():
    """The flags /proc/cpuinfo lists for this CPU, as a set, or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), None)
    except OSError:
        return None
