// One-token decode steps of RWKV-7 (x070) on the CPU: a whole block per call, and the output head.
//
// Decoding one token reads every weight once and does little else, so it is bound by memory
// bandwidth; what costs beyond that is overhead: ~50 small torch ops per block, each with its
// dispatch, allocation and thread start-up. Here a block is one call: the element-wise work runs
// in plain loops on (B, C) rows, every matrix-vector product is one parallel pass over the weight
// rows (each row read once for all B sequences), and the WKV state is updated in place of a copy.
// The math is rwkv_peft/model/rwkv7.py's for T = 1 (same formulas, fp32 accumulation), with the
// decay written as exp(-e^-0.5 sigmoid(z)) = exp(-exp(-softplus(-z) - 0.5)).
//
// Matrices are (out, in) row-major, fp32 or bf16 (widened to fp32 as they are read); every vector
// and state is fp32. Plain C entry points on raw buffers, called through ctypes (GIL released).

#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using bf16 = uint16_t;  // the bits of a bfloat16: the top half of an fp32

// The order of a block's tensors in the pointer table (rwkv_peft/model/decode.py: BLOCK_TENSORS).
enum Tensor {
  LN0_W, LN0_B, LN1_W, LN1_B, LN2_W, LN2_B,
  X_R, X_W, X_K, X_V, X_A, X_G, W0, A0, V0, K_K, K_A, R_K,
  W1, W2, A1, A2, V1, V2, G1, G2,  // low-rank paths, transposed to (out, in)
  WR, WK, WV, WO, LNX_W, LNX_B, FX_K, FK, FV,
  N_TENSORS
};

// dims: B, C, H, N, F (ffn width), d_decay, d_aaa, d_mv, d_gate, has_ln0, has_vres, bf16
enum Dim { B_, C_, H_, N_, F_, DW, DA, DV, DG, HAS_LN0, HAS_VRES, IS_BF16, N_DIMS };

inline float widen(float x) { return x; }
inline float widen(bf16 x) {
  const uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Dot products of a weight row with an fp32 vector. With AVX-512: two 16-lane accumulators, the
// same order for fp32 and bf16 rows (a bf16 row widened by a shift), so a bf16 model's step is
// the fp32 step of its rounded weights bit for bit; else plain loops the compiler vectorises.
#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}

template <typename Wt>
inline float dot(const Wt* w, const float* x, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm512_fmadd_ps(load16(w + i), _mm512_loadu_ps(x + i), acc0);
    acc1 = _mm512_fmadd_ps(load16(w + i + 16), _mm512_loadu_ps(x + i + 16), acc1);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; i < n; ++i) s += widen(w[i]) * x[i];
  return s;
}
#else
template <typename Wt>
inline float dot(const Wt* w, const float* x, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += widen(w[i]) * x[i];
  return s;
}
#endif

// Y (B, out) = X (B, in) @ W^T, or Y += it; W (out, in). Parallel over rows of W, each read once
// from memory for all B sequences.
template <typename Wt>
void matvec(const Wt* W, const float* X, float* Y, int64_t B, int64_t in, int64_t out, bool add) {
  // threads only for work worth waking them: ~256 KiB of weights (or rows x sequences) per chunk
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (in * int64_t(sizeof(Wt)) * B));
  at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t b = 0; b < B; ++b) {
        const float y = dot(W + o * in, X + b * in, in);
        Y[b * out + o] = add ? Y[b * out + o] + y : y;
      }
    }
  });
}

void mv(const int64_t* d, const void* W, const float* X, float* Y, int64_t in, int64_t out, bool add = false) {
  if (d[IS_BF16]) {
    matvec(static_cast<const bf16*>(W), X, Y, d[B_], in, out, add);
  } else {
    matvec(static_cast<const float*>(W), X, Y, d[B_], in, out, add);
  }
}

