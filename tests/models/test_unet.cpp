// UNet2DConditionModel against diffusers 0.24 outputs (data-driven over models/* and the cases stored in
// modules/<model>/unet.safetensors), bf16 against the fp32 reference, config parsing/errors, the real
// architectures' parameter counts, autograd, and input-shape handling.
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/device.h"
#include "common/fixtures.h"
#include "models/int8.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/state_dict.h"
#include "models/unet_2d_condition.h"

namespace {

constexpr double kAtol = 1e-4, kRtol = 1e-5;  // fixture README: single module calls in float32
constexpr double kInt8RelL2 = 0.09;  // see Int8WithinMeasuredBound

struct UNetCase {
  std::string model;
  std::string name;   // key prefix in unet.safetensors
  std::string error;  // set when the case file could not be read at registration (the test then fails with it)
};

// Readable parameter names in gtest output.
void PrintTo(const UNetCase& c, std::ostream* os) { *os << c.model << "/" << c.name; }

std::string unet_cases_rel(const std::string& model) { return "modules/" + model + "/unet.safetensors"; }

// Every "<case>.out" key of every model's unet.safetensors names a case (its other tensors are checked by the
// test itself, so a malformed case fails instead of silently disappearing).
std::vector<UNetCase> discover_cases() {
  std::vector<UNetCase> out;
  for (const auto& model : sd::test::fixture_models()) {
    if (!sd::test::fixture_exists(unet_cases_rel(model))) continue;
    std::set<std::string> names;
    try {
      auto f = sd::SafeTensorsFile::open(sd::test::fixture_path(unet_cases_rel(model)));
      for (const auto& key : f.keys()) {
        const auto dot = key.rfind('.');
        names.insert(dot == std::string::npos ? key : key.substr(0, dot));
      }
    } catch (const std::exception& e) {
      out.push_back({model, "unreadable", e.what()});
      continue;
    }
    for (const auto& n : names) out.push_back({model, n, ""});
  }
  return out;
}

// Models are loaded once per (model, dtype) for the whole run.
sd::UNet2DConditionModel cached_unet(const std::string& model, torch::Dtype dtype) {
  static std::map<std::pair<std::string, int>, sd::UNet2DConditionModel> cache;
  auto key = std::make_pair(model, static_cast<int>(dtype));
  auto it = cache.find(key);
  if (it == cache.end())
    it = cache.emplace(key, sd::load_unet(sd::test::fixture_path("models/" + model + "/unet"), dtype)).first;
  return it->second;
}

struct CaseTensors {
  torch::Tensor sample, timestep, context, out;
};

CaseTensors load_case(const UNetCase& c) {
  if (!c.error.empty()) throw std::runtime_error(c.error);
  auto f = sd::SafeTensorsFile::open(sd::test::fixture_path(unet_cases_rel(c.model)));
  return {f.get(c.name + ".sample"), f.get(c.name + ".timestep"), f.get(c.name + ".encoder_hidden_states"),
          f.get(c.name + ".out")};
}

class UNetGolden : public ::testing::TestWithParam<UNetCase> {};

TEST_P(UNetGolden, MatchesDiffusersFp32) {
  const auto& c = GetParam();
  auto t = load_case(c);
  ASSERT_EQ(t.timestep.scalar_type(), torch::kLong);
  ASSERT_EQ(t.timestep.size(0), t.sample.size(0));
  auto unet = cached_unet(c.model, torch::kFloat);
  torch::InferenceMode im;
  auto out = unet->forward(t.sample, t.timestep, t.context);
  EXPECT_EQ(out.scalar_type(), torch::kFloat);
  SD_EXPECT_CLOSE(out, t.out, kAtol, kRtol, c.model + " " + c.name);
}

// bf16 weights and activations (norm statistics, attention and the timestep embedding in fp32) against the fp32
// reference. Measured max abs err / max|ref| on the fixture cases: tiny-sd15 1.09-1.41%, tiny-sd21 1.78-2.47%
// (worst: tiny-sd21 b3_same, 4.8e-2 of 1.94). For scale: only rounding the weights to bf16 (fp32 compute) already
// gives 0.6-1.7%; the rest is the activation rounding (8 mantissa bits, ~40 layers deep, random weights).
// Bound: 6% of max|ref| (about 2.4x headroom).
TEST_P(UNetGolden, Bf16WithinMeasuredBound) {
  // The bound is of oneDNN's bf16 kernels (AVX-512). Without them (an AVX2 CPU) libtorch's generic bf16
  // convolutions round along the way: measured 4.8-6.8% on tiny-sd21 there, and 20x slower than fp32 - loading a
  // bf16 pipeline on such a CPU warns to use fp32.
  if (!sd::cpu_has_onednn_bf16()) GTEST_SKIP() << "no oneDNN bf16 kernels on this CPU (" << sd::cpu_simd_level() << ")";
  const auto& c = GetParam();
  auto t = load_case(c);
  auto unet = cached_unet(c.model, torch::kBFloat16);
  torch::InferenceMode im;
  auto out = unet->forward(t.sample.to(torch::kBFloat16), t.timestep, t.context.to(torch::kBFloat16));
  EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
  SD_EXPECT_CLOSE(out, t.out, 0.0, 6e-2, c.model + " " + c.name + " bf16");
}

// int8 linear layers (`--dtype int8`, models/int8.h; convolutions stay float) over fp32 or bf16 activations, against
// the fp32 reference. Relative L2 of the output (the measure the issue asks for; the per-element max of a quantized
// model is dominated by a few outliers). Measured (libtorch 2.15, AMX-INT8, 2-core Xeon family 6 model 167): tiny-sd15
// 1.5-1.9% (fp32 activations) / 1.8-2.6% (bf16), tiny-sd21 2.9-3.4% / 3.0-4.4%. Bound: 9% (2x headroom).
sd::UNet2DConditionModel cached_int8_unet(const std::string& model, torch::Dtype dtype) {
  static std::map<std::pair<std::string, int>, sd::UNet2DConditionModel> cache;
  auto key = std::make_pair(model, static_cast<int>(dtype));
  auto it = cache.find(key);
  if (it == cache.end()) {
    auto unet = sd::load_unet(sd::test::fixture_path("models/" + model + "/unet"), dtype);
    EXPECT_GT(unet->quantize_int8(), 0);
    it = cache.emplace(key, unet).first;
  }
  return it->second;
}

TEST_P(UNetGolden, Int8WithinMeasuredBound) {
  if (!sd::int8::available()) GTEST_SKIP() << sd::int8::unavailable_reason();
  const auto& c = GetParam();
  auto t = load_case(c);
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    if (dtype == torch::kBFloat16 && !sd::cpu_has_onednn_bf16()) continue;
    auto unet = cached_int8_unet(c.model, dtype);
    torch::InferenceMode im;
    auto out = unet->forward(t.sample.to(dtype), t.timestep, t.context.to(dtype));
    EXPECT_EQ(out.scalar_type(), dtype);
    const double rel = ((out.to(torch::kFloat) - t.out).norm() / t.out.norm()).item<double>();
    std::printf("int8 %s %s %s: relative L2 %.4f\n", c.model.c_str(), c.name.c_str(), c10::toString(dtype), rel);
    EXPECT_LT(rel, kInt8RelL2) << c.model << " " << c.name << " " << c10::toString(dtype);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, UNetGolden, ::testing::ValuesIn(discover_cases()),
                         [](const auto& info) { return sd::test::test_name(info.param.model + "_" + info.param.name); });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(UNetGolden);

// ---- config --------------------------------------------------------------------------------------------------

sd::UNet2DConditionConfig config_of(const nlohmann::json& j) {
  return sd::UNet2DConditionConfig::from_json(j, "unet/config.json");
}

// A small valid config (two blocks, like the fixtures) to vary in the tests below.
nlohmann::json tiny_json() {
  return nlohmann::json::parse(R"({
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "cross_attention_dim": 16,
    "attention_head_dim": [2, 4],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]
  })");
}

