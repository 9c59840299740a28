// Pinned host memory for the small per-call metadata a CUDA op uploads,
// kept across calls: a fresh pinned allocation and a tensor copy_ per call
// cost more host time than the kernels of a mid-sized network take to run.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <memory>
#include <vector>

namespace transfer_fast {

// The staging buffers of one host thread for one device. Each buffer is
// reused once the copy that last read it has finished (an event query, no
// wait); while every buffer is still being read, a new one is added, so a
// host thread that runs ahead of the GPU is never stalled.
class PinnedStaging {
 public:
  PinnedStaging() = default;
  PinnedStaging(const PinnedStaging&) = delete;
  PinnedStaging& operator=(const PinnedStaging&) = delete;
  ~PinnedStaging() {
    // Errors are ignored: at process exit the CUDA runtime may be gone first.
    for (Buffer& b : buffers_) {
      if (b.host != nullptr) (void)cudaFreeHost(b.host);
      if (b.copied != nullptr) (void)cudaEventDestroy(b.copied);
    }
  }

  // A pinned buffer of at least `bytes` that no pending copy reads; fill it,
  // then upload() it. Call with the buffer's device current.
  void* acquire(size_t bytes) {
    current_ = nullptr;
    for (Buffer& b : buffers_) {
      const cudaError_t state = cudaEventQuery(b.copied);
      if (state == cudaSuccess) {
        current_ = &b;
        break;
      }
      if (state != cudaErrorNotReady) C10_CUDA_CHECK(state);
      (void)cudaGetLastError();  // "not ready" is left as the last error too: clear it
    }
    if (current_ == nullptr) {
      buffers_.emplace_back();
      current_ = &buffers_.back();
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&current_->copied, cudaEventDisableTiming));
    }
    if (current_->capacity < bytes) {  // doubling: few reallocations for a growing list
      const size_t capacity = bytes > 2 * current_->capacity ? bytes : 2 * current_->capacity;
      if (current_->host != nullptr) C10_CUDA_CHECK(cudaFreeHost(current_->host));
      current_->host = nullptr;
      current_->capacity = 0;
      C10_CUDA_CHECK(cudaHostAlloc(&current_->host, capacity, cudaHostAllocDefault));
      current_->capacity = capacity;
    }
    return current_->host;
  }

  // Enqueues the copy of the acquired buffer's first `bytes` to device memory
  // `dst` on `stream`; the buffer is busy until the stream has done it.
  void upload(void* dst, size_t bytes, cudaStream_t stream) {
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, current_->host, bytes, cudaMemcpyHostToDevice, stream));
    C10_CUDA_CHECK(cudaEventRecord(current_->copied, stream));
  }

 private:
  struct Buffer {
    void* host = nullptr;
    size_t capacity = 0;
    cudaEvent_t copied = nullptr;  // recorded after the last copy that read `host`
  };
  std::vector<Buffer> buffers_;
  Buffer* current_ = nullptr;  // the one acquire() handed out, for upload()
};

// This thread's staging for `device` (thread-local: no lock on the call path).
inline PinnedStaging& pinned_staging(int device) {
  thread_local std::vector<std::unique_ptr<PinnedStaging>> per_device;
  if (device >= static_cast<int>(per_device.size())) per_device.resize(device + 1);
  if (!per_device[device]) per_device[device] = std::make_unique<PinnedStaging>();
  return *per_device[device];
}

}  // namespace transfer_fast
