// WKV-6 (RWKV-6; RWKV-5.2 with its decay broadcast) forward and backward on the GPU:
// bf16 or fp32 r, w, k, v; fp32 bonus u and state; any T.
//
// Same recurrence as rwkv_peft/ops/wkv6_torch.py and cuda/wkv6_cpu.cpp. Inputs are
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

#include <cstddef>

#ifndef WKV_N
#define WKV_N 64
#endif

namespace {

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

template <typename F>
__global__ void __launch_bounds__(N) wkv6_forward_kernel(
    int T, int H, const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
    const F* __restrict__ v_, const float* __restrict__ u_, const float* __restrict__ s0_,
    F* __restrict__ y_, float* __restrict__ sT_, float* __restrict__ ckpt_) {
  const int bb = blockIdx.y, hh = blockIdx.x, i = threadIdx.x;
  const size_t bh = static_cast<size_t>(bb) * H + hh;
  const int nchunk = (T + CHUNK - 1) / CHUNK;
  const float ui = u_[hh * N + i];
  __shared__ float r[N], d[N], k[N], uk[N];

  float S[N];  // row i of the state
#pragma unroll
  for (int j = 0; j < N; ++j) S[j] = s0_[(bh * N + i) * N + j];

  for (int t = 0; t < T; ++t) {
    const size_t idx = ((static_cast<size_t>(bb) * T + t) * H + hh) * N + i;
    __syncthreads();
    r[i] = to_float(r_[idx]);
    d[i] = decay(to_float(w_[idx]));
    k[i] = to_float(k_[idx]);
    uk[i] = ui * k[i];
    const float vi = to_float(v_[idx]);
    __syncthreads();
    if (ckpt_ != nullptr && t % CHUNK == 0) {
      float* c = ckpt_ + ((bh * nchunk + t / CHUNK) * N + i) * N;
#pragma unroll
      for (int j = 0; j < N; ++j) c[j] = S[j];
    }
    float y = 0.f, ruk = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      y += S[j] * r[j];
      ruk += r[j] * uk[j];
      S[j] = S[j] * d[j] + vi * k[j];
    }
    y_[idx] = from_float<F>(y + vi * ruk);
  }
#pragma unroll
  for (int j = 0; j < N; ++j) sT_[(bh * N + i) * N + j] = S[j];
}

template <typename F>
__global__ void __launch_bounds__(N) wkv6_backward_kernel(
    int T, int H, const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
    const F* __restrict__ v_, const float* __restrict__ u_, const F* __restrict__ dy_,
    const float* __restrict__ dsT_, const float* __restrict__ ckpt_, float* __restrict__ hist_,
    F* __restrict__ dr_, F* __restrict__ dw_, F* __restrict__ dk_, F* __restrict__ dv_,
    float* __restrict__ du_, float* __restrict__ ds0_) {
  const int bb = blockIdx.y, hh = blockIdx.x, j = threadIdx.x;
  const size_t bh = static_cast<size_t>(bb) * H + hh;
  const int nchunk = (T + CHUNK - 1) / CHUNK;
  __shared__ float r[N], d[N], k[N], v[N], dy[N], u[N];
  // hist[(s * N + i) * N + j]: element [i][j] of the state before step t0 + s of the chunk.
  float* hist = hist_ + bh * CHUNK * N * N;
  u[j] = u_[hh * N + j];

  float dSc[N], dSr[N];  // column j and row j of dL/dS (the state after the current step)
#pragma unroll
  for (int i = 0; i < N; ++i) {
    dSc[i] = dsT_[(bh * N + i) * N + j];
    dSr[i] = dsT_[(bh * N + j) * N + i];
  }
  float gu = 0.f;

  for (int c = nchunk - 1; c >= 0; --c) {
    const int t0 = c * CHUNK, t1 = min(T, t0 + CHUNK);
    // Replay in place in the workspace (thread j only touches column j, so no sync on it).
    const float* c0 = ckpt_ + (bh * nchunk + c) * N * N;
#pragma unroll
    for (int i = 0; i < N; ++i) hist[i * N + j] = c0[i * N + j];
    for (int t = t0; t + 1 < t1; ++t) {
      const size_t idx = ((static_cast<size_t>(bb) * T + t) * H + hh) * N + j;
      __syncthreads();
      v[j] = to_float(v_[idx]);
      __syncthreads();
      const float dj = decay(to_float(w_[idx])), kj = to_float(k_[idx]);
      const float* hp = hist + static_cast<size_t>(t - t0) * N * N;
      float* hn = hist + static_cast<size_t>(t + 1 - t0) * N * N;
#pragma unroll
      for (int i = 0; i < N; ++i) hn[i * N + j] = hp[i * N + j] * dj + v[i] * kj;
    }
    for (int t = t1 - 1; t >= t0; --t) {
      const size_t idx = ((static_cast<size_t>(bb) * T + t) * H + hh) * N + j;
      const float wj = to_float(w_[idx]);
      __syncthreads();
      r[j] = to_float(r_[idx]);
      d[j] = decay(wj);
      k[j] = to_float(k_[idx]);
      v[j] = to_float(v_[idx]);
      dy[j] = to_float(dy_[idx]);
      __syncthreads();
      float dyv = 0.f, ruk = 0.f;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        dyv += dy[i] * v[i];
        ruk += r[i] * u[i] * k[i];
      }
      const float rj = r[j], kj = k[j], dj = d[j], dyj = dy[j];
      float gr = u[j] * kj * dyv, gk = rj * u[j] * dyv, gd = 0.f, gv = dyj * ruk;
      gu += rj * kj * dyv;
      const float* h = hist + static_cast<size_t>(t - t0) * N * N;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float sp = h[i * N + j];
        gr += dy[i] * sp;
        gk += dSc[i] * v[i];
        gd += dSc[i] * sp;
        dSc[i] = dSc[i] * dj + dy[i] * rj;  // column j of dL/dS before step t
      }
#pragma unroll
      for (int i = 0; i < N; ++i) {
        gv += dSr[i] * k[i];
        dSr[i] = dSr[i] * d[i] + dyj * r[i];  // row j of dL/dS before step t
      }
      dr_[idx] = from_float<F>(gr);
      dk_[idx] = from_float<F>(gk);
      dv_[idx] = from_float<F>(gv);
      dw_[idx] = from_float<F>(-gd * __expf(wj - __expf(wj)));
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) ds0_[(bh * N + i) * N + j] = dSc[i];
  du_[bh * N + j] = gu;
}

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
