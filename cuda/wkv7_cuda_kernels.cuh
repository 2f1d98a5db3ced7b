// WKV-7 CUDA kernels (device code only), see wkv7_cuda.cu for the algorithm and layout.
//
// Included by wkv7_cuda.cu after <cuda_bf16.h>; tests/helpers.py also includes it
// after a small shim that runs each block's threads as CPU threads, so the kernels' indexing,
// barriers and chunk replay are checked against the reference without a GPU.

#pragma once

#include "wkv_cuda_common.cuh"

namespace wkv7 {

using namespace wkv;  // N, CHUNK, to_float, from_float, decay

template <typename F>
__global__ void __launch_bounds__(N) wkv7_forward_kernel(
    int T, int H, const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
    const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_,
    const float* __restrict__ s0_, F* __restrict__ y_, float* __restrict__ sT_,
    float* __restrict__ ckpt_, float* __restrict__ sa_) {
  const int bb = blockIdx.y, hh = blockIdx.x, i = threadIdx.x;
  const size_t bh = static_cast<size_t>(bb) * H + hh;
  const int nchunk = (T + CHUNK - 1) / CHUNK;
  __shared__ float r[N], d[N], k[N], a[N], b[N];

  float S[N];  // row i of the state
#pragma unroll
  for (int j = 0; j < N; ++j) S[j] = s0_[(bh * N + i) * N + j];

  for (int t = 0; t < T; ++t) {
    const size_t idx = ((static_cast<size_t>(bb) * T + t) * H + hh) * N + i;
    __syncthreads();
    r[i] = to_float(r_[idx]);
    d[i] = decay(to_float(w_[idx]));
    k[i] = to_float(k_[idx]);
    a[i] = to_float(a_[idx]);
    b[i] = to_float(b_[idx]);
    const float vi = to_float(v_[idx]);
    __syncthreads();
    if (ckpt_ != nullptr && t % CHUNK == 0) {
      float* c = ckpt_ + ((bh * nchunk + t / CHUNK) * N + i) * N;
#pragma unroll
      for (int j = 0; j < N; ++j) c[j] = S[j];
    }
    float sa = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) sa += S[j] * a[j];
    float y = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      S[j] = S[j] * d[j] + sa * b[j] + vi * k[j];
      y += S[j] * r[j];
    }
    y_[idx] = from_float<F>(y);
    if (sa_ != nullptr) sa_[(bh * T + t) * N + i] = sa;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) sT_[(bh * N + i) * N + j] = S[j];
}

template <typename F>
__global__ void __launch_bounds__(N) wkv7_backward_kernel(
    int T, int H, const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
    const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_,
    const F* __restrict__ dy_, const float* __restrict__ dsT_, const float* __restrict__ ckpt_,
    const float* __restrict__ sa_, float* __restrict__ hist_, F* __restrict__ dr_,
    F* __restrict__ dw_, F* __restrict__ dk_, F* __restrict__ dv_, F* __restrict__ da_,
    F* __restrict__ db_, float* __restrict__ ds0_) {
  const int bb = blockIdx.y, hh = blockIdx.x, i = threadIdx.x;
  const size_t bh = static_cast<size_t>(bb) * H + hh;
  const int nchunk = (T + CHUNK - 1) / CHUNK;
  __shared__ float r[N], d[N], k[N], v[N], a[N], b[N], dy[N], sa[N], dsa[N];
  // hist[(s * N + j) * N + i]: element [j][i] of the state before step t0 + s of the chunk.
  float* hist = hist_ + bh * CHUNK * N * N;

  float dS[N], dST[N], Sp[N];  // row i and column i of dL/dS; column i of the state
#pragma unroll
  for (int j = 0; j < N; ++j) {
    dS[j] = dsT_[(bh * N + i) * N + j];
    dST[j] = dsT_[(bh * N + j) * N + i];
  }

  for (int c = nchunk - 1; c >= 0; --c) {
    const int t0 = c * CHUNK, t1 = min(T, t0 + CHUNK);
#pragma unroll
    for (int j = 0; j < N; ++j) Sp[j] = ckpt_[((bh * nchunk + c) * N + j) * N + i];
    for (int t = t0; t < t1; ++t) {  // replay the chunk forward, keeping every state
      const size_t idx = ((static_cast<size_t>(bb) * T + t) * H + hh) * N + i;
      __syncthreads();
      d[i] = decay(to_float(w_[idx]));
      k[i] = to_float(k_[idx]);
      v[i] = to_float(v_[idx]);
      b[i] = to_float(b_[idx]);
      sa[i] = sa_[(bh * T + t) * N + i];
      __syncthreads();
      float* h = hist + static_cast<size_t>(t - t0) * N * N;
#pragma unroll
      for (int j = 0; j < N; ++j) h[j * N + i] = Sp[j];
      if (t + 1 < t1) {
        const float di = d[i], bi = b[i], ki = k[i];
#pragma unroll
        for (int j = 0; j < N; ++j) Sp[j] = Sp[j] * di + sa[j] * bi + v[j] * ki;
      }
    }
    for (int t = t1 - 1; t >= t0; --t) {
      const size_t idx = ((static_cast<size_t>(bb) * T + t) * H + hh) * N + i;
      const float wi = to_float(w_[idx]);
      __syncthreads();
      r[i] = to_float(r_[idx]);
      d[i] = decay(wi);
      k[i] = to_float(k_[idx]);
      v[i] = to_float(v_[idx]);
      a[i] = to_float(a_[idx]);
      b[i] = to_float(b_[idx]);
      dy[i] = to_float(dy_[idx]);
      sa[i] = sa_[(bh * T + t) * N + i];
      __syncthreads();
      const float* h = hist + static_cast<size_t>(t - t0) * N * N;
#pragma unroll
      for (int j = 0; j < N; ++j) Sp[j] = h[j * N + i];
      const float ri = r[i], di = d[i], ki = k[i], ai = a[i], bi = b[i], dyi = dy[i];
      float gr = 0.f, gv = 0.f, gsa = 0.f, gk = 0.f, gb = 0.f, gd = 0.f;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        gr += (Sp[j] * di + sa[j] * bi + v[j] * ki) * dy[j];  // column i of the state after t
        dS[j] += dyi * r[j];  // dL/dS_t gets y_t = S_t r_t
        dST[j] += ri * dy[j];
        gv += dS[j] * k[j];
        gsa += dS[j] * b[j];
        gk += dST[j] * v[j];
        gb += dST[j] * sa[j];
        gd += dST[j] * Sp[j];
      }
      dsa[i] = gsa;
      __syncthreads();
      float ga = 0.f;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        ga += Sp[j] * dsa[j];
        dS[j] = dS[j] * d[j] + gsa * a[j];  // dL/dS_{t-1}
        dST[j] = dST[j] * di + ai * dsa[j];
      }
      dr_[idx] = from_float<F>(gr);
      dk_[idx] = from_float<F>(gk);
      dv_[idx] = from_float<F>(gv);
      da_[idx] = from_float<F>(ga);
      db_[idx] = from_float<F>(gb);
      // d(decay)/dw = -exp(w) exp(-exp(w)), written so it stays finite for huge w
      dw_[idx] = from_float<F>(-gd * __expf(wi - __expf(wi)));
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) ds0_[(bh * N + i) * N + j] = dS[j];
}

}  // namespace wkv7
