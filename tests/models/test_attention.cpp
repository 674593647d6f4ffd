// Attention: the chunked (libtorch 1.13) path against a plain float64 reference, chunking invariance, the tiled CPU
// path (large score matrices) and its soft-max kernel against the reference, the
// Attention module's diffusers semantics (VAE group-norm/residual path and cross-attention), and the shared ResNet
// blocks' shapes.
#include <cmath>
#include <limits>

#include <gtest/gtest.h>

#include "core/device.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "io/state_dict.h"
#include "models/attention.h"
#include "models/layers.h"
#include "models/resnet.h"
#include "models/softmax_rows.h"

namespace {

// softmax(q k^T / sqrt(dh)) v per head, in float64, straight from the definition.
torch::Tensor reference_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                  int64_t heads) {
  auto qd = q.to(torch::kDouble), kd = k.to(torch::kDouble), vd = v.to(torch::kDouble);
  const int64_t b = q.size(0), n = q.size(1), m = k.size(1), dh = q.size(2) / heads, dv = v.size(2) / heads;
  auto qh = qd.view({b, n, heads, dh}).permute({0, 2, 1, 3});
  auto kh = kd.view({b, m, heads, dh}).permute({0, 2, 1, 3});
  auto vh = vd.view({b, m, heads, dv}).permute({0, 2, 1, 3});
  auto p = torch::softmax(torch::matmul(qh, kh.transpose(-1, -2)) / std::sqrt(static_cast<double>(dh)), -1);
  return torch::matmul(p, vh).permute({0, 2, 1, 3}).reshape({b, n, heads * dv});
}

struct Qkv {
  torch::Tensor q, k, v;
};

Qkv random_qkv(int64_t b, int64_t n, int64_t m, int64_t heads, int64_t dh, torch::Dtype dt, double qscale = 1.0) {
  torch::manual_seed(42);
  return {(torch::randn({b, n, heads * dh}) * qscale).to(dt), torch::randn({b, m, heads * dh}).to(dt),
          torch::randn({b, m, heads * dh}).to(dt)};
}

TEST(Attention, ChunkedMatchesReferenceForEveryChunkSize) {
  // b=2, heads=3, n=37 queries, m=29 keys: a score row is 2*3*29*4 = 696 bytes (fp32).
  auto t = random_qkv(2, 37, 29, 3, 8, torch::kFloat, 2.0);
  auto ref = reference_attention(t.q, t.k, t.v, 3);
  const int64_t row = 2 * 3 * 29 * 4;
  for (int64_t rows : {int64_t{1}, int64_t{2}, int64_t{5}, int64_t{16}, int64_t{36}, int64_t{37}, int64_t{1000}}) {
    for (bool upcast : {false, true}) {
      auto out = sd::attention_chunked(t.q, t.k, t.v, 3, upcast, rows * row, /*tiles=*/false);
      EXPECT_EQ(out.sizes(), t.q.sizes());
      EXPECT_TRUE(sd::test::tensors_close(out, ref, 1e-6, 1e-6,
                                          "chunk " + std::to_string(rows) + (upcast ? " upcast" : "")));
    }
  }
  // A bound below one row still makes progress (one query row per chunk).
  EXPECT_TRUE(
      sd::test::tensors_close(sd::attention_chunked(t.q, t.k, t.v, 3, false, 1, false), ref, 1e-6, 1e-6, "tiny"));
  // The tiled path (CPU fp32 inference at every size) and the public entry point are the same computation.
  EXPECT_TRUE(sd::test::tensors_close(sd::attention_chunked(t.q, t.k, t.v, 3, false), ref, 1e-6, 1e-6, "tiles"));
  EXPECT_TRUE(sd::test::tensors_close(sd::attention(t.q, t.k, t.v, 3, false), ref, 1e-6, 1e-6, "attention()"));
}

TEST(Attention, ChunkingDoesNotChangeTheResult) {
  auto t = random_qkv(1, 64, 64, 2, 16, torch::kFloat);
  auto whole = sd::attention_chunked(t.q, t.k, t.v, 2, false, int64_t{1} << 40, /*tiles=*/false);
  for (int64_t rows : {1, 7, 32}) {
    auto part = sd::attention_chunked(t.q, t.k, t.v, 2, false, rows * 2 * 64 * 4, /*tiles=*/false);
    // Same arithmetic per element; only the BLAS kernel for the chunk's row count may differ (OpenBLAS on an AVX2
    // CPU sums in another order for 1 or 7 rows): within 1e-6 of max|whole| (~8 fp32 ulps).
    EXPECT_TRUE(sd::test::tensors_close(part, whole, 0.0, 1e-6, "chunk of " + std::to_string(rows) + " rows"));
  }
}

