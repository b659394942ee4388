// Every fastnn schema, in one place. Kernels register elsewhere:
//   csrc/cpu/<op>.cpp   TORCH_LIBRARY_IMPL(fastnn, CPU, m)
//   csrc/cuda/<op>.cu   TORCH_LIBRARY_IMPL(fastnn, CUDA, m)
//   fastnn/ops/<op>.py  the `*_triton` twins (Triton kernels, registered from Python for CPU and CUDA),
//                       plus register_fake / register_autograd for every forward op.
// A `*_triton` op has exactly the schema of its native twin so one fake and one autograd formula serve both.
#include <Python.h>
#include <torch/library.h>

#include "cpu/alloc.h"

namespace {
PyObject* empty_cpu_cache(PyObject*, PyObject*) {
  fastnn::cpu::empty_cache();
  Py_RETURN_NONE;
}
PyObject* cpu_cache_info(PyObject*, PyObject*) {
  const fastnn::cpu::CacheStats s = fastnn::cpu::cache_stats();
  return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K}", "held_bytes", (unsigned long long)s.held_bytes, "limit_bytes",
                       (unsigned long long)s.limit_bytes, "hits", (unsigned long long)s.hits, "misses",
                       (unsigned long long)s.misses, "evictions", (unsigned long long)s.evictions);
}
PyMethodDef methods[] = {
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS, "Frees the CPU blocks fastnn's allocator keeps for reuse."},
    {"cpu_cache_info", cpu_cache_info, METH_NOARGS, "The CPU block cache's counters."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

// Importing fastnn._C loads this library and so runs the registrations; the module itself holds only the CPU
// block cache's two functions (fastnn.empty_cpu_cache, fastnn.cpu_cache_info).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fastnn, m) {
  // Each op: its forward and backward, then their `_triton` twins of the same schemas. In the README's order.

  // ---- softmax / log_softmax over `dim` (log=True). Output: a new contiguous tensor of input's dtype.
  // The backward takes grad_output and the forward's output (the only thing it saves).
  m.def("softmax_fwd(Tensor input, int dim, bool log) -> Tensor");
  m.def("softmax_bwd(Tensor grad_output, Tensor output, int dim, bool log) -> Tensor");
  m.def("softmax_fwd_triton(Tensor input, int dim, bool log) -> Tensor");
  m.def("softmax_bwd_triton(Tensor grad_output, Tensor output, int dim, bool log) -> Tensor");

  // ---- cross_entropy. input (N, C, d1, ...) contiguous, classes along dim 1. target: int64 class indices of shape
  // (N, d1, ...), or class probabilities of input's shape and dtype. weight: optional (C,) class weights of input's
  // dtype. Returns the unreduced loss (N, d1, ...) and the per-row statistics `stats` (2, N, d1, ...) = (row max,
  // log of the row's sum of exp(x - max)), in the accumulation dtype (float32, or float64 for float64 input);
  // fastnn/ops/cross_entropy.py reduces. Out-of-range indices (other than ignore_index) raise an IndexError.
  // inplace_backward only tells the autograd formula to use cross_entropy_bwd_inplace.
  // The backward: grad_input from the per-row grad_loss, the saved logits and statistics (the softmax is
  // recomputed); cross_entropy_bwd_inplace writes it over `input` instead.
  m.def("cross_entropy_fwd(Tensor input, Tensor target, Tensor? weight, int ignore_index, float label_smoothing,"
        " bool inplace_backward) -> (Tensor, Tensor)");
  m.def("cross_entropy_bwd(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor stats,"
        " int ignore_index, float label_smoothing) -> Tensor");
  m.def("cross_entropy_bwd_inplace(Tensor grad_loss, Tensor(a!) input, Tensor target, Tensor? weight,"
        " Tensor stats, int ignore_index, float label_smoothing) -> ()");
  m.def("cross_entropy_fwd_triton(Tensor input, Tensor target, Tensor? weight, int ignore_index,"
        " float label_smoothing, bool inplace_backward) -> (Tensor, Tensor)");
  m.def("cross_entropy_bwd_triton(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor stats,"
        " int ignore_index, float label_smoothing) -> Tensor");
  m.def("cross_entropy_bwd_inplace_triton(Tensor grad_loss, Tensor(a!) input, Tensor target, Tensor? weight,"
        " Tensor stats, int ignore_index, float label_smoothing) -> ()");
  // cross_entropy_fwd_grad: the forward and, in the same visit of each row, grad_input for a given per-row
  // grad_loss (N, d1, ...) (a scalar reduction's, known before the backward), so each row is read from memory once
  // (its second read hits the cache) and nothing is saved for a backward. Returns (loss, grad_input).
  m.def("cross_entropy_fwd_grad(Tensor input, Tensor target, Tensor? weight, Tensor grad_loss, int ignore_index,"
        " float label_smoothing) -> (Tensor, Tensor)");
  m.def("cross_entropy_fwd_grad_triton(Tensor input, Tensor target, Tensor? weight, Tensor grad_loss,"
        " int ignore_index, float label_smoothing) -> (Tensor, Tensor)");

  // ---- linear_cross_entropy: cross_entropy(input @ weight.T + bias, target) without the (N, V) logits.
  // input (N, D), weight (V, D), bias (V,), target (N,) int64, class_weight (V,). Rows run `chunk` at a time; the
  // backward recomputes each chunk's logits. Returns as cross_entropy_fwd; the backward returns (grad_input,
  // grad_weight, grad_bias), grad_bias (V,) even without bias. output_mask says which of the three to compute (as
  // ATen's backward ops): one left out is not computed and comes back as an empty (0,) tensor, so a frozen head or
  // a detached input skips a whole matrix product.
  m.def("linear_cross_entropy_fwd(Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight,"
        " int ignore_index, float label_smoothing, int chunk) -> (Tensor, Tensor)");
  m.def("linear_cross_entropy_bwd(Tensor grad_loss, Tensor input, Tensor weight, Tensor? bias, Tensor target,"
        " Tensor? class_weight, Tensor stats, int ignore_index, float label_smoothing, int chunk,"
        " bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // linear_cross_entropy_fwd_grad: the forward and, in the same pass over the chunks, the gradients for a given
  // grad_loss (N,) (a scalar reduction's, known before the backward): three products a chunk instead of the four
  // of _fwd + _bwd. Returns (loss, grad_input, grad_weight, grad_bias), the gradients as _bwd's.
  m.def("linear_cross_entropy_fwd_grad(Tensor input, Tensor weight, Tensor? bias, Tensor target,"
        " Tensor? class_weight, Tensor grad_loss, int ignore_index, float label_smoothing, int chunk,"
        " bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_cross_entropy_fwd_grad_triton(Tensor input, Tensor weight, Tensor? bias, Tensor target,"
        " Tensor? class_weight, Tensor grad_loss, int ignore_index, float label_smoothing, int chunk,"
        " bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_cross_entropy_fwd_triton(Tensor input, Tensor weight, Tensor? bias, Tensor target,"
        " Tensor? class_weight, int ignore_index, float label_smoothing, int chunk) -> (Tensor, Tensor)");
  m.def("linear_cross_entropy_bwd_triton(Tensor grad_loss, Tensor input, Tensor weight, Tensor? bias,"
        " Tensor target, Tensor? class_weight, Tensor stats, int ignore_index, float label_smoothing, int chunk,"
        " bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- bce_with_logits: loss = w * ((1 - y) * x + (1 + (pw - 1) * y) * softplus(-x)); weight and pos_weight
  // broadcast to input's shape (pos_weight usually along the last dim) and are read in place. reduction: 0 none,
  // 1 mean, 2 sum (at::Reduction). The backward gives (grad_input, grad_target) in one pass, recomputed from input
  // and target; a gradient not asked for (input_grad / target_grad false) comes back as an empty tensor.
  // grad_output: input's shape for reduction 0, else a 0-d tensor.
  m.def("bce_with_logits_fwd(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, int reduction)"
        " -> Tensor");
  m.def("bce_with_logits_bwd(Tensor grad_output, Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight,"
        " int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor)");
  m.def("bce_with_logits_fwd_triton(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight,"
        " int reduction) -> Tensor");
  m.def("bce_with_logits_bwd_triton(Tensor grad_output, Tensor input, Tensor target, Tensor? weight,"
        " Tensor? pos_weight, int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor)");

  // ---- attention: flash-style scaled dot-product attention. q (B,H,Lq,D), k (B,Hk,Lk,D), v (B,Hk,Lk,Dv): Hk key /
  // value heads shared by H query heads (grouped-query attention, H a multiple of Hk; query head h reads kv head
  // h / (H / Hk)); Dv may differ from D (each in [1, 256]). q, k, v are read through their batch / head strides
  // (0 for a broadcast batch or head: an expanded operand is not copied). attn_mask additive in the accumulation
  // dtype (float32, float64 for float64 inputs), 4-d with each dim 1 or (B,H,Lq,Lk)'s, read in place;
  // key_padding_mask (B,Lk) bool, True = pad. Dropout is regenerated from `seed`. Returns (out, stats): out
  // (B,H,Lq,Dv) in q's dtype, stats (2,B,H,Lq) in the accumulation dtype, each query row's max score and log of
  // its sum of exp (+inf and 0 for a fully masked row).
  // The backward returns (dq, dk, dv, dmask): dk, dv (B,Hk,Lk,*) summed over each kv head's query heads; dmask =
  // d(loss)/d(attn_mask), the score gradient summed over the mask's broadcast dims, of the mask's own shape in the
  // accumulation dtype when mask_grad (which needs an attn_mask), else an empty (0,) tensor.
  m.def("attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor? key_padding_mask,"
        " float dropout_p, bool is_causal, float scale, int seed) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor stats,"
        " Tensor? attn_mask, Tensor? key_padding_mask, float dropout_p, bool is_causal, float scale, int seed,"
        " bool mask_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("attention_fwd_triton(Tensor query, Tensor key, Tensor value, Tensor? attn_mask,"
        " Tensor? key_padding_mask, float dropout_p, bool is_causal, float scale, int seed) -> (Tensor, Tensor)");
  m.def("attention_bwd_triton(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor stats,"
        " Tensor? attn_mask, Tensor? key_padding_mask, float dropout_p, bool is_causal, float scale, int seed,"
        " bool mask_grad) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- lstm_cell (gate order i, f, g, o). The matrix products stay outside, on BLAS; these are the fused rest.
  // gates = x W_ih^T + h W_hh^T [B, 4H] (bias optional, [4H]), cx [B, H] -> (hy, cy, act), where act [B, 4H] holds
  // the activated gates, which the backward saves together with cx (it recomputes cy from them). The backward
  // returns (grad_gates [B, 4H], grad_cx [B, H]); grad_bias is grad_gates summed over the batch.
  m.def("lstm_cell_fwd(Tensor gates, Tensor? bias, Tensor cx) -> (Tensor, Tensor, Tensor)");
  m.def("lstm_cell_bwd(Tensor grad_hy, Tensor grad_cy, Tensor act, Tensor cx) -> (Tensor, Tensor)");
  m.def("lstm_cell_fwd_triton(Tensor gates, Tensor? bias, Tensor cx) -> (Tensor, Tensor, Tensor)");
  m.def("lstm_cell_bwd_triton(Tensor grad_hy, Tensor grad_cy, Tensor act, Tensor cx) -> (Tensor, Tensor)");

  // ---- lstm_layer: the whole recurrence of one layer and direction in one call (no Triton twin: elsewhere a
  // Python loop runs lstm_cell). x [T, B, I], w_ih [4H, I], bias = b_ih + b_hh [4H] or None, w_hh [4H, H], h0/c0
  // [B, H]. The input product of all steps is one GEMM (into the gate buffer); then per step one in-place addmm
  // and the fused cell. -> (hs, cs, act): the states after every step [T, B, H] (a row past its length, int64
  // lengths [B], keeps its state) and the activated gates [T, B, 4H]. `reverse` walks t = T-1 .. 0.
  // The backward returns (grad_gates [T, B, 4H], grad_h0, grad_c0, grad_bias [4H]): grad_bias is grad_gates summed
  // over all steps and rows; the weight and input gradients are GEMMs of grad_gates. grad_cs None is a zero
  // gradient (a model that reads only hs and the final states). lstm_layer_infer_fwd is the same recurrence without
  // autograd: no per-step gates or cell states kept; it returns (hs, c_n).
  m.def("lstm_layer_fwd(Tensor x, Tensor w_ih, Tensor? bias, Tensor w_hh, Tensor h0, Tensor c0, Tensor? lengths,"
        " bool reverse) -> (Tensor, Tensor, Tensor)");
  m.def("lstm_layer_bwd(Tensor grad_hs, Tensor? grad_cs, Tensor w_hh, Tensor c0, Tensor cs, Tensor act,"
        " Tensor? lengths, bool reverse) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lstm_layer_infer_fwd(Tensor x, Tensor w_ih, Tensor? bias, Tensor w_hh, Tensor h0, Tensor c0,"
        " Tensor? lengths, bool reverse) -> (Tensor, Tensor)");
}
