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
#include <type_traits>
#include <vector>

// Plain C entry points on raw contiguous buffers: the Python side validates shapes, dtypes
// and devices and allocates every output, so this file needs no torch tensor headers and
// builds in seconds. Called through ctypes, which releases the GIL. r, k, v, a, b, y, dy and
// their gradients are fp32 or bf16 (In); the decay d, the states, sa and dd are always fp32.
// A bf16 step is widened into fp32 rows once (N values each), so the inner loops are the
// fp32 ones and the caller needs no conversion passes over whole tensors.

namespace {
constexpr int64_t CHUNK = 16;
using bf16 = uint16_t;  // the bits of a bfloat16: the top half of an fp32

inline float widen(float x) { return x; }
inline float widen(bf16 x) {
  const uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename In>
In narrow(float x);
template <>
inline float narrow<float>(float x) { return x; }
template <>
inline bf16 narrow<bf16>(float x) {  // round to nearest even, as torch's .bfloat16()
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16((u >> 16) | 0x40u);  // NaN stays NaN
  return bf16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The n values at p as fp32: p itself for fp32 input, else widened into buf.
template <typename In>
const float* row(const In* p, float* buf, int64_t n) {
  if constexpr (std::is_same_v<In, float>) {
    return p;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = widen(p[j]);
    return buf;
  }
}

template <typename In>
void forward(int64_t B, int64_t T, int64_t H, int64_t N, const In* rp, const float* dp,
             const In* kp, const In* vp, const In* ap, const In* bp, const float* s0p, In* yp,
             float* sTp, float* cp, float* sap) {
  const int64_t nchunk = (T + CHUNK - 1) / CHUNK;
  const bool save = cp != nullptr;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(5 * N);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bb = bh / H, hh = bh % H;
      float* S = sTp + bh * N * N;  // evolve the state in place in the output
      std::memcpy(S, s0p + bh * N * N, sizeof(float) * N * N);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t off = ((bb * T + t) * H + hh) * N;
        const float* d = dp + off;
        const float *rt = row(rp + off, buf.data(), N), *kt = row(kp + off, buf.data() + N, N);
        const float *vt = row(vp + off, buf.data() + 2 * N, N), *at = row(ap + off, buf.data() + 3 * N, N);
        const float* bt = row(bp + off, buf.data() + 4 * N, N);
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
          yp[off + i] = narrow<In>(y0);
          yp[off + i + 1] = narrow<In>(y1);
          if (save) {
            sap[(bh * T + t) * N + i] = sa0;
            sap[(bh * T + t) * N + i + 1] = sa1;
          }
        }
      }
    }
  });
}

template <typename In>
void backward(int64_t B, int64_t T, int64_t H, int64_t N, const In* rp, const float* dp,
              const In* kp, const In* vp, const In* ap, const In* bp, const In* dyp,
              const float* dsTp, const float* cp, const float* sap, In* drp, float* ddp, In* dkp,
              In* dvp, In* dap, In* dbp, float* ds0p) {
  const int64_t nchunk = (T + CHUNK - 1) / CHUNK;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> hist(CHUNK * N * N), u(N), gk(N), gb(N), gd(N), ga(N), buf(6 * N);
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
          const float* d = dp + off;
          const float *kt = row(kp + off, buf.data(), N), *vt = row(vp + off, buf.data() + N, N);
          const float* bt = row(bp + off, buf.data() + 2 * N, N);
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
          const float* d = dp + off;
          const float *rt = row(rp + off, buf.data(), N), *kt = row(kp + off, buf.data() + N, N);
          const float *vt = row(vp + off, buf.data() + 2 * N, N), *at = row(ap + off, buf.data() + 3 * N, N);
          const float *bt = row(bp + off, buf.data() + 4 * N, N), *dyt = row(dyp + off, buf.data() + 5 * N, N);
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
            dvp[off + i] = narrow<In>(gv0);
            dvp[off + i + 1] = narrow<In>(gv1);
          }
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            // S_t = S_{t-1} diag(d) + sa b^T + v k^T, so dr = S_t^T dy splits into three terms
            drp[off + j] = narrow<In>(d[j] * u[j] + bt[j] * ysa + kt[j] * yv);
            dkp[off + j] = narrow<In>(gk[j]);
            dbp[off + j] = narrow<In>(gb[j]);
            dap[off + j] = narrow<In>(ga[j]);
            ddp[off + j] = gd[j];
          }
        }
      }
    }
  });
}

}  // namespace

extern "C" {

int64_t wkv7_cpu_chunk() { return CHUNK; }

// y (B,T,H,N) and the final state sT (B,H,N,N) from the initial state s0. When ckpt is not
// null, also the state at the start of every chunk, ckpt (B,H,ceil(T/CHUNK),N,N), and
// sa (B,H,T,N) for the backward. is_bf16: r, k, v, a, b and y are bf16 (else fp32).
void wkv7_cpu_forward(int64_t is_bf16, int64_t B, int64_t T, int64_t H, int64_t N,
                      const void* r, const float* d, const void* k, const void* v, const void* a,
                      const void* b, const float* s0, void* y, float* sT, float* ckpt, float* sa) {
  if (is_bf16) {
    forward<bf16>(B, T, H, N, static_cast<const bf16*>(r), d, static_cast<const bf16*>(k),
                  static_cast<const bf16*>(v), static_cast<const bf16*>(a), static_cast<const bf16*>(b),
                  s0, static_cast<bf16*>(y), sT, ckpt, sa);
  } else {
    forward<float>(B, T, H, N, static_cast<const float*>(r), d, static_cast<const float*>(k),
                   static_cast<const float*>(v), static_cast<const float*>(a), static_cast<const float*>(b),
                   s0, static_cast<float*>(y), sT, ckpt, sa);
  }
}

// Gradients of r, d (the decay, not w; fp32), k, v, a, b and of the initial state (ds0),
// given dy and the gradient of the final state dsT, from the ckpt and sa of a forward run.
void wkv7_cpu_backward(int64_t is_bf16, int64_t B, int64_t T, int64_t H, int64_t N,
                       const void* r, const float* d, const void* k, const void* v, const void* a,
                       const void* b, const void* dy, const float* dsT, const float* ckpt,
                       const float* sa, void* dr, float* dd, void* dk, void* dv, void* da, void* db,
                       float* ds0) {
  if (is_bf16) {
    using P = const bf16*;
    backward<bf16>(B, T, H, N, P(r), d, P(k), P(v), P(a), P(b), P(dy), dsT, ckpt, sa,
                   static_cast<bf16*>(dr), dd, static_cast<bf16*>(dk), static_cast<bf16*>(dv),
                   static_cast<bf16*>(da), static_cast<bf16*>(db), ds0);
  } else {
    using P = const float*;
    backward<float>(B, T, H, N, P(r), d, P(k), P(v), P(a), P(b), P(dy), dsT, ckpt, sa,
                    static_cast<float*>(dr), dd, static_cast<float*>(dk), static_cast<float*>(dv),
                    static_cast<float*>(da), static_cast<float*>(db), ds0);
  }
}

}  // extern "C"
