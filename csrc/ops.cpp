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

// ---- attention (issue 4): flash-style scaled dot-product attention. q (B,H,Lq,D), k/v (B,H,Lk,D); attn_mask
// additive in the accumulation dtype (float32, float64 for float64 inputs), shaped (B,H,Lq,Lk) with stride 0
// along broadcast dims; key_padding_mask (B,Lk) bool, True = pad. Dropout is regenerated from `seed`.
// Returns (out, lse): out in q's dtype, lse (B,H,Lq) the per-row logsumexp (+inf for a fully masked row).
TORCH_LIBRARY_FRAGMENT(fastnn, m) {
  m.def("attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor? key_padding_mask, "
        "float dropout_p, bool is_causal, float scale, int seed) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, "
        "Tensor? attn_mask, Tensor? key_padding_mask, float dropout_p, bool is_causal, float scale, int seed) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("attention_fwd_triton(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
        "Tensor? key_padding_mask, float dropout_p, bool is_causal, float scale, int seed) -> (Tensor, Tensor)");
  m.def("attention_bwd_triton(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, "
        "Tensor? attn_mask, Tensor? key_padding_mask, float dropout_p, bool is_causal, float scale, int seed) "
        "-> (Tensor, Tensor, Tensor)");
}