void expect_config_error(const nlohmann::json& j, const std::vector<std::string>& fragments) {
  try {
    config_of(j);
    FAIL() << "no error for " << j.dump();
  } catch (const sd::FormatError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("unet/config.json"), std::string::npos) << m;
    for (const auto& f : fragments) EXPECT_NE(m.find(f), std::string::npos) << "missing '" << f << "' in: " << m;
  }
}

TEST(UNetConfig, DiffusersDefaults) {
  auto c = config_of(nlohmann::json::object());
  EXPECT_EQ(c.block_out_channels, (std::vector<int64_t>{320, 640, 1280, 1280}));
  EXPECT_EQ(c.layers_per_block, (std::vector<int64_t>{2, 2, 2, 2}));
  EXPECT_EQ(c.transformer_layers_per_block, (std::vector<int64_t>{1, 1, 1, 1}));
  EXPECT_EQ(c.only_cross_attention, (std::vector<bool>{false, false, false, false}));
  EXPECT_EQ(c.time_cond_proj_dim, 0);
  EXPECT_EQ(c.num_attention_heads, (std::vector<int64_t>{8, 8, 8, 8}));
  EXPECT_EQ(c.cross_attention_dim, (std::vector<int64_t>{1280, 1280, 1280, 1280}));
  EXPECT_EQ(c.norm_num_groups, 32);
  EXPECT_DOUBLE_EQ(c.norm_eps, 1e-5);
  EXPECT_TRUE(c.flip_sin_to_cos);
  EXPECT_EQ(c.freq_shift, 0);
  EXPECT_FALSE(c.use_linear_projection);
  EXPECT_FALSE(c.upcast_attention);
  EXPECT_EQ(c.mid_block_type, "UNetMidBlock2DCrossAttn");
  EXPECT_EQ(c.time_embed_dim(), 1280);
}

