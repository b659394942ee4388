"""fastnn's Triton kernels and their launchers (no autograd: fastnn.ops wires them into torch.library).

Installed as ``fastnn.kernels``. Importing a module here imports Triton; fastnn itself imports them lazily so
CPU-only installs run without Triton. Each module lists its kernels in ``AOT`` (see ``kernels/aot.py``)."""
