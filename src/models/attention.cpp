#include "models/attention.h"

#include <algorithm>
#include <cmath>

#include <torch/version.h>

#include "core/error.h"
#include "core/torch_compat.h"
#include "models/cpu_parallel.h"
#include "models/softmax_rows.h"

namespace sd {

namespace {

bool reduced(torch::ScalarType t) { return t == torch::kBFloat16 || t == torch::kHalf; }

void check_qkv(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t heads) {
  if (q.dim() != 3 || k.dim() != 3 || v.dim() != 3)
    throw InvalidArgument("attention: q, k, v must be [B, N, heads*dim], got " + std::to_string(q.dim()) + "-d, " +
                          std::to_string(k.dim()) + "-d, " + std::to_string(v.dim()) + "-d");
  if (heads <= 0 || q.size(2) % heads != 0 || v.size(2) % heads != 0)
    throw InvalidArgument("attention: width " + std::to_string(q.size(2)) + " / " + std::to_string(v.size(2)) +
                          " is not divisible by " + std::to_string(heads) + " heads");
  if (q.size(2) != k.size(2) || k.size(0) != q.size(0) || v.size(0) != q.size(0) || k.size(1) != v.size(1))
    throw InvalidArgument("attention: incompatible q/k/v shapes");
}

// [B, N, heads*d] -> [B*heads, N, d]
torch::Tensor split_heads(const torch::Tensor& x, int64_t heads) {
  const int64_t b = x.size(0), n = x.size(1), d = x.size(2) / heads;
  return x.reshape({b, n, heads, d}).permute({0, 2, 1, 3}).reshape({b * heads, n, d});
}

// [B*heads, N, d] -> [B, N, heads*d]
torch::Tensor merge_heads(const torch::Tensor& x, int64_t heads) {
  const int64_t bh = x.size(0), n = x.size(1), d = x.size(2);
  return x.view({bh / heads, heads, n, d}).permute({0, 2, 1, 3}).reshape({bh / heads, n, heads * d});
}

// Self-attention at 512 px has 4096 queries and keys: a bmm over all heads writes [BH, N, M] scores that stream
// through memory twice more (soft-max, second bmm), and both libtorch 1.13 steps run far below the GEMM rate (the
// first bmm has only dh = 64 to contract; the soft-max runs at ~1 G elements/s per core). Here each intra-op
// thread takes (head, query tile) tasks and keeps its [tile, M] scores in cache from the first product to the second,
// with our vectorised soft-max (models/softmax_rows.h). qh [BH, N, dh] (scale folded in), kt [BH, dh, M] and
// vh [BH, M, dv] contiguous, fp32 or bf16 -> [BH, N, dv]. When it pays: attention_tile_rows().
torch::Tensor attention_tiles_cpu(const torch::Tensor& qh, const torch::Tensor& kt, const torch::Tensor& vh,
                                  int64_t tile) {
  const int64_t bh = qh.size(0), n = qh.size(1), m = kt.size(2), dv = vh.size(2);
  auto out = torch::empty({bh, n, dv}, qh.options());
  const int64_t tiles = (n + tile - 1) / tile;
  const bool bf16 = qh.scalar_type() == torch::kBFloat16;
  sd::nn::parallel_chunks(bh * tiles, [&](int64_t begin, int64_t end) {
    auto scores = torch::empty({std::min(tile, n), m}, qh.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / tiles, s = (t % tiles) * tile, len = std::min(tile, n - s);
      auto sc = scores.narrow(0, 0, len);
      at::mm_out(sc, qh[h].narrow(0, s, len), kt[h]);
      if (bf16)
        kernels::softmax_rows_inplace_bf16(reinterpret_cast<uint16_t*>(sc.data_ptr<at::BFloat16>()), len, m, m);
      else
        kernels::softmax_rows_inplace(sc.data_ptr<float>(), len, m, m);
      auto o = out[h].narrow(0, s, len);
      at::mm_out(o, sc, vh[h]);
    }
  });
  return out;
}

}  // namespace

int64_t attention_tile_rows(int64_t batch_heads, int64_t queries, int64_t keys, int64_t element_bytes) {
  // fp32: tiles at every size (2-core Zen 2, libtorch 1.13, OpenBLAS pinned to one thread as the engine runs it, 2
  // threads, vs the bmm path: 20 heads x 64 x 64 0.56 vs 0.70 ms; 20 x 256 x 77 1.7 vs 2.9; 20 x 256^2 3.5 vs 6.3;
  // 10 x 1024^2 23 vs 59; 5 x 4096^2 170 vs 470). bf16 (oneDNN's kernels): below ~32 MB of scores the bmm path's
  // scores stay in the last-level cache and its two big GEMMs were as fast (measured on a 2-core AMX Xeon while
  // at::parallel_for still ran the tiles on one thread, see models/cpu_parallel.h: 10 heads x 1024^2 = 20 MB bmm 8.3
  // ms vs tiles 8.2-10 ms; 20 heads: 31 vs 17 ms; 5 heads x 4096^2: 131 vs 71 ms). ~2 M scores per tile (512 rows
  // at 4096 keys).
  if (element_bytes < 4 && batch_heads * queries * keys * element_bytes < kAttentionTiledMinScoreBytes) return 0;
  return std::min<int64_t>(queries, std::clamp<int64_t>((int64_t{2} << 20) / std::max<int64_t>(keys, 1), 128, 1024));
}

torch::Tensor attention_chunked(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                int64_t heads, bool upcast, int64_t max_score_bytes, bool tiles) {
  check_qkv(q, k, v, heads);
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(2) / heads));
  // Reduced precision is computed in fp32 when upcasting (diffusers' upcast_attention / upcast_softmax). Otherwise
  // it stays in the model dtype, on CPU too: there bf16 batched matmuls run ~4x faster than fp32 ones and the bf16
  // softmax kernel accumulates in fp32, while converting the scores to fp32 for the softmax costs more than both
  // matmuls (measured at 1024 tokens: 6 ms all-bf16, 21 ms with an fp32 softmax, 30 ms all-fp32). The bench's
  // ablation and the bf16-vs-fp32 tests bound what this costs in accuracy. Only q/k/v are converted when upcasting.
  const bool fp32_compute =
      reduced(q.scalar_type()) && (upcast || (q.device().is_cpu() && !sd::nn::fast_path().attention_reduced_cpu));
  const auto cdt = fp32_compute ? torch::kFloat : q.scalar_type();
  // The scale is folded into q (N x dh values) instead of a pass over the N x M scores.
  auto qh = split_heads(q, heads).to(cdt) * scale;    // [BH, N, dh]
  auto kt = split_heads(k, heads).to(cdt).transpose(1, 2);  // [BH, dh, M]
  auto vh = split_heads(v, heads).to(cdt);                  // [BH, M, dv]
  const int64_t bh = qh.size(0), n = qh.size(1), m = kt.size(2);
  const bool needs_grad =
      torch::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  if (const int64_t tile = attention_tile_rows(bh, n, m, static_cast<int64_t>(c10::elementSize(cdt)));
      tile > 0 && tiles && sd::nn::fast_path().attention_tiles_cpu && qh.is_cpu() && !needs_grad &&
      (cdt == torch::kBFloat16 || cdt == torch::kFloat))
    return merge_heads(attention_tiles_cpu(qh.contiguous(), kt.contiguous(), vh.contiguous(), tile), heads)
        .to(v.scalar_type());
  const int64_t row_bytes = std::max<int64_t>(1, bh * m * static_cast<int64_t>(c10::elementSize(cdt)));
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(n, max_score_bytes / row_bytes));
  // Without autograd the CPU softmax runs in place, so one chunk holds a single score buffer.

  auto one_chunk = [&](const torch::Tensor& qc) {
    auto scores = at::bmm(qc, kt);  // [BH, n, M], already scaled
    torch::Tensor probs;
    if (reduced(cdt) && !scores.is_cpu()) {
      probs = at::softmax(scores, -1, torch::kFloat).to(cdt);  // non-CPU reduced precision without upcasting
    } else if (needs_grad || !scores.is_cpu()) {
      probs = at::softmax(scores, -1);
    } else {
      // In place (the CPU kernel reads each row before writing it; tests compare with the reference).
      probs = at::_softmax_out(scores, scores, -1, false);
    }
    return at::bmm(probs, vh);  // [BH, n, dv]
  };

  torch::Tensor out;
  if (chunk >= n) {
    out = one_chunk(qh);
  } else {
    std::vector<torch::Tensor> parts;
    parts.reserve(static_cast<size_t>((n + chunk - 1) / chunk));
    for (int64_t s = 0; s < n; s += chunk) parts.push_back(one_chunk(qh.slice(1, s, std::min(n, s + chunk))));
    out = at::cat(parts, 1);
  }
  return merge_heads(out, heads).to(v.scalar_type());
}

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t heads,
                        bool upcast) {
#if SD_HAS_SDPA
  check_qkv(q, k, v, heads);
  // The fused kernels never materialise the full score matrix. Reduced precision is computed in fp32 when upcasting,
  // and on a CPU only where oneDNN lacks bf16 kernels (attention_reduced_cpu), as on the 1.13 path: libtorch 2's CPU
  // flash attention keeps its soft-max statistics and accumulators in fp32 for bf16 inputs, and runs 3x faster on
  // them than on fp32 copies (5 heads x 4096 tokens: 33 vs 98 ms, 2-core AMX Xeon, libtorch 2.15).
  // On CUDA the upcast is not taken, as by diffusers' AttnProcessor2_0 (its default on torch 2): the flash and
  // memory-efficient kernels keep scores and soft-max in fp32 already, and have no fp32 flash variant to upcast to.
  const bool cpu_fp32 = q.device().is_cpu() && !sd::nn::fast_path().attention_reduced_cpu;
  const auto cdt = reduced(q.scalar_type()) && ((upcast && !q.is_cuda()) || cpu_fp32) ? torch::kFloat
                                                                                     : q.scalar_type();
  auto to4 = [heads, cdt](const torch::Tensor& x) {
    return x.to(cdt).reshape({x.size(0), x.size(1), heads, x.size(2) / heads}).transpose(1, 2);  // [B, heads, N, d]
  };
  auto o = at::scaled_dot_product_attention(to4(q), to4(k), to4(v));
  return o.transpose(1, 2).reshape({q.size(0), q.size(1), v.size(2)}).to(v.scalar_type());
#else
  return attention_chunked(q, k, v, heads, upcast);
#endif
}

