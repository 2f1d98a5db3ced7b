// WKV-6 CUDA kernels (device code only); see wkv6_cuda.cu for the algorithm and layout.
//
// Included by wkv6_cuda.cu after <cuda_bf16.h>; tests/helpers.py also includes it after
// a small shim that runs each block's threads as CPU threads, so the kernels' indexing,
// barriers and chunk replay are checked against the reference without a GPU.

#pragma once

#include "wkv_cuda_common.cuh"

namespace wkv6 {

using namespace wkv;  // N, CHUNK, to_float, from_float, decay

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

}  // namespace wkv6
