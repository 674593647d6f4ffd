// IP-Adapter Plus (models/ip_adapter.h, Resampler) and full-face (FullProjection): no fixture holds such a file, so
// the tests make them with random weights for the fixture tiny-sd15 UNet and tiny image encoder, in the original file
// layout, and check the Resampler against h94/IP-Adapter's formula written out here another way (per-head soft-max of
// (q dh^-1/4) (k dh^-1/4)^T, as the original computes it) and full-face's MLP against its formula; the encoder's
// penultimate hidden states against a one-layer copy of the encoder; the UNet (tiny-sd15 and tiny-sdxl) with the
// tokens at scale 0 against the plain UNet, bit for bit; and the loader's errors.
#include <cmath>
#include <iostream>
#include <filesystem>
#include <map>
#include <set>

#include <gtest/gtest.h>

#include "common/error_of.h"
#include "common/fixtures.h"
#include "common/ip_adapter_plus.h"
#include "core/device.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/clip_vision_model.h"
#include "models/ip_adapter.h"
#include "models/unet_2d_condition.h"

namespace sd {
namespace {

namespace fs = std::filesystem;
using torch::Tensor;
using Tensors = std::map<std::string, Tensor>;

const std::string kEncoder = "ipadapter/models/tiny-ip-adapter-sd15/image_encoder";
const std::string kUNet = "models/tiny-sd15/unet";

#define SD_REQUIRE_FIXTURES()                                                                           \
  if (!test::fixture_exists(kEncoder + "/config.json") || !test::fixture_exists(kUNet + "/config.json")) \
  GTEST_SKIP() << "tiny-sd15 / tiny IP-Adapter image encoder not in the fixture root"

using test::plus_tensors;
// The made-up adapter's sizes (common/ip_adapter_plus.h).
constexpr int64_t kE = test::kPlusE, kC = test::kPlusC, kD = test::kPlusD, kQ = test::kPlusQ,
                  kDepth = test::kPlusDepth, kHeads = test::kPlusHeads, kDh = test::kPlusDh, kF = test::kPlusF;

std::string write(const std::string& dir, const std::string& name, const Tensors& t) {
  const std::string p = dir + "/" + name;
  save_safetensors(p, t);
  return p;
}

// The UNet with `adapter` attached and the context [random text, tokens] (tokens [2, T, C]): at scale 0 exactly the
// plain UNet on the text, at 0.7 more than 1e-4 away from it and finite. SDXL: its added conditioning. Detaches.
void expect_scale_zero_is_the_plain_unet(UNet2DConditionModelImpl& unet, IPAdapterImpl& adapter, const Tensor& tokens,
                                         const std::string& what, bool sdxl = false) {
  torch::manual_seed(3);
  const int64_t c = tokens.size(2);
  const Tensor sample = torch::randn({2, 4, 8, 8}), t = torch::tensor({999, 259}), text = torch::randn({2, 77, c});
  const Tensor text_embeds = sdxl ? torch::randn({2, 12}) : Tensor();
  const Tensor time_ids = sdxl ? torch::tensor({64.f, 64.f, 0.f, 0.f, 64.f, 64.f}).repeat({2, 1}) : Tensor();
  const Tensor ctx = torch::cat({text, tokens}, 1);  // [2, 77 + T, C]
  adapter.set_scale(0.0);
  const Tensor out0 = unet.forward(sample, t, ctx, {}, text_embeds, time_ids);
  adapter.set_scale(0.7);
  const Tensor out = unet.forward(sample, t, ctx, {}, text_embeds, time_ids);
  adapter.detach();
  const Tensor plain = unet.forward(sample, t, text, {}, text_embeds, time_ids);
  EXPECT_TRUE(torch::equal(out0, plain)) << what << ": " << (out0 - plain).abs().max().item<double>();
  EXPECT_GT((out - plain).abs().max().item<double>(), 1e-4) << what;
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>()) << what;
}

// h94/IP-Adapter's Resampler as its resampler.py computes it, from the file's tensors.
Tensor resampler_reference(const Tensors& t, const Tensor& features) {
  const auto ln = [&](const Tensor& x, const std::string& k) {
    return torch::layer_norm(x, {x.size(-1)}, t.at(k + "weight"), t.at(k + "bias"), 1e-5);
  };
  const auto heads = [](const Tensor& x) {  // [B, L, H * dh] -> [B, H, L, dh]
    return x.view({x.size(0), x.size(1), kHeads, -1}).transpose(1, 2);
  };
  const int64_t b = features.size(0);
  Tensor x = torch::matmul(features, t.at("image_proj.proj_in.weight").t()) + t.at("image_proj.proj_in.bias");
  Tensor latents = t.at("image_proj.latents").repeat({b, 1, 1});
  for (int64_t i = 0; i < kDepth; ++i) {
    const std::string p = "image_proj.layers." + std::to_string(i) + ".";
    const Tensor xn = ln(x, p + "0.norm1."), l = ln(latents, p + "0.norm2.");
    const Tensor q = torch::matmul(l, t.at(p + "0.to_q.weight").t());
    const auto kv = torch::matmul(torch::cat({xn, l}, -2), t.at(p + "0.to_kv.weight").t()).chunk(2, -1);
    const double scale = 1 / std::sqrt(std::sqrt(static_cast<double>(kDh)));
    const Tensor w = torch::softmax(torch::matmul(heads(q) * scale, (heads(kv[0]) * scale).transpose(-2, -1)), -1);
    const Tensor out = torch::matmul(w, heads(kv[1])).permute({0, 2, 1, 3}).reshape({b, kQ, -1});
    latents = torch::matmul(out, t.at(p + "0.to_out.weight").t()) + latents;
    const Tensor h = torch::gelu(torch::matmul(ln(latents, p + "1.0."), t.at(p + "1.1.weight").t()));
    latents = torch::matmul(h, t.at(p + "1.3.weight").t()) + latents;
  }
  const Tensor out = torch::matmul(latents, t.at("image_proj.proj_out.weight").t()) + t.at("image_proj.proj_out.bias");
  return ln(out, "image_proj.norm_out.");
}

TEST(IPAdapterPlus, ResamplerMatchesTheOriginalFormula) {
  SD_REQUIRE_FIXTURES();
  auto unet = load_unet(test::fixture_path(kUNet));
  const std::string dir = test::make_temp_dir("ip_plus");
  const Tensors t = plus_tensors(*unet);
  const std::string file = write(dir, "ip-adapter-plus_tiny.safetensors", t);
  auto adapter = load_ip_adapter_weights(file, *unet, 8, torch::kFloat, torch::kCPU, kE);
  EXPECT_TRUE(adapter->plus());
  EXPECT_EQ(adapter->num_tokens(), kQ);
  EXPECT_EQ(adapter->image_embed_dim(), kE);
  EXPECT_EQ(adapter->cross_attention_dim(), kC);
  const auto& rc = adapter->resampler->config;
  EXPECT_EQ(std::vector<int64_t>({rc.hidden_dim, rc.depth, rc.heads, rc.ff_dim}),
            std::vector<int64_t>({kD, kDepth, kHeads, kF}));
  std::set<std::string> names, keys;
  for (const auto& p : adapter->named_parameters()) names.insert(p.key());
  for (const auto& kv : t) keys.insert(kv.first);
  EXPECT_EQ(names, keys) << "registered names are the file's keys";
  torch::NoGradGuard ng;
  torch::manual_seed(1);
  const Tensor features = torch::randn({2, 17, kE});  // [B, 1 + patches, E], as the tiny encoder gives
  const Tensor got = adapter->project(features), want = resampler_reference(t, features);
  ASSERT_EQ(got.sizes(), (std::vector<int64_t>{2, kQ, kC}));
  EXPECT_TRUE(torch::allclose(got, want, 1e-5, 1e-5)) << (got - want).abs().max().item<double>();
  // Each image's tokens depend on its own features only.
  const Tensor one = adapter->project(features.slice(0, 1, 2));
  EXPECT_TRUE(torch::allclose(one, got.slice(0, 1, 2), 1e-6, 1e-6));
  EXPECT_THROW(adapter->project(torch::zeros({2, 8})), InvalidArgument);  // image_embeds, not hidden states
  fs::remove_all(dir);
}

// bf16 weights and features: the Resampler (fp32 soft-max) within 0.1 abs of the fp32 result, the bound of the
// plain adapter's bf16 test (tokens of LayerNorm scale; measured 0.034 on a Zen 4 with oneDNN's bf16 kernels).
TEST(IPAdapterPlus, Bf16WithinBound) {
  SD_REQUIRE_FIXTURES();
  if (!sd::cpu_has_onednn_bf16()) GTEST_SKIP() << "no oneDNN bf16 kernels on this CPU (" << sd::cpu_simd_level() << ")";
  auto unet = load_unet(test::fixture_path(kUNet));
  const std::string dir = test::make_temp_dir("ip_plus_bf16");
  const std::string file = write(dir, "ip-adapter-plus_tiny.safetensors", plus_tensors(*unet));
  auto fp32 = load_ip_adapter_weights(file, *unet, 8, torch::kFloat, torch::kCPU, kE);
  auto bf16 = load_ip_adapter_weights(file, *unet, 8, torch::kBFloat16, torch::kCPU, kE);
  torch::NoGradGuard ng;
  torch::manual_seed(4);
  const Tensor features = torch::randn({2, 17, kE});
  const Tensor want = fp32->project(features), got = bf16->project(features.to(torch::kBFloat16));
  EXPECT_EQ(got.scalar_type(), torch::kBFloat16);
  const double err = (got.to(torch::kFloat) - want).abs().max().item<double>();
  std::cout << "  [bf16] Resampler tokens: max abs err " << err << " (bound 0.1)\n";
  EXPECT_LT(err, 0.1);
  fs::remove_all(dir);
}

// hidden_states[-2] is the last layer's input: a copy of the encoder with its last layer removed ends there.
TEST(IPAdapterPlus, PenultimateHiddenStateIsTheLastLayersInput) {
  SD_REQUIRE_FIXTURES();
  auto two = load_clip_vision_model(test::fixture_path(kEncoder));
  ASSERT_EQ(two->config().num_hidden_layers, 2);
  CLIPVisionConfig c1 = two->config();
  c1.num_hidden_layers = 1;
  CLIPVisionModel one(c1);
  std::map<std::string, Tensor> weights;
  for (const auto& [k, v] : state_dict(*two))
    if (k.find("encoder.layers.1.") == std::string::npos) weights[k] = v;
  load_weights(*one, weights, "two-layer encoder");
  torch::NoGradGuard ng;
  torch::manual_seed(2);
  const Tensor px = torch::randn({2, 3, c1.image_size, c1.image_size});
  const auto a = two->forward(px), b = one->forward(px);
  EXPECT_TRUE(torch::equal(a.penultimate_hidden_state, b.last_hidden_state));
  EXPECT_FALSE(torch::equal(a.penultimate_hidden_state, a.last_hidden_state));
  // What Plus and full-face call stops there: the same numbers, with the last layer not run (its weights made NaN
  // leave them finite).
  EXPECT_TRUE(torch::equal(two->penultimate_hidden_state(px), a.penultimate_hidden_state));
  for (auto& p : two->vision_model->layers[1]->parameters()) p.fill_(std::nan(""));
  EXPECT_TRUE(torch::isnan(two->forward(px).last_hidden_state).all().item<bool>());
  EXPECT_TRUE(torch::equal(two->penultimate_hidden_state(px), a.penultimate_hidden_state));
}

// Through the folder loader: the image features are the penultimate hidden states (the unconditional ones those of
// zero pixel values), 16 tokens reach every attn2, scale 0 is the plain UNet bit for bit, and a real scale changes it.
TEST(IPAdapterPlus, UNetTakesTheTokensAndScaleZeroIsThePlainUNet) {
  SD_REQUIRE_FIXTURES();
  auto unet = load_unet(test::fixture_path(kUNet));
  const std::string dir = test::make_temp_dir("ip_plus_folder");
  write(dir, "ip-adapter-plus_sd15.safetensors", plus_tensors(*unet));
  fs::copy(test::fixture_path(kEncoder), dir + "/image_encoder", fs::copy_options::recursive);
  auto ip = load_ip_adapter(dir, *unet);
  ASSERT_TRUE(ip->adapter->plus());
  torch::NoGradGuard ng;
  const Tensor rgb = torch::randint(0, 256, {40, 48, 3}, torch::kUInt8);
  const Tensor features = ip->image_embeds(rgb);
  EXPECT_EQ(features.sizes(), (std::vector<int64_t>{1, 17, kE}));
  const auto& ec = ip->image_encoder->config();
  const Tensor px = clip_image_preprocess(rgb, ec.image_size);
  EXPECT_TRUE(torch::equal(features, ip->image_encoder->forward(px).penultimate_hidden_state));
  const Tensor uncond = ip->image_embeds(Tensor());
  EXPECT_TRUE(torch::equal(
      uncond, ip->image_encoder->forward(torch::zeros({1, 3, ec.image_size, ec.image_size})).penultimate_hidden_state));
  EXPECT_TRUE(torch::equal(ip->uncond_image_tokens, ip->image_tokens(uncond)));  // made once at load
  const Tensor tokens = torch::cat({ip->image_tokens(uncond), ip->image_tokens(features)});  // [2, 16, C]
  ASSERT_EQ(tokens.sizes(), (std::vector<int64_t>{2, kQ, kC}));
  expect_scale_zero_is_the_plain_unet(*unet, *ip->adapter, tokens, "Plus");
  fs::remove_all(dir);
}

// SDXL (no fixture adapter): made-up plain and Plus adapters for the tiny SDXL UNet (a block without attention, one
// of two transformer layers, cross_attention_dim 12) attach to all its attn2, take their tokens beside the added
// conditioning, are the plain UNet bit for bit at scale 0 and change it at 0.7.
TEST(IPAdapterPlus, SdxlUNetTakesPlainAndPlusTokens) {
  const std::string model = "sdxl/models/tiny-sdxl/unet";
  if (!test::fixture_exists(model + "/config.json")) GTEST_SKIP() << "no tiny-sdxl fixture";
  SD_REQUIRE_FIXTURES();
  const std::string dir = test::make_temp_dir("ip_sdxl");
  torch::NoGradGuard ng;
  for (const bool plus : {false, true}) {
    auto unet = load_unet(test::fixture_path(model));
    const auto slots = ip_adapter_cross_attentions(*unet);
    // down: 1 attention x 2 transformer layers; up: 2 x 2; mid: 1 x 2 (transformer_layers_per_block [1, 2]).
    ASSERT_EQ(slots.size(), 8u);
    const int64_t c = slots.front().attention->options.cross_attention_dim;
    Tensors t;
    if (plus) {
      t = plus_tensors(*unet);
    } else {
      torch::manual_seed(5);
      t["image_proj.proj.weight"] = torch::randn({4 * c, 8}) * 0.2;
      t["image_proj.proj.bias"] = torch::randn({4 * c}) * 0.2;
      t["image_proj.norm.weight"] = torch::ones({c});
      t["image_proj.norm.bias"] = torch::zeros({c});
      test::add_ip_branches(t, *unet);
    }
    const std::string file = write(dir, plus ? "plus.safetensors" : "plain.safetensors", t);
    auto adapter = load_ip_adapter_weights(file, *unet, 8, torch::kFloat, torch::kCPU, kE);
    EXPECT_EQ(adapter->plus(), plus);
    adapter->attach();
    torch::manual_seed(6);
    const Tensor features = plus ? torch::randn({2, 17, kE}) : torch::randn({2, 8});
    const Tensor tokens = adapter->project(features);  // [2, 4 | 16, 12]
    ASSERT_EQ(tokens.sizes(), (std::vector<int64_t>{2, plus ? kQ : 4, c}));
    expect_scale_zero_is_the_plain_unet(*unet, *adapter, tokens, plus ? "SDXL Plus" : "SDXL plain", true);
  }
  fs::remove_all(dir);
}

// ip-adapter-full-face: every penultimate hidden state becomes a token through the original's MLPProjModel,
// LayerNorm(Linear(GELU(Linear(x)))); 17 tokens with the tiny encoder (1 + 4 x 4 patches).
TEST(IPAdapterFullFace, ProjectionMatchesItsFormulaAndTheUNetTakesTheTokens) {
  SD_REQUIRE_FIXTURES();
  auto unet = load_unet(test::fixture_path(kUNet));
  const std::string dir = test::make_temp_dir("ip_full_face");
  torch::manual_seed(8);
  const std::string p = "image_proj.proj.";
  Tensors t = {{p + "0.weight", torch::randn({kE, kE}) * 0.3}, {p + "0.bias", torch::randn({kE})},
               {p + "2.weight", torch::randn({kC, kE}) * 0.3}, {p + "2.bias", torch::randn({kC})},
               {p + "3.weight", 1 + torch::randn({kC}) * 0.1}, {p + "3.bias", torch::randn({kC})}};
  test::add_ip_branches(t, *unet);
  write(dir, "ip-adapter-full-face_sd15.safetensors", t);
  fs::copy(test::fixture_path(kEncoder), dir + "/image_encoder", fs::copy_options::recursive);
  auto ip = load_ip_adapter(dir, *unet);
  ASSERT_TRUE(ip->adapter->full_face());
  EXPECT_FALSE(ip->adapter->plus());
  EXPECT_EQ(ip->adapter->num_tokens(), 17);
  std::set<std::string> names, keys;
  for (const auto& n : ip->adapter->named_parameters()) names.insert(n.key());
  for (const auto& kv : t) keys.insert(kv.first);
  EXPECT_EQ(names, keys);
  torch::NoGradGuard ng;
  const Tensor features = ip->image_embeds(torch::randint(0, 256, {32, 32, 3}, torch::kUInt8));  // [1, 17, 16]
  ASSERT_EQ(features.sizes(), (std::vector<int64_t>{1, 17, kE}));
  const Tensor h = torch::gelu(torch::matmul(features, t[p + "0.weight"].t()) + t[p + "0.bias"]);
  const Tensor want = torch::layer_norm(torch::matmul(h, t[p + "2.weight"].t()) + t[p + "2.bias"], {kC},
                                        t[p + "3.weight"], t[p + "3.bias"], 1e-5);
  const Tensor tokens = ip->image_tokens(features);
  EXPECT_TRUE(torch::allclose(tokens, want, 1e-5, 1e-5)) << (tokens - want).abs().max().item<double>();
  EXPECT_THROW(ip->image_tokens(torch::zeros({1, 16, kE})), InvalidArgument);  // not the encoder's 17 tokens
  EXPECT_TRUE(torch::equal(ip->uncond_image_tokens, ip->image_tokens(ip->image_embeds(Tensor()))));
  const Tensor both = torch::cat({ip->uncond_image_tokens, tokens});  // [2, 17, C]
  expect_scale_zero_is_the_plain_unet(*unet, *ip->adapter, both, "full-face");
  // Errors: another base model's width; no token count without the encoder.
  t[p + "2.weight"] = torch::zeros({48, kE});
  const std::string bad = write(dir, "ip-adapter-full-face_bad.safetensors", t);
  EXPECT_EQ(test::error_of([&] { load_ip_adapter_weights(bad, *unet, 8, torch::kFloat, torch::kCPU, kE, 17); }),
            bad + ": image_proj.proj.2.weight has shape [48, 16], expected [32, 16]: the adapter's "
                  "cross_attention_dim must be the UNet's 32 (an IP-Adapter for another base model?)");
  // A FaceID file (its MLP from a 512-d InsightFace embedding, then image_proj.norm) is refused by name, not read as
  // a full-face one.
  Tensors face = {{p + "0.weight", torch::zeros({64, 512})}, {p + "0.bias", torch::zeros({64})},
                  {p + "2.weight", torch::zeros({4 * kC, 64})}, {p + "2.bias", torch::zeros({4 * kC})},
                  {"image_proj.norm.weight", torch::ones({kC})}, {"image_proj.norm.bias", torch::zeros({kC})}};
  test::add_ip_branches(face, *unet);
  const std::string faceid = write(dir, "ip-adapter-faceid_sd15.safetensors", face);
  EXPECT_EQ(test::error_of([&] { load_ip_adapter_weights(faceid, *unet, 8, torch::kFloat, torch::kCPU, kE, 17); }),
            faceid + ": an IP-Adapter FaceID file (image_proj.proj.0 / perceiver_resampler: a projection of "
                     "InsightFace face embeddings) is not supported; plain, Plus and full-face IP-Adapters are");
  // proj.0 of another shape than [E, E] for the encoder, and a full-face file without it.
  t[p + "2.weight"] = torch::zeros({kC, kE});
  t[p + "0.weight"] = torch::zeros({kE, 8});
  const std::string fc1 = write(dir, "ip-adapter-full-face_fc1.safetensors", t);
  EXPECT_EQ(test::error_of([&] { load_ip_adapter_weights(fc1, *unet, 8, torch::kFloat, torch::kCPU, kE, 17); }),
            fc1 + ": image_proj.proj.0.weight has shape [16, 8], expected [E, E] (E: the image encoder's hidden_size, "
                  "16; a full-face IP-Adapter)");
  t.erase(p + "0.weight");
  const std::string no_fc1 = write(dir, "ip-adapter-full-face_nofc1.safetensors", t);
  const std::string missing = test::error_of([&] { load_ip_adapter_weights(no_fc1, *unet, 8); });
  EXPECT_EQ(missing.rfind(no_fc1 + ": missing key image_proj.proj.0.weight (expected shape [E, E] (a full-face "
                                   "IP-Adapter);", 0),
            0u)
      << missing;
  const std::string file = dir + "/ip-adapter-full-face_sd15.safetensors";
  EXPECT_EQ(test::error_of([&] { load_ip_adapter_weights(file, *unet, 8); }),
            "IP-Adapter " + file + ": a full-face adapter needs the image encoder's token count (load it with its "
            "image encoder)");
  fs::remove_all(dir);
}

TEST(IPAdapterPlus, BadFilesNameTheKeyAndTheExpectedShape) {
  SD_REQUIRE_FIXTURES();
  auto unet = load_unet(test::fixture_path(kUNet));
  const std::string dir = test::make_temp_dir("ip_plus_bad");
  struct Case {
    std::string name;
    std::function<void(Tensors&)> edit;
    std::string message;  // after "<file>: "
    int64_t hidden = kE;
  };
  const std::vector<Case> cases = {
      {"other_encoder", [](Tensors&) {},
       "image_proj.proj_in.weight has shape [24, 16], expected [24, 1280]: the image encoder's hidden_size is 1280 "
       "(a Plus file needs the image encoder it was trained with: h94's *_vit-h SDXL files use ViT-H, hidden_size "
       "1280, from models/image_encoder, not sdxl_models/image_encoder)",
       1280},
      {"other_cross_dim", [](Tensors& t) { t["image_proj.proj_out.weight"] = torch::zeros({48, kD}); },
       "image_proj.proj_out.weight has shape [48, 24], expected [32, 24]: the adapter's cross_attention_dim must be "
       "the UNet's 32 (an IP-Adapter for another base model?)"},
      {"latents", [](Tensors& t) { t["image_proj.latents"] = torch::zeros({kQ, kD}); },
       "image_proj.latents has shape [16, 24], expected [1, Q, D] (Q learnt queries of width D)"},
      {"to_kv", [](Tensors& t) { t["image_proj.layers.1.0.to_kv.weight"] = torch::zeros({128, kD}); },
       "image_proj.layers.1.0.to_kv.weight has shape [128, 24], expected [256, 24] (keys and values)"},
      {"heads", [](Tensors& t) {
         for (const char* k : {"image_proj.layers.0.0.to_q.weight", "image_proj.layers.1.0.to_q.weight"})
           t[k] = torch::zeros({100, kD});
       },
       "image_proj.layers.0.0.to_q.weight has shape [100, 24], expected [H x 64, 24] (heads of 64 channels)"},
      {"ff", [](Tensors& t) { t["image_proj.layers.0.1.1.weight"] = torch::zeros({kF}); },
       "image_proj.layers.0.1.1.weight has shape [96], expected [F, 24]"},
      {"missing", [](Tensors& t) { t.erase("image_proj.layers.1.1.3.weight"); },
       "missing key image_proj.layers.1.1.3.weight (an IP-Adapter Plus file: image_proj.latents, proj_in, proj_out, "
       "norm_out and image_proj.layers.N.{0.norm1, 0.norm2, 0.to_q, 0.to_kv, 0.to_out, 1.0, 1.1, 1.3})"},
  };
  for (const Case& c : cases) {
    Tensors t = plus_tensors(*unet);
    c.edit(t);
    const std::string file = write(dir, "ip-adapter-plus_" + c.name + ".safetensors", t);
    EXPECT_EQ(test::error_of([&] { load_ip_adapter_weights(file, *unet, 8, torch::kFloat, torch::kCPU, c.hidden); }),
              file + ": " + c.message)
        << c.name;
  }
  // A key the Resampler has no place for (a later IP-Adapter version's positional embedding) is named by the strict
  // load.
  Tensors t = plus_tensors(*unet);
  t["image_proj.pos_emb.weight"] = torch::zeros({257, kE});
  const std::string file = write(dir, "ip-adapter-plus_pos.safetensors", t);
  const std::string msg = test::error_of([&] { load_ip_adapter_weights(file, *unet, 8); });
  EXPECT_NE(msg.find("image_proj.pos_emb.weight"), std::string::npos) << msg;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace sd