// bf16 inputs on CPU run the products and the softmax in fp32 (with or without upcast), so the only error left is
// the final rounding to bf16: at most half a bf16 ulp, 2^-9 relative (measured 3.9e-3 abs of max|ref| 1.4).
TEST(Attention, Bf16ChunkedIsFp32ComputeRoundedOnce) {
  auto t = random_qkv(2, 50, 40, 2, 32, torch::kBFloat16, 0.5);
  auto ref = reference_attention(t.q, t.k, t.v, 2);
  for (bool upcast : {false, true}) {
    for (int64_t rows : {3, 50}) {
      for (bool tiles : {false, true}) {  // the tiles where bf16 computes in fp32 (no oneDNN bf16, or upcast)
        auto out = sd::attention_chunked(t.q, t.k, t.v, 2, upcast, rows * 2 * 2 * 40 * 4, tiles);
        EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
        EXPECT_TRUE(sd::test::tensors_close(out, ref, 0.0, 4e-3, std::string(upcast ? "bf16 upcast" : "bf16") +
                                                                     (tiles ? " tiles" : "")));
      }
    }
  }
}

// With autograd (the chunks are concatenated and the softmax is not in place) the gradients match the reference's.
TEST(Attention, ChunkedGradientsMatchReference) {
  auto t = random_qkv(1, 19, 11, 2, 4, torch::kFloat);
  std::vector<torch::Tensor> ins = {t.q.clone().requires_grad_(), t.k.clone().requires_grad_(),
                                    t.v.clone().requires_grad_()};
  auto w = torch::randn({1, 19, 8});
  (sd::attention_chunked(ins[0], ins[1], ins[2], 2, false, 5 * 2 * 11 * 4) * w).sum().backward();
  std::vector<torch::Tensor> ref_ins = {t.q.to(torch::kDouble).requires_grad_(), t.k.to(torch::kDouble).requires_grad_(),
                                        t.v.to(torch::kDouble).requires_grad_()};
  (reference_attention(ref_ins[0], ref_ins[1], ref_ins[2], 2) * w.to(torch::kDouble)).sum().backward();
  for (size_t i = 0; i < 3; ++i)
    EXPECT_TRUE(sd::test::tensors_close(ins[i].grad(), ref_ins[i].grad(), 1e-5, 1e-5, "grad " + std::to_string(i)));
}

// The soft-max kernel of the tiled path: rows of every length around the vector widths, a row stride larger than the
// row, logits spread wide enough that exp underflows; fp32 within 2e-6 of the float64 soft-max (values <= 1; measured
// ~1e-6), bf16 within one bf16 rounding of it (2^-9 relative). A NaN poisons its row only.
TEST(SoftmaxRows, MatchesTheFloat64SoftmaxForEveryRowLength) {
  torch::manual_seed(3);
  for (int64_t cols : {1, 2, 7, 15, 16, 17, 31, 64, 100, 1000, 4096}) {
    const int64_t rows = 5, stride = cols + 3;
    auto storage = torch::randn({rows, stride}) * 8;
    storage[0].mul_(20);  // a row whose small entries underflow
    auto x = storage.narrow(1, 0, cols);
    auto ref = torch::softmax(x.to(torch::kDouble), -1);
    auto f = storage.clone();
    sd::kernels::softmax_rows_inplace(f.data_ptr<float>(), rows, cols, stride);
    SD_EXPECT_CLOSE(f.narrow(1, 0, cols), ref, 2e-6, 0.0, "fp32 cols " + std::to_string(cols));
    EXPECT_TRUE(torch::equal(f.narrow(1, cols, 3), storage.narrow(1, cols, 3))) << "wrote past the row";
    auto b = storage.to(torch::kBFloat16);
    auto bref = torch::softmax(b.narrow(1, 0, cols).to(torch::kDouble), -1);
    sd::kernels::softmax_rows_inplace_bf16(reinterpret_cast<uint16_t*>(b.data_ptr<at::BFloat16>()), rows, cols, stride);
    SD_EXPECT_CLOSE(b.narrow(1, 0, cols), bref, 1e-6, 1.0 / 512, "bf16 cols " + std::to_string(cols));
  }
  auto x = torch::randn({2, 40});
  x[0][7] = std::numeric_limits<float>::quiet_NaN();
  sd::kernels::softmax_rows_inplace(x.data_ptr<float>(), 2, 40, 40);
  EXPECT_TRUE(x[0].isnan().all().item<bool>());
  EXPECT_FALSE(x[1].isnan().any().item<bool>());
  EXPECT_NEAR(x[1].sum().item<double>(), 1.0, 1e-6);
}

