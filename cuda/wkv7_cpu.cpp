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

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t CHUNK = 16;

void check_inputs(const std::vector<torch::Tensor>& xs, const torch::Tensor& s0) {
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
                "wkv7_cpu: expected contiguous float32 CPU tensors");
    TORCH_CHECK(x.sizes() == xs[0].sizes(), "wkv7_cpu: all inputs must share one (B,T,H,N) shape");
  }
  TORCH_CHECK(xs[0].dim() == 4, "wkv7_cpu: expected (B,T,H,N) inputs");
  const auto B = xs[0].size(0), H = xs[0].size(2), N = xs[0].size(3);
  TORCH_CHECK(s0.device().is_cpu() && s0.scalar_type() == torch::kFloat32 && s0.is_contiguous() &&
                  s0.sizes() == torch::IntArrayRef({B, H, N, N}),
              "wkv7_cpu: state must be a contiguous float32 (B,H,N,N) CPU tensor");
}

// Returns y, final state, chunk checkpoints (B,H,nchunk,N,N) and sa (B,H,T,N); the last two
// are empty when save is false (inference).
std::vector<torch::Tensor> forward(torch::Tensor r, torch::Tensor w, torch::Tensor k,
                                   torch::Tensor v, torch::Tensor a, torch::Tensor b,
                                   torch::Tensor s0, bool save) {
  check_inputs({r, w, k, v, a, b}, s0);
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const int64_t nchunk = (T + CHUNK - 1) / CHUNK;
  auto y = torch::empty_like(r);
  auto sT = torch::empty_like(s0);
  auto ckpt = save ? torch::empty({B, H, nchunk, N, N}, s0.options()) : torch::empty({0}, s0.options());
  auto sa_all = save ? torch::empty({B, H, T, N}, s0.options()) : torch::empty({0}, s0.options());

  const float *rp = r.data_ptr<float>(), *wp = w.data_ptr<float>(), *kp = k.data_ptr<float>();
  const float *vp = v.data_ptr<float>(), *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  const float* s0p = s0.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *sTp = sT.data_ptr<float>();
  float *cp = ckpt.data_ptr<float>(), *sap = sa_all.data_ptr<float>();

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
  return {y, sT, ckpt, sa_all};
}

// Gradients of r, w, k, v, a, b and of the initial state, given dy and the gradient of the
// final state dsT.
std::vector<torch::Tensor> backward(torch::Tensor r, torch::Tensor w, torch::Tensor k,
                                    torch::Tensor v, torch::Tensor a, torch::Tensor b,
                                    torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt,
                                    torch::Tensor sa_all) {
  check_inputs({r, w, k, v, a, b, dy}, dsT);
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const int64_t nchunk = (T + CHUNK - 1) / CHUNK;
  TORCH_CHECK(ckpt.is_contiguous() && ckpt.numel() == B * H * nchunk * N * N &&
                  sa_all.is_contiguous() && sa_all.numel() == B * H * T * N,
              "wkv7_cpu: backward needs the checkpoints of a forward run with save=True");
  auto dr = torch::empty_like(r), dw = torch::empty_like(w), dk = torch::empty_like(k);
  auto dv = torch::empty_like(v), da = torch::empty_like(a), db = torch::empty_like(b);
  auto ds0 = torch::empty_like(dsT);

  const float *rp = r.data_ptr<float>(), *wp = w.data_ptr<float>(), *kp = k.data_ptr<float>();
  const float *vp = v.data_ptr<float>(), *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  const float *dyp = dy.data_ptr<float>(), *dsTp = dsT.data_ptr<float>();
  const float *cp = ckpt.data_ptr<float>(), *sap = sa_all.data_ptr<float>();
  float *drp = dr.data_ptr<float>(), *dwp = dw.data_ptr<float>(), *dkp = dk.data_ptr<float>();
  float *dvp = dv.data_ptr<float>(), *dap = da.data_ptr<float>(), *dbp = db.data_ptr<float>();
  float* ds0p = ds0.data_ptr<float>();

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
  return {dr, dw, dk, dv, da, db, ds0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "WKV-7 forward (CPU, fp32)");
  m.def("backward", &backward, "WKV-7 backward (CPU, fp32)");
}