TEST(UNetConfig, FixtureConfigsParse) {
  for (const auto& model : sd::test::fixture_models()) {
    const auto path = sd::test::fixture_path("models/" + model + "/unet/config.json");
    auto c = sd::UNet2DConditionConfig::from_json(sd::read_json_file(path), path);
    EXPECT_EQ(c.block_out_channels.size(), c.down_block_types.size()) << model;
  }
}

TEST(UNetConfig, HeadCountsFromAttentionHeadDimAndNumAttentionHeads) {
  auto j = tiny_json();
  j["attention_head_dim"] = 8;  // legacy name = number of heads, broadcast to every block
  EXPECT_EQ(config_of(j).num_attention_heads, (std::vector<int64_t>{8, 8}));
  j["attention_head_dim"] = {2, 4};
  EXPECT_EQ(config_of(j).num_attention_heads, (std::vector<int64_t>{2, 4}));
  j["num_attention_heads"] = {4, 8};  // takes precedence when given
  EXPECT_EQ(config_of(j).num_attention_heads, (std::vector<int64_t>{4, 8}));
  // The head count decides the layout: up blocks use the reversed list, the mid block the last entry.
  j.erase("num_attention_heads");
  sd::UNet2DConditionModel m(config_of(j));
  EXPECT_EQ(m->down_list[0]->attention_list[0]->options.heads, 2);
  EXPECT_EQ(m->down_list[0]->attention_list[0]->options.dim_head, 16);
  EXPECT_EQ(m->mid_block->attention_list[0]->options.heads, 4);
  EXPECT_EQ(m->up_list[1]->attention_list[0]->options.heads, 2);
  EXPECT_TRUE(m->up_list[0]->attention_list.empty());
}