// out = layernorm(x) * w + b over n values (eps 1e-5, nn.LayerNorm's default)
void layer_norm(const float* x, const float* w, const float* b, float* out, int64_t n, float eps = 1e-5f) {
  float mean = 0.f, var = 0.f;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= float(n);
  for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.f / std::sqrt(var / float(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * inv * w[i] + b[i];
}

inline float sigmoid(float z) { return 1.f / (1.f + std::exp(-z)); }

// The WKV step of one (sequence, head): S = S diag(decay) + (S a) b^T + v k^T, y = S r; S is
// [value i][key j], a = -kk, b = kk * iclr.
void wkv_head(const float* S0, float* S, const float* r, const float* decay, const float* k,
              const float* v, const float* kk, const float* iclr, float* y, int64_t N) {
  for (int64_t i = 0; i < N; ++i) {
    const float* s0 = S0 + i * N;
    float* s = S + i * N;
    float sa = 0.f;
#pragma omp simd reduction(+ : sa)
    for (int64_t j = 0; j < N; ++j) sa -= s0[j] * kk[j];
    float acc = 0.f;
    const float vi = v[i];
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < N; ++j) {
      const float sn = s0[j] * decay[j] + sa * kk[j] * iclr[j] + vi * k[j];
      s[j] = sn;
      acc += sn * r[j];
    }
    y[i] = acc;
  }
}

}  // namespace

