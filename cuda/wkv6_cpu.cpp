// WKV-6 (RWKV-6 "Finch"; RWKV-5.2 with a time-invariant decay) forward and backward on
// the CPU, fp32 compute (fp32 or bf16 in and out), parallel over batch x heads.
//
// Same recurrence as rwkv_peft/ops/wkv6_torch.py. Inputs r, w, k, v are (B, T, H, N), the
// bonus u is (H, N); the state S is (N, N) per (batch, head), indexed [value i, key j].
// Per step t, with S the state before the token:
//     y_t = S r_t + v_t (sum_j r_tj u_j k_tj)
//     S   = S diag(exp(-exp(w_t))) + v_t k_t^T
// The forward saves S at the start of every CHUNK steps; the backward replays each chunk
// from its checkpoint (no division by the decay, so any w works) and walks it backwards.
// Inner loops run over the key index j on contiguous rows, so they vectorise.
//
// Plain C entry points on raw contiguous buffers, called through ctypes; the Python side
// (rwkv_peft/ops/wkv6_cpu.py) validates shapes and allocates every output. r, w, k, v, y, dy
// and their gradients are fp32 or bf16 (In), widened into fp32 rows once per step; u, du and
// the states are fp32.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {
constexpr int64_t CHUNK = 16;
using bf16 = uint16_t;  // the bits of a bfloat16: the top half of an fp32

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
void forward(int64_t B, int64_t T, int64_t H, int64_t N, const In* rp, const In* wp, const In* kp,
             const In* vp, const float* up, const float* s0p, In* yp, float* sTp, float* cp) {
  const int64_t nchunk = (T + CHUNK - 1) / CHUNK;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> d(N), buf(4 * N);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bb = bh / H, hh = bh % H;
      const float* u = up + hh * N;
      float* S = sTp + bh * N * N;  // evolve the state in place in the output
      std::memcpy(S, s0p + bh * N * N, sizeof(float) * N * N);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t off = ((bb * T + t) * H + hh) * N;
        const float *rt = row(rp + off, buf.data(), N), *wt = row(wp + off, buf.data() + N, N);
        const float *kt = row(kp + off, buf.data() + 2 * N, N), *vt = row(vp + off, buf.data() + 3 * N, N);
        if (cp != nullptr && t % CHUNK == 0) {
          std::memcpy(cp + (bh * nchunk + t / CHUNK) * N * N, S, sizeof(float) * N * N);
        }
        float ruk = 0.f;  // the current token's weight through the bonus
        for (int64_t j = 0; j < N; ++j) {
          d[j] = std::exp(-std::exp(wt[j]));
          ruk += rt[j] * u[j] * kt[j];
        }
        for (int64_t i = 0; i < N; ++i) {
          float* Si = S + i * N;
          const float vi = vt[i];
          float yi = 0.f;
#pragma omp simd reduction(+ : yi)
          for (int64_t j = 0; j < N; ++j) {
            yi += Si[j] * rt[j];
            Si[j] = Si[j] * d[j] + vi * kt[j];
          }
          yp[off + i] = narrow<In>(yi + vi * ruk);
        }
      }
    }
  });
}

