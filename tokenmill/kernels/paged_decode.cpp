// Paged decode attention for CPU, float32: one query token per sequence, keys/values read in place
// from the paged pool through the block table (no gathered copy).
//
//   q            [S, H, D]            one query per sequence
//   k/v_cache    [NB, KVH, BS, D]     the layer's pool, head-major inside a block
//   block_table  [S, MB] int64        each sequence's blocks (padding never read)
//   seq_lens     [S] int64            keys per sequence (all cached, the new token included)
//   out          [S, H, D]
//
// Work is split over (sequence, kv head): the G = H / KVH query heads that share a kv head are computed
// together, so every key and value row is read once from memory and reused G times from L1.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_table, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == torch::kFloat32, "float32 only");
  q = q.contiguous();
  block_table = block_table.contiguous();
  seq_lens = seq_lens.contiguous();
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(1), BS = k_cache.size(2), MB = block_table.size(1);
  const int64_t G = H / KVH;
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_table.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, S * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t s = idx / KVH, h = idx % KVH, L = lens[s];
      scores.assign(G * L, 0.f);
      const float* qh = qp + (s * H + h * G) * D;  // G consecutive query heads
      for (int64_t t = 0; t < L; ++t) {
        const float* krow = kp + ((bt[s * MB + t / BS] * KVH + h) * BS + t % BS) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qq = qh + g * D;
          float acc = 0.f;
          for (int64_t d = 0; d < D; ++d) acc += qq[d] * krow[d];
          scores[g * L + t] = acc * fscale;
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // softmax per query head
        float* sc = scores.data() + g * L;
        float m = sc[0];  // L >= 1; -ffast-math assumes no infinities
        for (int64_t t = 0; t < L; ++t) m = std::max(m, sc[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < L; ++t) { sc[t] = std::exp(sc[t] - m); sum += sc[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < L; ++t) sc[t] *= inv;
      }
      float* oh = op + (s * H + h * G) * D;
      std::fill(oh, oh + G * D, 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const float* vrow = vp + ((bt[s * MB + t / BS] * KVH + h) * BS + t % BS) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * L + t];
          float* o = oh + g * D;
          for (int64_t d = 0; d < D; ++d) o[d] += p * vrow[d];
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("paged_decode", &paged_decode, "paged decode attention (CPU)"); }