// CPU inference takes the tiled path in fp32, and in bf16 above ~32 MB of scores: (head, query tile) tasks whose
// scores stay in cache. Its result is the reference's, for a query count that is no multiple of the tile and keys !=
// queries, and for a few queries against the 77 tokens of a prompt (cross-attention).
TEST(Attention, TiledPathMatchesReference) {
  EXPECT_EQ(sd::attention_tile_rows(10, 1024, 1024, 2), 0);      // 20 MB of bf16 scores: the bmm path
  EXPECT_EQ(sd::attention_tile_rows(5, 4096, 4096, 2), 512);     // 512 px self-attention: 512-row tiles
  EXPECT_EQ(sd::attention_tile_rows(2, 2000, 2100, 4), 998);     // ~2 M scores per tile
  EXPECT_EQ(sd::attention_tile_rows(1, 300, 1 << 16, 4), 128);   // at least 128 rows (or all of them)
  EXPECT_EQ(sd::attention_tile_rows(20, 64, 64, 4), 64);         // fp32 at any size (all 64 rows in one tile)
  auto t = random_qkv(1, 2000, 2100, 2, 16, torch::kFloat, 2.0);  // 2 heads: 33.6 MB of fp32 scores
  auto ref = reference_attention(t.q, t.k, t.v, 2);
  torch::NoGradGuard no_grad;
  auto tiled = sd::attention_chunked(t.q, t.k, t.v, 2, false);
  auto bmm = sd::attention_chunked(t.q, t.k, t.v, 2, false, sd::kAttentionMaxScoreBytes, false);
  SD_EXPECT_CLOSE(tiled, ref, 1e-5, 1e-5, "tiled fp32");
  SD_EXPECT_CLOSE(bmm, ref, 1e-5, 1e-5, "bmm fp32");
  auto x = random_qkv(2, 300, 77, 4, 16, torch::kFloat, 2.0);  // cross-attention: 2 x 4 heads, 300 queries, 77 keys
  SD_EXPECT_CLOSE(sd::attention_chunked(x.q, x.k, x.v, 4, false), reference_attention(x.q, x.k, x.v, 4), 1e-5, 1e-5,
                  "tiled fp32 cross-attention");
  // bf16 in the model dtype (the CPU fast path): the tiled error is that of the bmm path (bf16 scores and
  // probabilities; measured 4.1e-4 abs for both, max|ref| 0.11). That path is taken where oneDNN has bf16 kernels
  // (fast_path's default); without them the products compute in fp32, as tested here then: libtorch 1.13's fallback
  // bf16 products accumulate in bf16 (1.5e-2 on an AVX2 Zen 2) and the engine never runs them.
  const bool saved = sd::nn::fast_path().attention_reduced_cpu;
  sd::nn::fast_path().attention_reduced_cpu = sd::cpu_has_onednn_bf16();
  auto tb = random_qkv(2, 2048, 2048, 2, 32, torch::kBFloat16, 0.5);  // 4 × 2048² bf16 = 33.6 MB
  auto bref = reference_attention(tb.q, tb.k, tb.v, 2);
  auto btiled = sd::attention_chunked(tb.q, tb.k, tb.v, 2, false);
  auto bbmm = sd::attention_chunked(tb.q, tb.k, tb.v, 2, false, sd::kAttentionMaxScoreBytes, false);
  sd::nn::fast_path().attention_reduced_cpu = saved;
  EXPECT_EQ(btiled.scalar_type(), torch::kBFloat16);
  SD_EXPECT_CLOSE(btiled, bref, 0.0, 1e-2, "tiled bf16");
  SD_EXPECT_CLOSE(bbmm, bref, 0.0, 1e-2, "bmm bf16");
  // The two differ by at most one bf16 ulp of the largest output (2^-7 relative; measured one ulp, 4.9e-4 at 0.076).
  SD_EXPECT_CLOSE(btiled, bbmm, 0.0, 1.0 / 128, "tiled vs bmm bf16");
}

