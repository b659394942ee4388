import os

import torch

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which must be chosen before
# triton is first imported. On a GPU machine they compile for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastnn  # noqa: E402,F401

# FASTNN_TRITON_RECORD=FILE: write every Triton launch's compile key to FILE (JSON lines) for
# `python -m fastnn.kernels.aot --recorded FILE`, which compiles each for the GPU (kernels/aot.py, record_launches);
# FASTNN_TRITON_RECORD_ARCH=90 records the tiles an sm_90 GPU would run (default 80).
if os.environ.get("FASTNN_TRITON_RECORD"):
    from fastnn.kernels.aot import record_launches_from_env  # noqa: E402

    record_launches_from_env()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Hypothesis profiles (tests/test_fuzz.py): a small, derandomized one for the normal run; `fuzz` for the dedicated
# run (tools/fuzz.sh: >= 2000 examples per op and backend). Pick with --hypothesis-profile=NAME or
# FASTNN_HYPOTHESIS_PROFILE=NAME.
from hypothesis import HealthCheck, settings  # noqa: E402

_slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("fastnn", max_examples=15, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_slow_ok, print_blob=True)
settings.register_profile("fuzz", max_examples=int(os.environ.get("FASTNN_FUZZ_EXAMPLES", "2000")), deadline=None,
                          suppress_health_check=_slow_ok, print_blob=True)
settings.load_profile(os.environ.get("FASTNN_HYPOTHESIS_PROFILE", "fastnn"))