AttentionImpl::AttentionImpl(const AttentionOptions& o) : options(o) {
  if (o.query_dim <= 0 || o.heads <= 0 || o.dim_head <= 0)
    throw InvalidArgument("Attention: query_dim, heads and dim_head must be positive");
  const int64_t inner = o.heads * o.dim_head;
  const int64_t ctx = o.cross_attention_dim > 0 ? o.cross_attention_dim : o.query_dim;
  if (o.norm_num_groups > 0)
    group_norm = register_module("group_norm", sd::nn::GroupNorm(o.norm_num_groups, o.query_dim, o.norm_eps));
  to_q = register_module("to_q", sd::nn::Linear(o.query_dim, inner, o.bias));
  to_k = register_module("to_k", sd::nn::Linear(ctx, inner, o.bias));
  to_v = register_module("to_v", sd::nn::Linear(ctx, inner, o.bias));
  to_out0 = sd::nn::Linear(inner, o.query_dim, true);
  to_out = register_module("to_out", torch::nn::ModuleList());
  to_out->push_back(to_out0);
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& context) {
  const bool spatial = x.dim() == 4;
  torch::Tensor tokens;  // [B, N, C]
  if (spatial) {
    // GroupNorm on NCHW equals diffusers' norm of the [B, C, HW] view; then [B, C, HW] -> [B, HW, C].
    auto h = group_norm ? group_norm(x) : x;
    tokens = h.flatten(2).transpose(1, 2);
  } else if (x.dim() == 3) {
    tokens = group_norm ? group_norm(x.transpose(1, 2)).transpose(1, 2) : x;
  } else {
    throw InvalidArgument("Attention: expected [B, N, C] or [B, C, H, W] input, got " + std::to_string(x.dim()) +
                          "-d");
  }
  torch::Tensor ctx = context.defined() ? context : tokens, image_tokens;
  if (ip && context.defined()) {
    const int64_t m = context.size(1) - ip->num_tokens;
    if (context.dim() != 3 || m < 0)
      throw InvalidArgument("Attention with IP-Adapter: the context must end with " + std::to_string(ip->num_tokens) +
                            " image tokens, got " + std::to_string(context.dim() == 3 ? context.size(1) : 0) +
                            " tokens");
    ctx = context.slice(1, 0, m);
    image_tokens = context.slice(1, m);
  }
  const bool upcast = options.upcast_attention || options.upcast_softmax;
  auto q = to_q(tokens);
  auto k = to_k(ctx);
  auto v = to_v(ctx);
  auto a = attention(q, k, v, options.heads, upcast);
  if (image_tokens.defined()) {
    const double s = ip->scale ? ip->scale->load() : 1.0;
    if (s != 0.0) a = a + s * attention(q, ip->to_k_ip(image_tokens), ip->to_v_ip(image_tokens), options.heads, upcast);
  }
  auto o = to_out0(a);
  if (spatial) o = o.transpose(1, 2).reshape(x.sizes());  // [B, HW, C] -> [B, C, H, W]
  if (options.residual_connection) o = o + x;
  if (options.rescale_output_factor != 1.0) o = o / options.rescale_output_factor;
  return o;
}

}  // namespace sd