TEST(Attention, ShapeErrors) {
  auto t = random_qkv(1, 4, 4, 2, 4, torch::kFloat);
  EXPECT_THROW(sd::attention_chunked(t.q, t.k, t.v, 3, false), sd::InvalidArgument);
  EXPECT_THROW(sd::attention_chunked(t.q.unsqueeze(0), t.k, t.v, 2, false), sd::InvalidArgument);
  EXPECT_THROW(sd::attention_chunked(t.q, t.k.slice(1, 0, 3), t.v, 2, false), sd::InvalidArgument);
}

void randomize(torch::nn::Module& m) {
  torch::NoGradGuard ng;
  for (auto& p : m.parameters()) p.normal_(0.0, 0.3);
}

// The VAE mid-block attention: GroupNorm on NCHW, single-head spatial self-attention over HxW tokens, residual
// connection, rescale_output_factor; to_q/k/v with bias.
TEST(AttentionModule, VaeSpatialPathMatchesDiffusersSemantics) {
  sd::AttentionOptions o;
  o.query_dim = 8;
  o.heads = 1;
  o.dim_head = 8;
  o.bias = true;
  o.upcast_softmax = true;
  o.norm_num_groups = 4;
  o.norm_eps = 1e-6;
  o.residual_connection = true;
  o.rescale_output_factor = 2.0;
  sd::Attention attn(o);
  auto keys = sd::state_dict(*attn);
  for (const char* k : {"group_norm.weight", "group_norm.bias", "to_q.weight", "to_q.bias", "to_k.bias", "to_v.bias",
                        "to_out.0.weight", "to_out.0.bias"})
    EXPECT_TRUE(keys.count(k)) << k;
  EXPECT_EQ(keys.size(), 10u);
  randomize(*attn);
  torch::manual_seed(3);
  auto x = torch::randn({2, 8, 5, 3});
  torch::NoGradGuard ng;
  auto out = attn(x);
  // By hand, as diffusers' AttnProcessor: [B, C, HW] -> group_norm -> [B, HW, C] -> q/k/v -> attention -> to_out.
  auto tokens = at::group_norm(x.view({2, 8, 15}), 4, attn->group_norm->weight, attn->group_norm->bias, 1e-6)
                    .transpose(1, 2);
  auto q = attn->to_q(tokens), k = attn->to_k(tokens), v = attn->to_v(tokens);
  auto h = reference_attention(q, k, v, 1).to(torch::kFloat);
  h = attn->to_out0(h).transpose(1, 2).reshape({2, 8, 5, 3});
  auto expected = (h + x) / 2.0;
  EXPECT_TRUE(sd::test::tensors_close(out, expected, 1e-5, 1e-6, "VAE attention"));
}

TEST(AttentionModule, CrossAttentionUsesContextAndHasNoQkvBias) {
  sd::AttentionOptions o;
  o.query_dim = 12;
  o.cross_attention_dim = 6;
  o.heads = 3;
  o.dim_head = 4;
  sd::Attention attn(o);
  auto keys = sd::state_dict(*attn);
  EXPECT_EQ(keys.size(), 5u);  // to_q/k/v weights, to_out.0 weight + bias
  EXPECT_EQ(keys.at("to_k.weight").sizes(), (std::vector<int64_t>{12, 6}));
  randomize(*attn);
  auto x = torch::randn({2, 10, 12});
  auto ctx = torch::randn({2, 7, 6});
  torch::NoGradGuard ng;
  auto out = attn(x, ctx);
  auto expected =
      attn->to_out0(reference_attention(attn->to_q(x), attn->to_k(ctx), attn->to_v(ctx), 3).to(torch::kFloat));
  EXPECT_TRUE(sd::test::tensors_close(out, expected, 1e-5, 1e-6, "cross attention"));
}

