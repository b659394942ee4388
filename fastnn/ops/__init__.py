"""torch.library plumbing of every fastnn op: fake (meta) kernels, autograd formulas, Triton registrations.

Each ``fastnn/ops/<op>.py`` binds its op handles by name (``torch.ops.fastnn.softmax_fwd``, ...) and describes
its op once with ``registry.register_op``: the native (C++/CUDA) and the Triton variant share the schema, the fake
and the autograd formula. Importing this package registers every op. The Triton launchers import their module
of ``fastnn.kernels`` inside the function, not at the top: Triton is optional, and importing fastnn must not
import it.
"""
from . import softmax, cross_entropy, linear_cross_entropy, bce_with_logits, attention, lstm  # noqa: F401
