// WKV-7 forward and backward on the GPU: bf16 or fp32 inputs, fp32 state, any T.
//
// Same recurrence as rwkv_peft/ops/wkv7_torch.py and wkv7_cpu.cpp. Inputs are
// (B, T, H, N) with N = WKV_N (compile-time, -DWKV_N=64 by default); the state S is (N, N)
// per (batch, head), fp32, indexed [value i, key j]:
//     d = exp(-exp(w_t)),  sa = S a_t,  S = S diag(d) + sa b_t^T + v_t k_t^T,  y_t = S r_t
// One block of N threads per (batch, head).
//
// Forward: thread i holds row i of S in registers; every step needs only the shared
// vectors r, d, k, a, b. The state at the start of every CHUNK steps and sa of every step
// go to global memory for the backward.
//
// Backward: thread i holds column i of the state before the step (Sp), row i of dL/dS (dS)
// and column i of dL/dS (dST), so every gradient is a local dot product; only sa (saved)
// and dsa (shared) cross threads. Each chunk is first replayed from its checkpoint into a
// per-block workspace (no division by the decay, so any w works), then walked backwards.
// The initial state comes in and the final state goes out, both with gradients.
//
// The host entry points are plain C on raw device pointers; rwkv_peft/ops/wkv7_cuda.py
// validates inputs, allocates outputs and passes the current stream.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "wkv7_cuda_kernels.cuh"

namespace {

using wkv7::CHUNK;
using wkv7::N;

template <typename F>
int launch_forward(int B, int T, int H, const void* r, const void* w, const void* k,
                   const void* v, const void* a, const void* b, const float* s0, void* y,
                   float* sT, float* ckpt, float* sa, cudaStream_t stream) {
  wkv7::wkv7_forward_kernel<F><<<dim3(H, B), dim3(N), 0, stream>>>(
      T, H, static_cast<const F*>(r), static_cast<const F*>(w), static_cast<const F*>(k),
      static_cast<const F*>(v), static_cast<const F*>(a), static_cast<const F*>(b), s0,
      static_cast<F*>(y), sT, ckpt, sa);
  return static_cast<int>(cudaGetLastError());
}

template <typename F>
int launch_backward(int B, int T, int H, const void* r, const void* w, const void* k,
                    const void* v, const void* a, const void* b, const void* dy,
                    const float* dsT, const float* ckpt, const float* sa, float* hist, void* dr,
                    void* dw, void* dk, void* dv, void* da, void* db, float* ds0,
                    cudaStream_t stream) {
  wkv7::wkv7_backward_kernel<F><<<dim3(H, B), dim3(N), 0, stream>>>(
      T, H, static_cast<const F*>(r), static_cast<const F*>(w), static_cast<const F*>(k),
      static_cast<const F*>(v), static_cast<const F*>(a), static_cast<const F*>(b),
      static_cast<const F*>(dy), dsT, ckpt, sa, hist, static_cast<F*>(dr), static_cast<F*>(dw),
      static_cast<F*>(dk), static_cast<F*>(dv), static_cast<F*>(da), static_cast<F*>(db), ds0);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

int wkv7_cuda_head_size() { return N; }
int wkv7_cuda_chunk() { return CHUNK; }
const char* wkv7_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

// y, the final state sT, and (when ckpt is not null) the chunk checkpoints
// ckpt (B,H,ceil(T/CHUNK),N,N) and sa (B,H,T,N). Returns a cudaError_t code.
int wkv7_cuda_forward(int bf16, int B, int T, int H, const void* r, const void* w, const void* k,
                      const void* v, const void* a, const void* b, const float* s0, void* y,
                      float* sT, float* ckpt, float* sa, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return bf16 ? launch_forward<__nv_bfloat16>(B, T, H, r, w, k, v, a, b, s0, y, sT, ckpt, sa, s)
              : launch_forward<float>(B, T, H, r, w, k, v, a, b, s0, y, sT, ckpt, sa, s);
}

// Gradients of r..b (input dtype) and of the initial state (fp32); hist is a workspace of
// B*H*CHUNK*N*N floats. Returns a cudaError_t code.
int wkv7_cuda_backward(int bf16, int B, int T, int H, const void* r, const void* w,
                       const void* k, const void* v, const void* a, const void* b,
                       const void* dy, const float* dsT, const float* ckpt, const float* sa,
                       float* hist, void* dr, void* dw, void* dk, void* dv, void* da, void* db,
                       float* ds0, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return bf16 ? launch_backward<__nv_bfloat16>(B, T, H, r, w, k, v, a, b, dy, dsT, ckpt, sa,
                                               hist, dr, dw, dk, dv, da, db, ds0, s)
              : launch_backward<float>(B, T, H, r, w, k, v, a, b, dy, dsT, ckpt, sa, hist, dr,
                                       dw, dk, dv, da, db, ds0, s);
}

}  // extern "C"