TEST(ResnetBlocks, NamesAndShapes) {
  sd::ResnetBlock2D with_temb(8, 16, 32, 4, 1e-5);
  auto k = sd::state_dict(*with_temb);
  for (const char* n : {"norm1.weight", "conv1.weight", "time_emb_proj.weight", "norm2.bias", "conv2.bias",
                        "conv_shortcut.weight", "conv_shortcut.bias"})
    EXPECT_TRUE(k.count(n)) << n;
  sd::ResnetBlock2D vae(8, 8, 0, 4, 1e-6);
  auto kv = sd::state_dict(*vae);
  EXPECT_FALSE(kv.count("time_emb_proj.weight"));
  EXPECT_FALSE(kv.count("conv_shortcut.weight"));
  randomize(*with_temb);
  randomize(*vae);
  torch::NoGradGuard ng;
  auto x = torch::randn({2, 8, 6, 6});
  EXPECT_EQ(with_temb(x, torch::randn({2, 32})).sizes(), (std::vector<int64_t>{2, 16, 6, 6}));
  // Without temb and with in == out, the block is x + conv2(silu(norm2(conv1(silu(norm1(x)))))).
  auto h = vae->conv2(torch::silu(vae->norm2(vae->conv1(torch::silu(vae->norm1(x))))));
  EXPECT_TRUE(torch::allclose(vae(x), x + h));
  EXPECT_THROW(with_temb(x), sd::InvalidArgument);
  EXPECT_THROW(vae(x, torch::randn({2, 32})), sd::InvalidArgument);

  sd::Downsample2D unet_down(8, 8, 1), vae_down(8, 8, 0);
  randomize(*unet_down);
  {
    torch::NoGradGuard g2;
    vae_down->conv->weight.copy_(unet_down->conv->weight);
    vae_down->conv->bias.copy_(unet_down->conv->bias);
  }
  EXPECT_EQ(unet_down(torch::randn({1, 8, 7, 7})).sizes(), (std::vector<int64_t>{1, 8, 4, 4}));
  EXPECT_EQ(vae_down(torch::randn({1, 8, 8, 8})).sizes(), (std::vector<int64_t>{1, 8, 4, 4}));
  // The VAE variant pads right/bottom only: its output equals a padding-1 conv shifted by one pixel.
  auto y = torch::randn({1, 8, 8, 8});
  auto full = at::conv2d(y, unet_down->conv->weight, unet_down->conv->bias, {1, 1}, {1, 1});  // stride 1, pad 1
  auto asym = vae_down(y);
  EXPECT_TRUE(torch::allclose(asym, full.slice(2, 1, 8, 2).slice(3, 1, 8, 2), 1e-5, 1e-6));

  sd::Upsample2D up(8, 4);
  randomize(*up);
  auto u = up(torch::randn({1, 8, 3, 5}));
  EXPECT_EQ(u.sizes(), (std::vector<int64_t>{1, 4, 6, 10}));
  EXPECT_EQ(up(torch::randn({1, 8, 3, 5}), std::make_pair<int64_t, int64_t>(7, 11)).sizes(),
            (std::vector<int64_t>{1, 4, 7, 11}));
  // bf16: same result as the fp32 computation on the same (bf16-representable) values, up to the convolution.
  // Only where oneDNN has bf16 convolutions (AVX-512): elsewhere libtorch's generic bf16 path rounds along the way.
  if (!sd::cpu_has_onednn_bf16()) return;
  sd::Upsample2D up_b(8, 4);
  {
    torch::NoGradGuard g3;
    up_b->conv->weight.set_data(up->conv->weight.to(torch::kBFloat16));
    up_b->conv->bias.set_data(up->conv->bias.to(torch::kBFloat16));
  }
  auto xb = torch::randn({1, 8, 3, 5}).to(torch::kBFloat16);
  auto ub = up_b(xb);
  EXPECT_EQ(ub.scalar_type(), torch::kBFloat16);
  auto uf = at::conv2d(at::upsample_nearest2d(xb.to(torch::kFloat), {6, 10}), up_b->conv->weight.to(torch::kFloat),
                       up_b->conv->bias.to(torch::kFloat), {1, 1}, {1, 1});
  EXPECT_TRUE(sd::test::tensors_close(ub, uf, 0.0, 1e-2, "bf16 upsample"));
}

}  // namespace
