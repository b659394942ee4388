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

  // ---- cross_entropy (losses helper) BEGIN ----------------------------------------------------------------------
  // input (N, C, d1, ...) contiguous, classes along dim 1. target: int64 class indices of shape (N, d1, ...), or
  // class probabilities of input's shape and dtype. weight: optional (C,) class weights of input's dtype.
  // Returns the unreduced loss and the per-row logsumexp, both (N, d1, ...) in the accumulation dtype (float32,
  // or float64 for float64 input); fastnn/ops/cross_entropy.py reduces. Out-of-range indices (other than
  // ignore_index) raise an IndexError.
  // inplace_backward only tells the autograd formula to use cross_entropy_bwd_inplace.
  m.def("cross_entropy_fwd(Tensor input, Tensor target, Tensor? weight, int ignore_index, float label_smoothing,"
        " bool inplace_backward) -> (Tensor, Tensor)");
  // grad_input from the per-row grad_loss, the saved logits and logsumexp (the softmax is recomputed).
  m.def("cross_entropy_bwd(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor lse,"
        " int ignore_index, float label_smoothing) -> Tensor");
  // The same, written over `input` (inplace_backward=True).
  m.def("cross_entropy_bwd_inplace(Tensor grad_loss, Tensor(a!) input, Tensor target, Tensor? weight, Tensor lse,"
        " int ignore_index, float label_smoothing) -> ()");
  m.def("cross_entropy_fwd_triton(Tensor input, Tensor target, Tensor? weight, int ignore_index,"
        " float label_smoothing, bool inplace_backward) -> (Tensor, Tensor)");
  m.def("cross_entropy_bwd_triton(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor lse,"
        " int ignore_index, float label_smoothing) -> Tensor");
  m.def("cross_entropy_bwd_inplace_triton(Tensor grad_loss, Tensor(a!) input, Tensor target, Tensor? weight,"
        " Tensor lse, int ignore_index, float label_smoothing) -> ()");
  // ---- linear_cross_entropy: cross_entropy(input @ weight.T + bias, target) without the (N, V) logits.
  // input (N, D), weight (V, D), bias (V,), target (N,) int64, class_weight (V,). Rows run `chunk` at a time
  // through one reused (chunk, V) logits buffer; the backward recomputes each chunk's logits. Returns as
  // cross_entropy_fwd; the backward returns (grad_input, grad_weight, grad_bias), grad_bias (V,) even without bias.
  m.def("linear_cross_entropy_fwd(Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight,"
        " int ignore_index, float label_smoothing, int chunk) -> (Tensor, Tensor)");
  m.def("linear_cross_entropy_bwd(Tensor grad_loss, Tensor input, Tensor weight, Tensor? bias, Tensor target,"
        " Tensor? class_weight, Tensor lse, int ignore_index, float label_smoothing, int chunk)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("linear_cross_entropy_fwd_triton(Tensor input, Tensor weight, Tensor? bias, Tensor target,"
        " Tensor? class_weight, int ignore_index, float label_smoothing, int chunk) -> (Tensor, Tensor)");
  m.def("linear_cross_entropy_bwd_triton(Tensor grad_loss, Tensor input, Tensor weight, Tensor? bias,"
        " Tensor target, Tensor? class_weight, Tensor lse, int ignore_index, float label_smoothing, int chunk)"
        " -> (Tensor, Tensor, Tensor)");
  // ---- cross_entropy (losses helper) END ------------------------------------------------------------------------
}
