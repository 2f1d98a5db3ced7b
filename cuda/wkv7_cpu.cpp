// WKV-7 forward and backward on the CPU, fp32, parallel over batch x heads.
//
// Same recurrence as rwkv_peft/ops/wkv7_torch.py. Inputs are (B, T, H, N); the state
// S is (N, N) per (batch, head), indexed [value i, key j]. Per step t:
//     d   = exp(-exp(w_t))      (computed by the caller: vectorised exp, and once per step)
//     sa  = S a_t
//     S   = S diag(d) + sa b_t^T + v_t k_t^T,     y_t = S r_t
// The forward saves S at the start of every CHUNK steps plus sa for every step; the
// backward replays each chunk from its checkpoint (no division by the decay, so any w
// works) and walks it backwards. All inner loops run over the key index j on contiguous
// rows (two rows at a time: N must be even), so they vectorise.

#include <ATen/Parallel.h>

#include <algorithm>
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
                      const float* dp, const float* kp, const float* vp, const float* ap,
                      const float* bp, const float* s0p, float* yp, float* sTp, float* cp,
                      float* sap) {
  const int64_t nchunk = (T + CHUNK - 1) / CHUNK;
  const bool save = cp != nullptr;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bb = bh / H, hh = bh % H;
      float* S = sTp + bh * N * N;  // evolve the state in place in the output
      std::memcpy(S, s0p + bh * N * N, sizeof(float) * N * N);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t off = ((bb * T + t) * H + hh) * N;
        const float *rt = rp + off, *d = dp + off, *kt = kp + off;
        const float *vt = vp + off, *at = ap + off, *bt = bp + off;
        if (save && t % CHUNK == 0) {
          std::memcpy(cp + (bh * nchunk + t / CHUNK) * N * N, S, sizeof(float) * N * N);
        }
        for (int64_t i = 0; i < N; i += 2) {  // rows in pairs: N is even
          float *S0 = S + i * N, *S1 = S0 + N;
          float sa0 = 0.f, sa1 = 0.f;
#pragma omp simd reduction(+ : sa0, sa1)
          for (int64_t j = 0; j < N; ++j) {
            sa0 += S0[j] * at[j];
            sa1 += S1[j] * at[j];
          }
          const float v0 = vt[i], v1 = vt[i + 1];
          float y0 = 0.f, y1 = 0.f;
#pragma omp simd reduction(+ : y0, y1)
          for (int64_t j = 0; j < N; ++j) {
            const float s0 = S0[j] * d[j] + sa0 * bt[j] + v0 * kt[j];
            const float s1 = S1[j] * d[j] + sa1 * bt[j] + v1 * kt[j];
            S0[j] = s0;
            S1[j] = s1;
            y0 += s0 * rt[j];
            y1 += s1 * rt[j];
          }
          yp[off + i] = y0;
          yp[off + i + 1] = y1;
          if (save) {
            sap[(bh * T + t) * N + i] = sa0;
            sap[(bh * T + t) * N + i + 1] = sa1;
          }
        }
      }
    }
  });
}

// Gradients of r, d (the decay, not w), k, v, a, b and of the initial state (ds0), given dy
// and the gradient of the final state dsT, from the ckpt and sa of a forward run.
void wkv7_cpu_backward(int64_t B, int64_t T, int64_t H, int64_t N, const float* rp,
                       const float* dp, const float* kp, const float* vp, const float* ap,
                       const float* bp, const float* dyp, const float* dsTp, const float* cp,
                       const float* sap, float* drp, float* ddp, float* dkp, float* dvp,
                       float* dap, float* dbp, float* ds0p) {
  const int64_t nchunk = (T + CHUNK - 1) / CHUNK;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> hist(CHUNK * N * N), u(N), gk(N), gb(N), gd(N), ga(N);
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
          const float *d = dp + off, *kt = kp + off, *vt = vp + off, *bt = bp + off;
          const float* sat = sap + (bh * T + t) * N;
          const float* Sp = hist.data() + (t - t0) * N * N;
          float* Sn = hist.data() + (t + 1 - t0) * N * N;
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
          const float *rt = rp + off, *d = dp + off, *kt = kp + off;
          const float *vt = vp + off, *at = ap + off, *bt = bp + off, *dyt = dyp + off;
          const float* sat = sap + (bh * T + t) * N;
          const float* Sp = hist.data() + (t - t0) * N * N;
          float ysa = 0.f, yv = 0.f;  // sa . dy and v . dy, for dr
          for (int64_t i = 0; i < N; ++i) {
            ysa += sat[i] * dyt[i];
            yv += vt[i] * dyt[i];
          }
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) u[j] = gk[j] = gb[j] = gd[j] = ga[j] = 0.f;
          for (int64_t i = 0; i < N; i += 2) {  // rows in pairs: N is even
            const float *Sp0 = Sp + i * N, *Sp1 = Sp0 + N;
            float *dS0 = dS + i * N, *dS1 = dS0 + N;
            const float dy0 = dyt[i], dy1 = dyt[i + 1], v0 = vt[i], v1 = vt[i + 1];
            const float sa0 = sat[i], sa1 = sat[i + 1];
            float gv0 = 0.f, gv1 = 0.f, gsa0 = 0.f, gsa1 = 0.f;
#pragma omp simd reduction(+ : gv0, gv1, gsa0, gsa1)
            for (int64_t j = 0; j < N; ++j) {
              const float g0 = dS0[j] + dy0 * rt[j];  // dL/dS_t, y_t = S_t r_t added
              const float g1 = dS1[j] + dy1 * rt[j];
              dS0[j] = g0;
              dS1[j] = g1;
              gv0 += g0 * kt[j];
              gv1 += g1 * kt[j];
              gsa0 += g0 * bt[j];
              gsa1 += g1 * bt[j];
              u[j] += dy0 * Sp0[j] + dy1 * Sp1[j];
              gk[j] += v0 * g0 + v1 * g1;
              gb[j] += sa0 * g0 + sa1 * g1;
              gd[j] += g0 * Sp0[j] + g1 * Sp1[j];
            }
#pragma omp simd
            for (int64_t j = 0; j < N; ++j) {
              ga[j] += gsa0 * Sp0[j] + gsa1 * Sp1[j];
              dS0[j] = dS0[j] * d[j] + gsa0 * at[j];  // dL/dS_{t-1}
              dS1[j] = dS1[j] * d[j] + gsa1 * at[j];
            }
            dvp[off + i] = gv0;
            dvp[off + i + 1] = gv1;
          }
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            // S_t = S_{t-1} diag(d) + sa b^T + v k^T, so dr = S_t^T dy splits into three terms
            drp[off + j] = d[j] * u[j] + bt[j] * ysa + kt[j] * yv;
            dkp[off + j] = gk[j];
            dbp[off + j] = gb[j];
            dap[off + j] = ga[j];
            ddp[off + j] = gd[j];
          }
        }
      }
    }
  });
}

}  // extern "C"