TEST(UNetConfig, UnsupportedFieldsAreNamed) {
  const std::vector<std::pair<std::string, nlohmann::json>> cases = {
      {"addition_embed_type", "image"},  // "text_time" (SDXL) is supported
      {"class_embed_type", "timestep"},
      {"num_class_embeds", 10},
      {"encoder_hid_dim", 768},
      {"encoder_hid_dim_type", "text_proj"},
      {"time_embedding_act_fn", "silu"},
      {"timestep_post_act", "silu"},
      {"resnet_time_scale_shift", "scale_shift"},
      {"mid_block_type", "UNetMidBlock2DSimpleCrossAttn"},
      {"dual_cross_attention", true},
      {"time_embedding_type", "fourier"},
      {"act_fn", "gelu"},
      {"attention_type", "gated"},
      {"down_block_types", {"SimpleCrossAttnDownBlock2D", "DownBlock2D"}},
      {"up_block_types", {"UpBlock2D", "AttnUpBlock2D"}},
      {"reverse_transformer_layers_per_block", {{1}, {1}}},
  };
  for (const auto& [key, value] : cases) {
    SCOPED_TRACE(key + " = " + value.dump());
    auto j = tiny_json();
    j[key] = value;
    expect_config_error(j, {"'" + key + "'", "not supported"});
  }
  // Explicit defaults / nulls are accepted.
  auto j = tiny_json();
  j["addition_embed_type"] = nullptr;
  j["only_cross_attention"] = {false, false};
  j["transformer_layers_per_block"] = 1;
  j["resnet_time_scale_shift"] = "default";
  j["time_cond_proj_dim"] = nullptr;
  EXPECT_NO_THROW(config_of(j));
}

TEST(UNetConfig, WrongTypesAndInconsistentShapesAreNamed) {
  auto with = [](const std::string& key, const nlohmann::json& v) {
    auto j = tiny_json();
    j[key] = v;
    return j;
  };
  expect_config_error(with("block_out_channels", "wide"), {"'block_out_channels'", "list of integers"});
  expect_config_error(with("layers_per_block", 1.5), {"'layers_per_block'", "integer"});
  expect_config_error(with("use_linear_projection", "yes"), {"'use_linear_projection'", "true or false"});
  expect_config_error(with("attention_head_dim", {1, 2, 3}), {"'attention_head_dim'", "2 integers"});
  expect_config_error(with("cross_attention_dim", "x"), {"'cross_attention_dim'"});
  expect_config_error(with("norm_eps", "small"), {"'norm_eps'", "a number"});
  expect_config_error(with("only_cross_attention", 3), {"'only_cross_attention'"});
  expect_config_error(with("only_cross_attention", {true}), {"'only_cross_attention'", "list of 2 booleans"});
  expect_config_error(with("layers_per_block", {1, 2, 3}), {"'layers_per_block'", "2 integers"});
  expect_config_error(with("layers_per_block", {1, 0}), {"'layers_per_block' must be positive"});
  expect_config_error(with("transformer_layers_per_block", {{1}, {1, 2}}), {"'transformer_layers_per_block'"});
  expect_config_error(with("transformer_layers_per_block", 0), {"'transformer_layers_per_block' must be positive"});
  expect_config_error(with("time_cond_proj_dim", 0), {"'time_cond_proj_dim'"});
  expect_config_error(with("block_out_channels", {32, 64, 128}), {"block_out_channels has 3 entries"});
  expect_config_error(with("up_block_types", {"UpBlock2D"}), {"up_block_types has 1 entries"});
  expect_config_error(with("norm_num_groups", 5), {"norm_num_groups"});
  expect_config_error(with("attention_head_dim", {3, 4}), {"not divisible by 3 attention heads"});
  expect_config_error(with("norm_num_groups", nullptr), {"'norm_num_groups'"});
}

// The real architectures' parameter counts, built in memory (parameters are empty: construction is cheap).
TEST(UNet2DConditionModel, FullSizeParameterCounts) {
  auto sd_turbo = config_of(nlohmann::json::parse(
      R"({"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": true})"));
  EXPECT_EQ(sd::count_parameters(*sd::UNet2DConditionModel(sd_turbo)), 865910724);
  auto sd15 = config_of(nlohmann::json::parse(R"({"attention_head_dim": 8, "cross_attention_dim": 768})"));
  EXPECT_EQ(sd::count_parameters(*sd::UNet2DConditionModel(sd15)), 859520964);
}