template <typename In>
void backward(int64_t B, int64_t T, int64_t H, int64_t N, const In* rp, const In* wp, const In* kp,
              const In* vp, const float* up, const In* dyp, const float* dsTp, const float* cp, In* drp,
              In* dwp, In* dkp, In* dvp, float* dup, float* ds0p) {
  const int64_t nchunk = (T + CHUNK - 1) / CHUNK;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> hist(CHUNK * N * N), d(N), gr(N), gk(N), gd(N), gu(N), buf(5 * N);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bb = bh / H, hh = bh % H;
      const float* u = up + hh * N;
      float* dS = ds0p + bh * N * N;  // dL/dS after the current step, walked back to ds0
      std::memcpy(dS, dsTp + bh * N * N, sizeof(float) * N * N);
      std::fill(gu.begin(), gu.end(), 0.f);
      for (int64_t c = nchunk - 1; c >= 0; --c) {
        const int64_t t0 = c * CHUNK, t1 = std::min(T, t0 + CHUNK);
        // Replay: hist[t - t0] = state before step t.
        std::memcpy(hist.data(), cp + (bh * nchunk + c) * N * N, sizeof(float) * N * N);
        for (int64_t t = t0; t + 1 < t1; ++t) {
          const int64_t off = ((bb * T + t) * H + hh) * N;
          const float *wt = row(wp + off, buf.data(), N), *kt = row(kp + off, buf.data() + N, N);
          const float* vt = row(vp + off, buf.data() + 2 * N, N);
          const float* Sp = hist.data() + (t - t0) * N * N;
          float* Sn = hist.data() + (t + 1 - t0) * N * N;
          for (int64_t j = 0; j < N; ++j) d[j] = std::exp(-std::exp(wt[j]));
          for (int64_t i = 0; i < N; ++i) {
            const float vi = vt[i];
#pragma omp simd
            for (int64_t j = 0; j < N; ++j) Sn[i * N + j] = Sp[i * N + j] * d[j] + vi * kt[j];
          }
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t off = ((bb * T + t) * H + hh) * N;
          const float *rt = row(rp + off, buf.data(), N), *wt = row(wp + off, buf.data() + N, N);
          const float *kt = row(kp + off, buf.data() + 2 * N, N), *vt = row(vp + off, buf.data() + 3 * N, N);
          const float* dyt = row(dyp + off, buf.data() + 4 * N, N);
          const float* Sp = hist.data() + (t - t0) * N * N;
          float dyv = 0.f, ruk = 0.f;
          for (int64_t i = 0; i < N; ++i) dyv += dyt[i] * vt[i];
          for (int64_t j = 0; j < N; ++j) {
            d[j] = std::exp(-std::exp(wt[j]));
            ruk += rt[j] * u[j] * kt[j];
            gr[j] = u[j] * kt[j] * dyv;
            gk[j] = rt[j] * u[j] * dyv;
            gu[j] += rt[j] * kt[j] * dyv;
            gd[j] = 0.f;
          }
          for (int64_t i = 0; i < N; ++i) {
            const float* Spi = Sp + i * N;
            float* dSi = dS + i * N;
            const float dyi = dyt[i], vi = vt[i];
            float gv = 0.f;
#pragma omp simd reduction(+ : gv)
            for (int64_t j = 0; j < N; ++j) {
              gr[j] += dyi * Spi[j];
              gk[j] += dSi[j] * vi;
              gv += dSi[j] * kt[j];
              gd[j] += dSi[j] * Spi[j];
              dSi[j] = dSi[j] * d[j] + dyi * rt[j];  // dL/dS before step t
            }
            dvp[off + i] = narrow<In>(gv + dyi * ruk);
          }
          for (int64_t j = 0; j < N; ++j) {
            drp[off + j] = narrow<In>(gr[j]);
            dkp[off + j] = narrow<In>(gk[j]);
            // d(decay)/dw = -exp(w) exp(-exp(w)), written so it stays finite for huge w
            dwp[off + j] = narrow<In>(-gd[j] * std::exp(wt[j] - std::exp(wt[j])));
          }
        }
      }
      std::memcpy(dup + bh * N, gu.data(), sizeof(float) * N);
    }
  });
}

}  // namespace

extern "C" {

int64_t wkv6_cpu_chunk() { return CHUNK; }

// y (B,T,H,N) and the final state sT (B,H,N,N) from s0. When ckpt is not null, also the
// state at the start of every chunk, ckpt (B,H,ceil(T/CHUNK),N,N), for the backward.
// is_bf16: r, w, k, v and y are bf16 (else fp32).
void wkv6_cpu_forward(int64_t is_bf16, int64_t B, int64_t T, int64_t H, int64_t N, const void* r,
                      const void* w, const void* k, const void* v, const float* u, const float* s0,
                      void* y, float* sT, float* ckpt) {
  if (is_bf16) {
    using P = const bf16*;
    forward<bf16>(B, T, H, N, P(r), P(w), P(k), P(v), u, s0, static_cast<bf16*>(y), sT, ckpt);
  } else {
    using P = const float*;
    forward<float>(B, T, H, N, P(r), P(w), P(k), P(v), u, s0, static_cast<float*>(y), sT, ckpt);
  }
}

// Gradients of r, w, k, v, of u per batch element (du, (B,H,N) fp32; the caller sums over B)
// and of the initial state (ds0), given dy and the gradient of the final state dsT.
void wkv6_cpu_backward(int64_t is_bf16, int64_t B, int64_t T, int64_t H, int64_t N, const void* r,
                       const void* w, const void* k, const void* v, const float* u, const void* dy,
                       const float* dsT, const float* ckpt, void* dr, void* dw, void* dk, void* dv,
                       float* du, float* ds0) {
  if (is_bf16) {
    using P = const bf16*;
    using Q = bf16*;
    backward<bf16>(B, T, H, N, P(r), P(w), P(k), P(v), u, P(dy), dsT, ckpt, Q(dr), Q(dw), Q(dk), Q(dv), du, ds0);
  } else {
    using P = const float*;
    using Q = float*;
    backward<float>(B, T, H, N, P(r), P(w), P(k), P(v), u, P(dy), dsT, ckpt, Q(dr), Q(dw), Q(dk), Q(dv), du,
                    ds0);
  }
}

}  // extern "C"
