// WKV-7 forward and backward on the CPU, fp32, parallel over batch x heads.
//
// Same recurrence as rwkv_peft/ops/wkv7_torch.py. Inputs are (B, T, H, N); the state
// S is (N, N) per (batch, head), indexed [value i, key j]. Per step t:
//     d   = exp(-exp(w_t))
//     sa  = S a_t
//     S   = S diag(d) + sa b_t^T + v_t k_t^T,     y_t = S r_t
// The forward saves S at the start of every CHUNK steps plus sa for every step; the
// backward replays each chunk from its checkpoint (no division by the decay, so any w
// works) and walks it backwards. All inner loops run over the key index j on contiguous
// rows, so they vectorise.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// Plain C entry points on raw contiguous fp32 buffers: the Python side validates shapes,
// dtypes and devices and allocates every output, so this file needs no torch tensor
// headers and builds in seconds. Called through ctypes, which releases the GIL.

namespace {
constexpr int64_t CHUNK = 16;
}  // namespace

extern "C" {

int64_t wkv7_cpu_chunk() { return CHUNK; }

// y (B,T,H,N) and the final state sT (B,H,N,N) from the initial state s0. When ckpt is not
// null, also the state at the start of every chunk, ckpt (B,H,ceil(T/CHUNK),N,N), and
// sa (B,H,T,N) for the backward.
void wkv7_cpu_forward(int64_t B, int64_t T, int64_t H, int64_t N, const float* rp,
                      const float* wp, const float* kp, const float* vp, const float* ap,
                      const float* bp, const float* s0p, float* yp, float* sTp, float* cp,
                      float* sap) {
  const int64_t nchunk = (T + CHUNK - 1) / CHUNK;
  const bool save = cp != nullptr;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> d(N);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bb = bh / H, hh = bh % H;
      float* S = sTp + bh * N * N;  // evolve the state in place in the output
      std::memcpy(S, s0p + bh * N * N, sizeof(float) * N * N);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t off = ((bb * T + t) * H + hh) * N;
        const float *rt = rp + off, *wt = wp + off, *kt = kp + off;
        const float *vt = vp + off, *at = ap + off, *bt = bp + off;
        if (save && t % CHUNK == 0) {
          std::memcpy(cp + (bh * nchunk + t / CHUNK) * N * N, S, sizeof(float) * N * N);
        }
        for (int64_t j = 0; j < N; ++j) d[j] = std::exp(-std::exp(wt[j]));
        for (int64_t i = 0; i < N; ++i) {
          float* Si = S + i * N;
          float sa = 0.f;
#pragma omp simd reduction(+ : sa)
          for (int64_t j = 0; j < N; ++j) sa += Si[j] * at[j];
          const float vi = vt[i];
          float yi = 0.f;
#pragma omp simd reduction(+ : yi)
          for (int64_t j = 0; j < N; ++j) {
            const float s = Si[j] * d[j] + sa * bt[j] + vi * kt[j];
            Si[j] = s;
            yi += s * rt[j];
          }
          yp[off + i] = yi;
          if (save) sap[(bh * T + t) * N + i] = sa;
        }
      }
    }
  });
}

// Gradients of r, w, k, v, a, b and of the initial state (ds0), given dy and the gradient
// of the final state dsT, from the ckpt and sa of a forward run.
void wkv7_cpu_backward(int64_t B, int64_t T, int64_t H, int64_t N, const float* rp,
                       const float* wp, const float* kp, const float* vp, const float* ap,
                       const float* bp, const float* dyp, const float* dsTp, const float* cp,
                       const float* sap, float* drp, float* dwp, float* dkp, float* dvp,
                       float* dap, float* dbp, float* ds0p) {
  const int64_t nchunk = (T + CHUNK - 1) / CHUNK;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> hist(CHUNK * N * N), d(N), gr(N), gk(N), gb(N), gd(N), ga(N);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bb = bh / H, hh = bh % H;
      float* dS = ds0p + bh * N * N;  // gradient of the current state, walked back to ds0
      std::memcpy(dS, dsTp + bh * N * N, sizeof(float) * N * N);
      for (int64_t c = nchunk - 1; c >= 0; --c) {
        const int64_t t0 = c * CHUNK, t1 = std::min(T, t0 + CHUNK);
        // Replay: hist[t - t0] = state before step t.
        std::memcpy(hist.data(), cp + (bh * nchunk + c) * N * N, sizeof(float) * N * N);
        for (int64_t t = t0; t + 1 < t1; ++t) {
          const int64_t off = ((bb * T + t) * H + hh) * N;
          const float *wt = wp + off, *kt = kp + off, *vt = vp + off, *bt = bp + off;
          const float* sat = sap + (bh * T + t) * N;
          const float* Sp = hist.data() + (t - t0) * N * N;
          float* Sn = hist.data() + (t + 1 - t0) * N * N;
          for (int64_t j = 0; j < N; ++j) d[j] = std::exp(-std::exp(wt[j]));
          for (int64_t i = 0; i < N; ++i) {
            const float sai = sat[i], vi = vt[i];
#pragma omp simd
            for (int64_t j = 0; j < N; ++j) {
              Sn[i * N + j] = Sp[i * N + j] * d[j] + sai * bt[j] + vi * kt[j];
            }
          }
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t off = ((bb * T + t) * H + hh) * N;
          const float *rt = rp + off, *wt = wp + off, *kt = kp + off;
          const float *vt = vp + off, *at = ap + off, *bt = bp + off, *dyt = dyp + off;
          const float* sat = sap + (bh * T + t) * N;
          const float* Sp = hist.data() + (t - t0) * N * N;
          for (int64_t j = 0; j < N; ++j) {
            d[j] = std::exp(-std::exp(wt[j]));
            gr[j] = gk[j] = gb[j] = gd[j] = ga[j] = 0.f;
          }
          for (int64_t i = 0; i < N; ++i) {
            const float* Spi = Sp + i * N;
            float* dSi = dS + i * N;
            const float dyi = dyt[i], vi = vt[i], sai = sat[i];
            float gv = 0.f, gsa = 0.f;
#pragma omp simd reduction(+ : gv, gsa)
            for (int64_t j = 0; j < N; ++j) {
              const float s = Spi[j] * d[j] + sai * bt[j] + vi * kt[j];  // state after step t
              gr[j] += dyi * s;
              const float g = dSi[j] + dyi * rt[j];  // dL/dS_t
              gv += g * kt[j];
              gsa += g * bt[j];
              gk[j] += vi * g;
              gb[j] += sai * g;
              gd[j] += g * Spi[j];
              dSi[j] = g;
            }
#pragma omp simd
            for (int64_t j = 0; j < N; ++j) {
              ga[j] += gsa * Spi[j];
              dSi[j] = dSi[j] * d[j] + gsa * at[j];  // dL/dS_{t-1}
            }
            dvp[off + i] = gv;
          }
          for (int64_t j = 0; j < N; ++j) {
            drp[off + j] = gr[j];
            dkp[off + j] = gk[j];
            dbp[off + j] = gb[j];
            dap[off + j] = ga[j];
            // d(decay)/dw = -exp(w) exp(-exp(w)), written so it stays finite for huge w
            dwp[off + j] = -gd[j] * std::exp(wt[j] - std::exp(wt[j]));
          }
        }
      }
    }
  });
}

}  // extern "C"