TEST(UNet2DConditionModel, KeysAreDiffusersNames) {
  auto c = config_of(nlohmann::json::parse(R"({"attention_head_dim": 8, "cross_attention_dim": 768})"));
  auto sdict = sd::state_dict(*sd::UNet2DConditionModel(c));
  for (const char* k : {"conv_in.weight", "time_embedding.linear_1.weight", "time_embedding.linear_2.bias",
                        "down_blocks.0.resnets.0.norm1.weight", "down_blocks.0.resnets.1.time_emb_proj.weight",
                        "down_blocks.1.resnets.0.conv_shortcut.weight", "down_blocks.0.downsamplers.0.conv.weight",
                        "down_blocks.0.attentions.1.proj_in.weight", "down_blocks.0.attentions.0.norm.bias",
                        "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                        "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                        "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_out.0.bias",
                        "down_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
                        "down_blocks.2.attentions.0.transformer_blocks.0.ff.net.2.weight",
                        "down_blocks.2.attentions.0.transformer_blocks.0.norm3.weight",
                        "mid_block.resnets.1.conv2.weight", "mid_block.attentions.0.proj_out.bias",
                        "up_blocks.0.resnets.2.conv_shortcut.weight", "up_blocks.0.upsamplers.0.conv.weight",
                        "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_v.weight",
                        "conv_norm_out.weight", "conv_out.bias"})
    EXPECT_TRUE(sdict.count(k)) << k;
  for (const char* k : {"down_blocks.3.attentions.0.norm.weight", "down_blocks.3.downsamplers.0.conv.weight",
                        "up_blocks.3.upsamplers.0.conv.weight", "up_blocks.0.attentions.0.norm.weight",
                        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.bias"})
    EXPECT_FALSE(sdict.count(k)) << k;
  EXPECT_EQ(sdict.size(), 686u);  // diffusers' SD1.5 UNet state dict has 686 tensors
}

// ---- behaviour with random weights -------------------------------------------------------------------------

sd::UNet2DConditionModel random_tiny_unet(bool linear_proj) {
  auto j = tiny_json();
  j["use_linear_projection"] = linear_proj;
  sd::UNet2DConditionModel m(config_of(j));
  torch::manual_seed(0);
  torch::NoGradGuard ng;
  for (auto& p : m->named_parameters()) {
    const auto& name = p.key();
    auto& t = p.value();
    if (t.dim() >= 2) {
      t.normal_(0.0, 1.0 / std::sqrt(static_cast<double>(t.numel() / t.size(0))));
    } else if (name.find("norm") != std::string::npos && name.size() > 6 &&
               name.compare(name.size() - 6, 6, "weight") == 0) {
      t.normal_(1.0, 0.1);
    } else {
      t.normal_(0.0, 0.05);
    }
  }
  m->eval();
  return m;
}

TEST(UNet2DConditionModel, ScalarAndBroadcastTimestepsEqualPerItemTimesteps) {
  auto m = random_tiny_unet(true);
  torch::manual_seed(1);
  auto x = torch::randn({2, 4, 8, 8});
  auto ctx = torch::randn({2, 7, 16});
  torch::InferenceMode im;
  auto per_item = m->forward(x, torch::tensor({500, 500}, torch::kLong), ctx);
  EXPECT_TRUE(torch::equal(m->forward(x, torch::tensor(500, torch::kLong), ctx), per_item));
  EXPECT_TRUE(torch::equal(m->forward(x, torch::tensor({500}, torch::kLong), ctx), per_item));
  // Items are independent: a batch of two different timesteps equals the two single-item runs.
  auto mixed = m->forward(x, torch::tensor({999, 3}, torch::kLong), ctx);
  auto a = m->forward(x.slice(0, 0, 1), torch::tensor({999}, torch::kLong), ctx.slice(0, 0, 1));
  auto b = m->forward(x.slice(0, 1, 2), torch::tensor({3}, torch::kLong), ctx.slice(0, 1, 2));
  EXPECT_TRUE(torch::allclose(mixed, torch::cat({a, b}), 1e-5, 1e-5));
  EXPECT_FALSE(torch::allclose(a, per_item.slice(0, 0, 1), 1e-3, 1e-3));
  EXPECT_THROW(m->forward(x, torch::tensor({1, 2, 3}, torch::kLong), ctx), sd::InvalidArgument);
  EXPECT_THROW(m->forward(x, torch::tensor({1, 2}, torch::kLong), torch::randn({2, 7, 15})), sd::InvalidArgument);
  EXPECT_THROW(m->forward(torch::randn({2, 3, 8, 8}), torch::tensor({1, 2}, torch::kLong), ctx),
               sd::InvalidArgument);
}

// A latent size that is not a multiple of the total down factor: diffusers upsamples to the skip's size.
TEST(UNet2DConditionModel, OddLatentSizeUpsamplesToSkipSize) {
  auto m = random_tiny_unet(false);
  torch::InferenceMode im;
  auto out = m->forward(torch::randn({1, 4, 7, 9}), torch::tensor({10}, torch::kLong), torch::randn({1, 5, 16}));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{1, 4, 7, 9}));
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
}