extern "C" {

int64_t rwkv7_decode_n_tensors() { return N_TENSORS; }

// One block for B tokens (one per sequence). x (B, C): the residual stream, updated in place;
// v_first (B, C): written by the block with has_vres = 0's layer 0 (read by later blocks);
// states in -> out (may not alias): att shift (B, C), wkv (B, H, N, N), ffn shift (B, C);
// work: B * (17 C + F + d_decay + d_aaa + d_mv + d_gate) floats.
void rwkv7_decode_block(const int64_t* d, const void* const* t, float* x, float* v_first,
                        const float* att_in, float* att_out, const float* wkv_in, float* wkv_out,
                        const float* ffn_in, float* ffn_out, float* work) {
  const int64_t B = d[B_], C = d[C_], H = d[H_], N = d[N_], F = d[F_];
  auto vec = [&](Tensor i) { return static_cast<const float*>(t[i]); };
  float* p = work;
  auto take = [&](int64_t n) { float* q = p; p += B * n; return q; };
  float *xn = take(C), *xr = take(C), *xw = take(C), *xk = take(C), *xv = take(C), *xa = take(C);
  float *xg = take(C), *r = take(C), *k = take(C), *v = take(C), *w = take(C), *a = take(C);
  float *g = take(C), *kk = take(C), *y = take(C), *lw = take(d[DW]), *la = take(d[DA]);
  float *lv = take(d[DV]), *lg = take(d[DG]), *fk = take(F);
  float* tmp = take(C);

  // time mix: token shift and the six interpolations
  for (int64_t b = 0; b < B; ++b) {
    float* xb = x + b * C;
    if (d[HAS_LN0]) layer_norm(xb, vec(LN0_W), vec(LN0_B), xb, C);
    float* n = xn + b * C;
    layer_norm(xb, vec(LN1_W), vec(LN1_B), n, C);
    const float* prev = att_in + b * C;
    for (int64_t c = 0; c < C; ++c) {
      const float xx = prev[c] - n[c];
      xr[b * C + c] = n[c] + xx * vec(X_R)[c];
      xw[b * C + c] = n[c] + xx * vec(X_W)[c];
      xk[b * C + c] = n[c] + xx * vec(X_K)[c];
      xv[b * C + c] = n[c] + xx * vec(X_V)[c];
      xa[b * C + c] = n[c] + xx * vec(X_A)[c];
      xg[b * C + c] = n[c] + xx * vec(X_G)[c];
    }
    std::memcpy(att_out + b * C, n, sizeof(float) * C);
  }
  mv(d, t[WR], xr, r, C, C);
  mv(d, t[WK], xk, k, C, C);
  mv(d, t[WV], xv, v, C, C);
  mv(d, t[W1], xw, lw, C, d[DW]);
  for (int64_t i = 0; i < B * d[DW]; ++i) lw[i] = std::tanh(lw[i]);
  mv(d, t[W2], lw, w, d[DW], C);
  mv(d, t[A1], xa, la, C, d[DA]);
  mv(d, t[A2], la, a, d[DA], C);
  mv(d, t[G1], xg, lg, C, d[DG]);
  for (int64_t i = 0; i < B * d[DG]; ++i) lg[i] = sigmoid(lg[i]);
  mv(d, t[G2], lg, g, d[DG], C);
  if (d[HAS_VRES]) {
    mv(d, t[V1], xv, lv, C, d[DV]);
    mv(d, t[V2], lv, tmp, d[DV], C);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = b * C + c;
        v[i] += (v_first[i] - v[i]) * sigmoid(vec(V0)[c] + tmp[i]);
      }
    }
  } else {
    std::memcpy(v_first, v, sizeof(float) * B * C);
  }
  const float e_half = std::exp(-0.5f);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = b * C + c;
      w[i] = std::exp(-e_half * sigmoid(vec(W0)[c] + w[i]));  // the decay
      a[i] = sigmoid(vec(A0)[c] + a[i]);
      kk[i] = k[i] * vec(K_K)[c];
      k[i] = k[i] * (1.f + (a[i] - 1.f) * vec(K_A)[c]);
    }
    for (int64_t h = 0; h < H; ++h) {  // kk normalised per head (F.normalize, eps 1e-12)
      float* q = kk + b * C + h * N;
      const float norm = std::sqrt(dot(q, q, N));
      const float inv = 1.f / std::max(norm, 1e-12f);
      for (int64_t j = 0; j < N; ++j) q[j] *= inv;
    }
  }
  at::parallel_for(0, B * H, std::max<int64_t>(1, 65536 / (N * N)), [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {  // threads from 16 heads of 64 up
      const int64_t off = (bh / H) * C + (bh % H) * N;
      wkv_head(wkv_in + bh * N * N, wkv_out + bh * N * N, r + off, w + off, k + off, v + off, kk + off,
               a + off, y + off, N);
    }
  });
  for (int64_t b = 0; b < B; ++b) {  // ln_x (a group norm per head), the r.k bonus, the gate
    for (int64_t h = 0; h < H; ++h) {
      const int64_t off = b * C + h * N;
      float mean = 0.f, var = 0.f;
      for (int64_t j = 0; j < N; ++j) mean += y[off + j];
      mean /= float(N);
      for (int64_t j = 0; j < N; ++j) var += (y[off + j] - mean) * (y[off + j] - mean);
      const float inv = 1.f / std::sqrt(var / float(N) + 64e-5f);
      float bonus = 0.f;
      for (int64_t j = 0; j < N; ++j) bonus += r[off + j] * k[off + j] * vec(R_K)[h * N + j];
      for (int64_t j = 0; j < N; ++j) {
        const int64_t c = h * N + j;
        const float yn = (y[off + j] - mean) * inv * vec(LNX_W)[c] + vec(LNX_B)[c];
        y[off + j] = (yn + bonus * v[off + j]) * g[off + j];
      }
    }
  }
  mv(d, t[WO], y, x, C, C, true);

  // channel mix
  for (int64_t b = 0; b < B; ++b) {
    float* n = xn + b * C;
    layer_norm(x + b * C, vec(LN2_W), vec(LN2_B), n, C);
    const float* prev = ffn_in + b * C;
    for (int64_t c = 0; c < C; ++c) tmp[b * C + c] = n[c] + (prev[c] - n[c]) * vec(FX_K)[c];
    std::memcpy(ffn_out + b * C, n, sizeof(float) * C);
  }
  mv(d, t[FK], tmp, fk, C, F);
  for (int64_t i = 0; i < B * F; ++i) fk[i] = fk[i] > 0.f ? fk[i] * fk[i] : 0.f;
  mv(d, t[FV], fk, x, F, C, true);
}

// logits (B, V) = layernorm(x) @ head^T; work: B * C floats.
void rwkv7_decode_head(const int64_t* d, const float* ln_w, const float* ln_b, const void* head, int64_t V,
                       const float* x, float* logits, float* work) {
  const int64_t B = d[B_], C = d[C_];
  for (int64_t b = 0; b < B; ++b) layer_norm(x + b * C, ln_w, ln_b, work + b * C, C);
  mv(d, head, work, logits, C, V);
}

}  // extern "C"
