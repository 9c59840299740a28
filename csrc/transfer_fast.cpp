// Every op schema of transfer_fast, and the bare module init that lets
// `import transfer_fast._C` load this library (registration happens at load).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// No Python functions live here: the ops are reached through torch.ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(transfer_fast, m) {
  // anchors: A sets of `num_tensors` tensors, flattened set-major
  //          ([set0_t0, set0_t1, ..., set1_t0, ...]); targets: K sets likewise.
  // Returns float64 (A, K, num_tensors, 5): per (anchor, target, tensor)
  // sum|a-b|, sum (a-b)^2, sum a*b, sum a^2, sum b^2.
  m.def(
      "multi_tensor_distance(Tensor[] anchors, Tensor[] targets, "
      "int num_tensors) -> Tensor");
  // The same sums for sets packed into flat buffers: anchors (A, L), targets
  // (K, L), contiguous, of one dtype; chunks: int64 (rows, 3) work map on
  // their device, from packed_chunks. O(1) host work per call.
  m.def(
      "packed_distance(Tensor anchors, Tensor targets, Tensor chunks, "
      "int num_tensors) -> Tensor");
  // CPU int64 offsets (T,), numels (T,): tensor t is elements [offsets[t],
  // offsets[t] + numels[t]) of a set's row. Returns the chunk rows (rows, 3):
  // (tensor, begin, end), at most 2^16 elements each; built once per layout.
  m.def("packed_chunks(Tensor offsets, Tensor numels) -> Tensor");
  // x: (N, C, S), or (N, S, C) when channels_last; shift: float64 (C,), the
  // value subtracted before squaring (near the mean keeps float64 exact), or
  // None: each channel's first element (sample 0, position 0);
  // labels: int64 (N,) in [0, num_classes), or None with num_classes == 1.
  // Returns float64 count (K,) (elements per channel), mean (K, C) and
  // centred sum of squares (K, C) per class; empty classes give zeros.
  m.def(
      "channel_stats(Tensor x, Tensor? shift, Tensor? labels, int num_classes, "
      "bool channels_last) -> (Tensor, Tensor, Tensor)");
  // Raises on request (mode 1: RuntimeError, 2: ValueError, 3: RuntimeError
  // from a worker thread), else returns int64 [0]: errors must reach Python.
  m.def("_self_check(int mode) -> Tensor");
}