// mid_block_type null: no mid block (diffusers allows it); the skips still line up.
TEST(UNet2DConditionModel, WithoutMidBlock) {
  auto j = tiny_json();
  j["mid_block_type"] = nullptr;
  sd::UNet2DConditionModel m(config_of(j));
  EXPECT_FALSE(m->mid_block);
  for (const auto& kv : sd::state_dict(*m)) EXPECT_EQ(kv.first.rfind("mid_block", 0), std::string::npos) << kv.first;
  for (auto& p : m->parameters()) {
    torch::NoGradGuard ng;
    p.normal_(0.0, 0.1);
  }
  torch::InferenceMode im;
  EXPECT_EQ(m->forward(torch::randn({1, 4, 8, 8}), torch::tensor(1), torch::randn({1, 3, 16})).sizes(),
            (std::vector<int64_t>{1, 4, 8, 8}));
}

// The module is trainable: gradients reach every parameter (a later issue trains a tiny UNet).
TEST(UNet2DConditionModel, BackwardReachesEveryParameter) {
  for (bool linear : {false, true}) {
    auto m = random_tiny_unet(linear);
    m->train();
    auto out = m->forward(torch::randn({2, 4, 8, 8}), torch::tensor({10, 900}, torch::kLong),
                          torch::randn({2, 5, 16}));
    out.square().mean().backward();
    for (const auto& p : m->named_parameters()) {
      ASSERT_TRUE(p.value().grad().defined()) << p.key();
      EXPECT_TRUE(torch::isfinite(p.value().grad()).all().item<bool>()) << p.key();
    }
  }
}

TEST(UNetLoad, FixtureLoadsInFp32AndBf16) {
  for (const auto& model : sd::test::fixture_models()) {
    for (auto dt : {torch::kFloat, torch::kBFloat16}) {
      auto m = sd::load_unet(sd::test::fixture_path("models/" + model + "/unet"), dt);
      for (const auto& p : m->parameters()) EXPECT_EQ(p.scalar_type(), dt) << model;
      EXPECT_FALSE(m->is_training());
    }
  }
}

TEST(UNetLoad, MismatchedWeightsAreReported) {
  const auto dir = sd::test::make_temp_dir("sd-unet");
  auto j = tiny_json();
  std::ofstream(dir + "/config.json") << j.dump();
  auto w = sd::state_dict(*random_tiny_unet(false));
  w.erase("conv_out.bias");
  w["down_blocks.0.attentions.0.proj_in.weight"] = torch::zeros({32, 32});  // a Linear proj in a conv-proj config
  sd::save_safetensors(dir + "/diffusion_pytorch_model.safetensors", w);
  try {
    sd::load_unet(dir);
    FAIL();
  } catch (const sd::FormatError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("diffusion_pytorch_model.safetensors"), std::string::npos) << msg;
    EXPECT_NE(msg.find("conv_out.bias"), std::string::npos) << msg;
    EXPECT_NE(msg.find("proj_in.weight: file has [32, 32], model expects [32, 32, 1, 1]"), std::string::npos) << msg;
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
