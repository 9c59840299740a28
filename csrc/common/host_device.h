// TF_HOST_DEVICE marks the few layout helpers that both the CPU kernels (g++)
// and the CUDA kernels (nvcc device code) call, so each is written once.
#pragma once

#if defined(__CUDACC__)
#define TF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TF_HOST_DEVICE inline
#endif
