// What the WKV CUDA kernels share (device code only): the compile-time head size N, the chunk
// length of the state checkpoints, bf16/fp32 loads and stores, and the decay exp(-exp(w)).
//
// Included by wkv7_cuda_kernels.cuh and wkv6_cuda_kernels.cuh (after <cuda_bf16.h>, or after
// the tests' CPU-thread shim that stands in for it).

#pragma once

#include <cstddef>

#ifndef WKV_N
#define WKV_N 64
#endif

namespace wkv {

constexpr int N = WKV_N;
constexpr int CHUNK = 16;
static_assert(N % 16 == 0 && N <= 256, "WKV_N must be a multiple of 16, at most 256");

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename F>
__device__ __forceinline__ F from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

__device__ __forceinline__ float decay(float w) { return __expf(-__expf(w)); }

}  // namespace wkv
