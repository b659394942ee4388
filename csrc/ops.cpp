// Every fastnn schema, in one place. Kernels register elsewhere:
//   csrc/cpu/<op>.cpp   TORCH_LIBRARY_IMPL(fastnn, CPU, m)
//   csrc/cuda/<op>.cu   TORCH_LIBRARY_IMPL(fastnn, CUDA, m)
//   fastnn/ops/<op>.py  the `*_triton` twins (Triton kernels, registered from Python for CPU and CUDA),
//                       plus register_fake / register_autograd for every forward op.
// A `*_triton` op has exactly the schema of its native twin so one fake and one autograd formula serve both.
#include <Python.h>
#include <torch/library.h>

// Importing fastnn._C loads this library and so runs the registrations; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fastnn, m) {
  // ---- softmax / log_softmax over `dim` (log=True). Output is a new contiguous tensor of input's dtype.
  m.def("softmax_fwd(Tensor input, int dim, bool log) -> Tensor");
  // grad_input from grad_output and the forward's output (the only thing the backward saves).
  m.def("softmax_bwd(Tensor grad_output, Tensor output, int dim, bool log) -> Tensor");
  m.def("softmax_fwd_triton(Tensor input, int dim, bool log) -> Tensor");
  m.def("softmax_bwd_triton(Tensor grad_output, Tensor output, int dim, bool log) -> Tensor");
}

// ---- binary cross-entropy with logits (fastnn/ops/bce_with_logits.py) ----
// loss = w * ((1 - y) * x + (1 + (pw - 1) * y) * softplus(-x)); weight and pos_weight broadcast to input's shape
// (pos_weight usually along the last dim) and are read in place. reduction: 0 none, 1 mean, 2 sum (at::Reduction).
TORCH_LIBRARY_FRAGMENT(fastnn, m) {
  m.def("bce_with_logits_fwd(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, int reduction) "
        "-> Tensor");
  // (grad_input, grad_target) in one pass, recomputed from input and target; a gradient not asked for
  // (input_grad / target_grad false) comes back as an empty tensor. grad_output: input's shape for reduction 0,
  // else a 0-d tensor.
  m.def("bce_with_logits_bwd(Tensor grad_output, Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
        "int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor)");
  m.def("bce_with_logits_fwd_triton(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
        "int reduction) -> Tensor");
  m.def("bce_with_logits_bwd_triton(Tensor grad_output, Tensor input, Tensor target, Tensor? weight, "
        "Tensor? pos_weight, int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor)");
}
