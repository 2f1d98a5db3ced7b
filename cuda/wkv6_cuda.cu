// WKV-6 (RWKV-6; RWKV-5.2 with its decay broadcast) forward and backward on the GPU:
// bf16 or fp32 r, w, k, v; fp32 bonus u and state; any T.
//
// Same recurrence as rwkv_peft/ops/wkv6_torch.py and wkv6_cpu.cpp. Inputs are
// (B, T, H, N) with N = WKV_N (compile-time, -DWKV_N=64 by default); u is (H, N); the state
// S is (N, N) per (batch, head), fp32, indexed [value i, key j]. Per step, S before the token:
//     y_t = S r_t + v_t (sum_j r_tj u_j k_tj),     S = S diag(exp(-exp(w_t))) + v_t k_t^T
// One block of N threads per (batch, head).
//
// Forward: thread i holds row i of S in registers; the step needs only the shared vectors
// r, decay, k. The state at the start of every CHUNK steps goes to global memory.
//
// Backward: thread j holds column j of dL/dS (for dr, dk, dw and the state gradient) and
// row j of dL/dS (for dv), so every gradient is a local dot product over shared vectors.
// Each chunk is first replayed from its checkpoint into a per-block workspace (coalesced:
// thread j writes column j), then walked backwards. du comes out per (batch, head); the
// caller sums it over the batch.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "wkv6_cuda_kernels.cuh"

namespace {

using namespace wkv6;

template <typename F>
int launch_forward(int B, int T, int H, const void* r, const void* w, const void* k,
                   const void* v, const float* u, const float* s0, void* y, float* sT,
                   float* ckpt, cudaStream_t stream) {
  wkv6_forward_kernel<F><<<dim3(H, B), dim3(N), 0, stream>>>(
      T, H, static_cast<const F*>(r), static_cast<const F*>(w), static_cast<const F*>(k),
      static_cast<const F*>(v), u, s0, static_cast<F*>(y), sT, ckpt);
  return static_cast<int>(cudaGetLastError());
}

template <typename F>
int launch_backward(int B, int T, int H, const void* r, const void* w, const void* k,
                    const void* v, const float* u, const void* dy, const float* dsT,
                    const float* ckpt, float* hist, void* dr, void* dw, void* dk, void* dv,
                    float* du, float* ds0, cudaStream_t stream) {
  wkv6_backward_kernel<F><<<dim3(H, B), dim3(N), 0, stream>>>(
      T, H, static_cast<const F*>(r), static_cast<const F*>(w), static_cast<const F*>(k),
      static_cast<const F*>(v), u, static_cast<const F*>(dy), dsT, ckpt, hist,
      static_cast<F*>(dr), static_cast<F*>(dw), static_cast<F*>(dk), static_cast<F*>(dv), du,
      ds0);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

int wkv6_cuda_head_size() { return N; }
int wkv6_cuda_chunk() { return CHUNK; }
const char* wkv6_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

// y, the final state sT and (when ckpt is not null) the chunk checkpoints
// ckpt (B,H,ceil(T/CHUNK),N,N). Returns a cudaError_t code.
int wkv6_cuda_forward(int bf16, int B, int T, int H, const void* r, const void* w, const void* k,
                      const void* v, const float* u, const float* s0, void* y, float* sT,
                      float* ckpt, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return bf16 ? launch_forward<__nv_bfloat16>(B, T, H, r, w, k, v, u, s0, y, sT, ckpt, s)
              : launch_forward<float>(B, T, H, r, w, k, v, u, s0, y, sT, ckpt, s);
}

// Gradients of r, w, k, v (input dtype), of u per (batch, head) (du, fp32 (B,H,N)) and of
// the initial state (fp32); hist is a workspace of B*H*CHUNK*N*N floats. Returns a
// cudaError_t code.
int wkv6_cuda_backward(int bf16, int B, int T, int H, const void* r, const void* w,
                       const void* k, const void* v, const float* u, const void* dy,
                       const float* dsT, const float* ckpt, float* hist, void* dr, void* dw,
                       void* dk, void* dv, float* du, float* ds0, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return bf16 ? launch_backward<__nv_bfloat16>(B, T, H, r, w, k, v, u, dy, dsT, ckpt, hist, dr,
                                               dw, dk, dv, du, ds0, s)
              : launch_backward<float>(B, T, H, r, w, k, v, u, dy, dsT, ckpt, hist, dr, dw, dk,
                                       dv, du, ds0, s);
}

}  // extern "C"
