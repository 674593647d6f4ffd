// IP-Adapter against diffusers 0.24 + transformers 4.35 (fixtures ipadapter/, README "## IP-Adapter"): the image
// encoder (CLIPVisionModelWithProjection, with CLIPImageProcessor's normalisation from the uint8 frames), the layout
// of the weights file against the UNet's cross-attentions, the UNet with the decoupled cross-attention at scale 0.6
// (ip_tokens and out per named case; scale 0 equals the plain UNet), a measured bf16 bound, and the loader's errors
// (wrong cross_attention_dim, missing key, truncated file, pickles, wrong projection_dim). Tolerances: the README's
// modules bound, atol 1e-4 + rtol 1e-5 x max|ref|.
#include <filesystem>
#include <fstream>
#include <set>

#include <gtest/gtest.h>

#include "core/device.h"
#include <nlohmann/json.hpp>

#include "common/error_of.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "models/clip_vision_model.h"
#include "models/ip_adapter.h"
#include "models/unet_2d_condition.h"

namespace sd {
namespace {

namespace fs = std::filesystem;
using torch::Tensor;

constexpr double kAtol = 1e-4, kRtol = 1e-5;
const std::string kAdapterDir = "ipadapter/models/tiny-ip-adapter-sd15";
const std::string kAdapterFile = kAdapterDir + "/ip-adapter_tiny-ip-adapter-sd15.safetensors";
const std::string kUNet = "models/tiny-sd15/unet";

bool have_fixtures() {
  return test::fixture_exists(kAdapterFile) && test::fixture_exists("ipadapter/cases.json") &&
         test::fixture_exists(kUNet + "/config.json");
}

#define SD_REQUIRE_IP() \
  if (!have_fixtures()) GTEST_SKIP() << kAdapterFile << " not in the fixture root"

nlohmann::json cases_json() { return read_json_file(test::fixture_path("ipadapter/cases.json")); }

// A fresh UNet per test (the adapter attaches to its attn2 modules).
UNet2DConditionModel fresh_unet(torch::ScalarType dtype = torch::kFloat) {
  return load_unet(test::fixture_path(kUNet), dtype);
}

using test::error_of;

#define SD_EXPECT_HAS(text, part) EXPECT_NE((text).find(part), std::string::npos) << (text)

// ---- image encoder --------------------------------------------------------------------------------------------

TEST(IPAdapterImageEncoder, ConfigFromJson) {
  SD_REQUIRE_IP();
  const auto enc = load_clip_vision_model(test::fixture_path(kAdapterDir + "/image_encoder"));
  const auto& c = enc->config();
  EXPECT_EQ(c.hidden_size, 16);
  EXPECT_EQ(c.num_hidden_layers, 2);
  EXPECT_EQ(c.num_attention_heads, 2);
  EXPECT_EQ(c.intermediate_size, 64);
  EXPECT_EQ(c.image_size, 32);
  EXPECT_EQ(c.patch_size, 8);
  EXPECT_EQ(c.projection_dim, 8);
  EXPECT_EQ(c.hidden_act, "gelu");
  EXPECT_FALSE(enc->visual_projection->bias.defined());
  EXPECT_FALSE(enc->vision_model->patch_embedding->bias.defined());
}

struct VisionField {
  std::string name, json, field;
};
void PrintTo(const VisionField& f, std::ostream* os) { *os << f.name; }

class IPAdapterVisionConfigError : public ::testing::TestWithParam<VisionField> {};

TEST_P(IPAdapterVisionConfigError, NamesFileAndField) {
  const auto& p = GetParam();
  const std::string msg = error_of([&] {
    CLIPVisionConfig::from_json(nlohmann::json::parse(p.json), "image_encoder/config.json");
  });
  SD_EXPECT_HAS(msg, "image_encoder/config.json");
  SD_EXPECT_HAS(msg, p.field);
}

INSTANTIATE_TEST_SUITE_P(
    Fields, IPAdapterVisionConfigError,
    ::testing::Values(VisionField{"bad_act", R"({"hidden_act": "relu"})", "hidden_act"},
                      VisionField{"patch_not_divisor", R"({"image_size": 30, "patch_size": 8})", "patch_size"},
                      VisionField{"heads_not_divisor", R"({"hidden_size": 10, "num_attention_heads": 4})",
                                  "num_attention_heads"},
                      VisionField{"zero_projection", R"({"projection_dim": 0})", "projection_dim"},
                      VisionField{"string_size", R"({"image_size": "big"})", "image_size"}),
    [](const auto& info) { return info.param.name; });

class IPAdapterImageEncoderGolden : public ::testing::TestWithParam<std::string> {};

// One named check per reference tensor; every output comes from the uint8 frames through the preprocessor.
TEST_P(IPAdapterImageEncoderGolden, MatchesTransformers) {
  SD_REQUIRE_IP();
  const std::string what = GetParam();
  static auto enc = load_clip_vision_model(test::fixture_path(kAdapterDir + "/image_encoder"));
  const auto ref = SafeTensorsFile::open(test::fixture_path("ipadapter/modules/image_encoder.safetensors"));
  torch::NoGradGuard ng;
  const Tensor pixels = clip_image_preprocess(ref.get("image_u8"), enc->config().image_size);
  if (what == "pixel_values") {
    SD_EXPECT_CLOSE(pixels, ref.get("pixel_values"), kAtol, kRtol, "pixel_values");
    return;
  }
  const auto out = enc->forward(pixels);
  const Tensor actual = what == "image_embeds"        ? out.image_embeds
                        : what == "last_hidden_state" ? out.last_hidden_state
                                                      : out.pooler_output;
  SD_EXPECT_CLOSE(actual, ref.get(what), kAtol, kRtol, what);
}

INSTANTIATE_TEST_SUITE_P(TinyIPAdapter, IPAdapterImageEncoderGolden,
                         ::testing::Values("pixel_values", "image_embeds", "last_hidden_state", "pooler_output"),
                         [](const auto& info) { return test::test_name(info.param); });

TEST(IPAdapterImageEncoder, PreprocessResizesAndCropsLikeCLIPImageProcessor) {
  // A 48x64 image: shortest side 48 -> 32 (the long side int(32 * 64 / 48) = 42), centre crop 32x32 from left 5.
  const Tensor img = torch::arange(48 * 64 * 3, torch::kLong).remainder(256).to(torch::kUInt8).view({48, 64, 3});
  const Tensor px = clip_image_preprocess(img, 32);
  EXPECT_EQ(px.sizes(), (std::vector<int64_t>{1, 3, 32, 32}));
  // A uniform image stays uniform through resize and crop: (v / 255 - mean) / std per channel.
  const Tensor flat = torch::full({40, 70, 3}, 200, torch::kUInt8);
  const Tensor f = clip_image_preprocess(flat, 32);
  EXPECT_NEAR(f[0][0].mean().item<double>(), (200.0 / 255 - 0.48145466) / 0.26862954, 1e-5);
  EXPECT_NEAR(f[0][2].mean().item<double>(), (200.0 / 255 - 0.40821073) / 0.27577711, 1e-5);
  // Identity at the target size: the plain normalisation.
  const Tensor same = torch::full({32, 32, 3}, 10, torch::kUInt8);
  EXPECT_NEAR(clip_image_preprocess(same, 32)[0][1][5][7].item<double>(), (10.0 / 255 - 0.4578275) / 0.26130258,
              1e-6);
  EXPECT_THROW(clip_image_preprocess(torch::zeros({32, 32, 3}, torch::kFloat), 32), InvalidArgument);
  EXPECT_THROW(clip_image_preprocess(torch::zeros({32, 32, 4}, torch::kUInt8), 32), InvalidArgument);
}

// ---- the weights layout ----------------------------------------------------------------------------------------

TEST(IPAdapterLayout, CrossAttentionOrderMatchesDiffusersAttnProcessors) {
  SD_REQUIRE_IP();
  auto unet = fresh_unet();
  const auto slots = ip_adapter_cross_attentions(*unet);
  const auto layout = cases_json().at("ip_adapter_layout");
  ASSERT_EQ(slots.size(), layout.size());
  for (size_t i = 0; i < slots.size(); ++i) {
    const auto& e = layout[i];
    EXPECT_EQ(slots[i].key_id, e.at("key_id").get<int64_t>()) << i;
    EXPECT_EQ(slots[i].name + ".processor", e.at("processor").get<std::string>()) << i;
    EXPECT_EQ(slots[i].attention->options.heads * slots[i].attention->options.dim_head,
              e.at("hidden_size").get<int64_t>())
        << i;
  }
}

TEST(IPAdapterLayout, RegisteredNamesAreTheFileKeys) {
  SD_REQUIRE_IP();
  auto unet = fresh_unet();
  const auto file = SafeTensorsFile::open(test::fixture_path(kAdapterFile));
  auto adapter = load_ip_adapter_weights(file.path(), *unet, 8);
  std::set<std::string> names, keys;
  for (const auto& p : adapter->named_parameters()) names.insert(p.key());
  for (const auto& k : file.keys()) keys.insert(k);
  EXPECT_EQ(names, keys);
  EXPECT_EQ(adapter->num_tokens(), 4);
  EXPECT_EQ(adapter->cross_attention_dim(), 32);
  EXPECT_EQ(adapter->image_embed_dim(), 8);
  EXPECT_DOUBLE_EQ(adapter->scale(), 1.0);  // diffusers' load_ip_adapter: scale 1.0 until set_ip_adapter_scale
  EXPECT_FALSE(adapter->attached());
}

TEST(IPAdapterLayout, FolderAndFileFindTheImageEncoder) {
  SD_REQUIRE_IP();
  const auto a = find_ip_adapter(test::fixture_path(kAdapterDir));
  const auto b = find_ip_adapter(test::fixture_path(kAdapterFile));
  EXPECT_EQ(fs::path(a.weights).filename(), fs::path(kAdapterFile).filename());
  EXPECT_EQ(fs::weakly_canonical(a.weights), fs::weakly_canonical(b.weights));
  EXPECT_EQ(fs::weakly_canonical(a.image_encoder_dir), fs::weakly_canonical(b.image_encoder_dir));
  EXPECT_EQ(fs::path(a.image_encoder_dir).filename(), "image_encoder");
}

// ---- the UNet with the decoupled cross-attention ---------------------------------------------------------------

class IPAdapterUNet : public ::testing::TestWithParam<std::string> {};

struct UNetIpFixture {
  UNet2DConditionModel unet{nullptr};
  std::shared_ptr<IPAdapterModels> ip;
};

UNetIpFixture& unet_ip_fp32() {
  static UNetIpFixture f = [] {
    UNetIpFixture x;
    x.unet = fresh_unet();
    x.ip = load_ip_adapter(test::fixture_path(kAdapterDir), *x.unet);
    return x;
  }();
  return f;
}

TEST_P(IPAdapterUNet, MatchesDiffusersAtScale) {
  SD_REQUIRE_IP();
  const std::string c = GetParam();
  auto& f = unet_ip_fp32();
  const auto ref = SafeTensorsFile::open(test::fixture_path("ipadapter/modules/unet_ip.safetensors"));
  const double scale = cases_json().at("modules").at("unet_ip").at("scale").get<double>();
  torch::NoGradGuard ng;
  const Tensor tokens = f.ip->image_tokens(ref.get(c + ".image_embeds"));
  SD_EXPECT_CLOSE(tokens, ref.get(c + ".ip_tokens"), kAtol, kRtol, c + " ip_tokens");
  const Tensor sample = ref.get(c + ".sample"), t = ref.get(c + ".timestep");
  const Tensor ctx = torch::cat({ref.get(c + ".encoder_hidden_states"), tokens}, 1);  // [B, 77 + 4, C]
  f.ip->adapter->set_scale(scale);
  const Tensor out = f.unet->forward(sample, t, ctx);
  SD_EXPECT_CLOSE(out, ref.get(c + ".out"), kAtol, kRtol, c + " out (scale " + std::to_string(scale) + ")");
  // The adapter changes the output well beyond the tolerance (README: up to 0.84).
  EXPECT_GT((out - ref.get(c + ".out_without_ip_adapter")).abs().max().item<double>(), 0.1);
  // Scale 0: the plain UNet, exactly (diffusers measured 0), and against the plain reference within the bound.
  f.ip->adapter->set_scale(0.0);
  const Tensor out0 = f.unet->forward(sample, t, ctx);
  SD_EXPECT_CLOSE(out0, ref.get(c + ".out_without_ip_adapter"), kAtol, kRtol, c + " scale 0 vs plain reference");
  f.ip->adapter->detach();
  const Tensor plain = f.unet->forward(sample, t, ref.get(c + ".encoder_hidden_states"));
  f.ip->adapter->attach();
  EXPECT_TRUE(torch::equal(out0, plain)) << "scale 0 differs from the plain UNet by "
                                         << (out0 - plain).abs().max().item<double>();
  f.ip->adapter->set_scale(1.0);
}

TEST(IPAdapterUNetUncond, ZeroImageEmbedsGiveTheUncondTokens) {
  SD_REQUIRE_IP();
  const std::string c = "b2_cfg";  // the case with an uncond row
  auto& f = unet_ip_fp32();
  const auto ref = SafeTensorsFile::open(test::fixture_path("ipadapter/modules/unet_ip.safetensors"));
  torch::NoGradGuard ng;
  // Row 0 of b2_cfg is diffusers' unconditional image: zeros, whose tokens are LayerNorm(bias), not zeros.
  EXPECT_TRUE(torch::equal(ref.get(c + ".image_embeds")[0], torch::zeros({8})));
  const Tensor zero_embeds = f.ip->image_embeds(Tensor());
  EXPECT_EQ(zero_embeds.sizes(), (std::vector<int64_t>{1, 8}));
  const Tensor tokens = f.ip->image_tokens(zero_embeds);
  SD_EXPECT_CLOSE(tokens[0], ref.get(c + ".ip_tokens")[0], kAtol, kRtol, "uncond ip_tokens");
  EXPECT_TRUE(torch::equal(f.ip->uncond_image_tokens, tokens));  // what streams take, made once at load
  EXPECT_GT(tokens.abs().max().item<double>(), 0.0);
}

INSTANTIATE_TEST_SUITE_P(TinyIPAdapter, IPAdapterUNet, ::testing::Values("b2_cfg", "b2_two_images_t999_t259"),
                         [](const auto& info) { return test::test_name(info.param); });

// bf16 weights and activations against the float32 reference: a measured bound (not the fp32 tolerance). Measured
// on the 2-core Xeon (AMX): ip_tokens 1.6e-2 (max|ref| 3.6), out 3.4e-2 (max|ref| 2.2); the bound 0.1 leaves ~3x.
TEST(IPAdapterUNetBf16, WithinMeasuredBound) {
  SD_REQUIRE_IP();
  // As the other bf16 goldens: the bound is that of oneDNN's bf16 kernels. Without them libtorch 1.13 falls back to
  // kernels that accumulate in bf16 (out 0.12 here on an AVX2 Zen 2), and --dtype auto is fp32 there anyway.
  if (!sd::cpu_has_onednn_bf16()) GTEST_SKIP() << "no oneDNN bf16 kernels on this CPU (" << sd::cpu_simd_level() << ")";
  auto unet = fresh_unet(torch::kBFloat16);
  auto ip = load_ip_adapter(test::fixture_path(kAdapterDir), *unet, torch::kBFloat16);
  ip->adapter->set_scale(0.6);
  const auto ref = SafeTensorsFile::open(test::fixture_path("ipadapter/modules/unet_ip.safetensors"));
  torch::NoGradGuard ng;
  for (const std::string c : {"b2_cfg", "b2_two_images_t999_t259"}) {
    const Tensor tokens = ip->image_tokens(ref.get(c + ".image_embeds"));
    EXPECT_EQ(tokens.scalar_type(), torch::kBFloat16);
    SD_EXPECT_CLOSE(tokens.to(torch::kFloat), ref.get(c + ".ip_tokens"), 0.1, 0.0, c + " bf16 ip_tokens");
    const Tensor ctx = torch::cat({ref.get(c + ".encoder_hidden_states").to(torch::kBFloat16), tokens}, 1);
    const Tensor out = unet->forward(ref.get(c + ".sample").to(torch::kBFloat16), ref.get(c + ".timestep"), ctx);
    SD_EXPECT_CLOSE(out.to(torch::kFloat), ref.get(c + ".out"), 0.1, 0.0, c + " bf16 out");
  }
}

// ---- errors ------------------------------------------------------------------------------------------------------

// Writes a copy of the adapter file with `edit` applied to its tensors.
std::string edited_adapter(const std::string& name,
                           const std::function<void(std::map<std::string, Tensor>&)>& edit) {
  const std::string dir = test::make_temp_dir("ip_" + name);
  auto tensors = SafeTensorsFile::open(test::fixture_path(kAdapterFile)).load_all();
  std::map<std::string, Tensor> copy;
  for (const auto& kv : tensors) copy[kv.first] = kv.second.clone();
  edit(copy);
  const std::string path = dir + "/ip-adapter_" + name + ".safetensors";
  save_safetensors(path, copy);
  return path;
}

// The fixture's widths the broken adapters are built against, read from its files rather than assumed (zeros when
// the fixtures are absent: every case then skips before using them).
struct IpWidths {
  int64_t cross = 0;      // the UNet's cross_attention_dim
  int64_t embed = 0;      // the image encoder's projection_dim
  int64_t proj_rows = 0;  // image_proj.proj.weight rows: tokens x cross
};
const IpWidths& ip_widths() {
  static const IpWidths w = [] {
    IpWidths r;
    if (!have_fixtures()) return r;
    const auto c = read_json_file(test::fixture_path(kUNet + "/config.json")).at("cross_attention_dim");
    r.cross = c.is_array() ? c.at(0).get<int64_t>() : c.get<int64_t>();
    const std::string enc = test::fixture_path(kAdapterDir + "/image_encoder/config.json");
    r.embed = CLIPVisionConfig::from_json(read_json_file(enc), enc).projection_dim;
    r.proj_rows = SafeTensorsFile::open(test::fixture_path(kAdapterFile)).info("image_proj.proj.weight").shape.at(0);
    return r;
  }();
  return w;
}
std::string dims(std::vector<int64_t> d) {
  std::string s;
  for (auto x : d) s += (s.empty() ? "[" : ", ") + std::to_string(x);
  return s + "]";
}
// A tensor's shape in the fixture adapter file (empty when the fixtures are absent).
std::vector<int64_t> adapter_shape(const std::string& key) {
  if (!have_fixtures()) return {};
  return SafeTensorsFile::open(test::fixture_path(kAdapterFile)).info(key).shape;
}

struct BadAdapter {
  std::string name;
  std::function<std::string()> make;        // returns the path to load
  std::vector<std::string> message_parts;   // every one must appear in the error
  int64_t image_embed_dim = ip_widths().embed;
};
void PrintTo(const BadAdapter& b, std::ostream* os) { *os << b.name; }

class IPAdapterBadInput : public ::testing::TestWithParam<BadAdapter> {};

TEST_P(IPAdapterBadInput, ErrorNamesFileKeyAndExpectedShape) {
  SD_REQUIRE_IP();
  const auto& b = GetParam();
  auto unet = fresh_unet();
  const std::string path = b.make();
  std::string msg;
  try {
    load_ip_adapter_weights(path, *unet, b.image_embed_dim);
    FAIL() << "expected an error";
  } catch (const FormatError& e) {
    msg = e.what();
  }
  SD_EXPECT_HAS(msg, fs::path(path).filename().string());
  for (const auto& part : b.message_parts) SD_EXPECT_HAS(msg, part);
  // Nothing was attached to the UNet.
  for (const auto& s : ip_adapter_cross_attentions(*unet)) EXPECT_FALSE(s.attention->ip);
}

INSTANTIATE_TEST_SUITE_P(
    Files, IPAdapterBadInput,
    ::testing::Values(
        BadAdapter{"wrong_cross_attention_dim",
                   [] {
                     // An adapter for a UNet with a 16 wider context (e.g. an SD 2.x adapter on SD 1.5).
                     return edited_adapter("cad", [](std::map<std::string, Tensor>& t) {
                       const auto& w = ip_widths();
                       const int64_t other = w.cross + 16, tokens = w.proj_rows / w.cross;
                       t["image_proj.norm.weight"] = torch::ones({other});
                       t["image_proj.norm.bias"] = torch::zeros({other});
                       t["image_proj.proj.weight"] = torch::zeros({tokens * other, w.embed});
                       t["image_proj.proj.bias"] = torch::zeros({tokens * other});
                     });
                   },
                   {"image_proj.norm.weight", dims({ip_widths().cross + 16}), "expected " + dims({ip_widths().cross}),
                    "cross_attention_dim"}},
        BadAdapter{"missing_key",
                   [] {
                     return edited_adapter("missing",
                                           [](std::map<std::string, Tensor>& t) { t.erase("ip_adapter.5.to_v_ip.weight"); });
                   },
                   {"missing key ip_adapter.5.to_v_ip.weight", dims(adapter_shape("ip_adapter.5.to_v_ip.weight")),
                    "up_blocks.1.attentions.1.transformer_blocks.0.attn2"}},
        BadAdapter{"wrong_branch_width",
                   [] {
                     // 16 more output rows than the branch the fixture's mid block has.
                     return edited_adapter("width", [](std::map<std::string, Tensor>& t) {
                       auto shape = adapter_shape("ip_adapter.7.to_k_ip.weight");
                       shape.at(0) += 16;
                       t["ip_adapter.7.to_k_ip.weight"] = torch::zeros(shape);
                     });
                   },
                   {"ip_adapter.7.to_k_ip.weight", "expected " + dims(adapter_shape("ip_adapter.7.to_k_ip.weight")),
                    "mid_block"}},
        BadAdapter{"too_many_cross_attentions",
                   [] {
                     return edited_adapter("count", [](std::map<std::string, Tensor>& t) {
                       t["ip_adapter.9.to_k_ip.weight"] = torch::zeros({32, 32});
                       t["ip_adapter.9.to_v_ip.weight"] = torch::zeros({32, 32});
                     });
                   },
                   {"ip_adapter.9", "4 attn2"}},
        BadAdapter{"largest_cross_attention_id",
                   [] {
                     // The largest id stoll reads: the UNet this would need is named without an overflow.
                     return edited_adapter("id_max", [](std::map<std::string, Tensor>& t) {
                       t["ip_adapter.9223372036854775807.to_k_ip.weight"] = torch::zeros({32, 32});
                     });
                   },
                   {"key ip_adapter.9223372036854775807.* has no cross-attention",
                    "made for a UNet with 4611686018427387904"}},
        BadAdapter{"wrong_projection_dim",
                   [] { return test::fixture_path(kAdapterFile); },
                   // An image encoder with another projection_dim than the one the adapter was made for.
                   {"image_proj.proj.weight", dims({ip_widths().proj_rows, ip_widths().embed}),
                    "expected " + dims({ip_widths().proj_rows, ip_widths().embed + 16}),
                    "projection_dim is " + std::to_string(ip_widths().embed + 16)},
                   ip_widths().embed + 16},
        BadAdapter{"truncated_file",
                   [] {
                     const std::string dir = test::make_temp_dir("ip_trunc");
                     const std::string path = dir + "/ip-adapter_truncated.safetensors";
                     std::ifstream in(test::fixture_path(kAdapterFile), std::ios::binary);
                     std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
                     std::ofstream(path, std::ios::binary).write(bytes.data(), bytes.size() / 2);
                     return path;
                   },
                   {}},
        BadAdapter{"pickle",
                   [] {
                     const std::string dir = test::make_temp_dir("ip_pickle");
                     const std::string path = dir + "/ip-adapter_sd15.bin";
                     std::ofstream(path) << "not really a pickle";
                     return path;
                   },
                   {"pickled checkpoints are refused", ".safetensors"}}),
    [](const auto& info) { return info.param.name; });

TEST(IPAdapterBadInput, FolderWithoutImageEncoderOrWeights) {
  SD_REQUIRE_IP();
  const std::string dir = test::make_temp_dir("ip_folder");
  EXPECT_NE(error_of([&] { find_ip_adapter(dir); }).find("no ip-adapter*.safetensors"), std::string::npos);
  fs::copy_file(test::fixture_path(kAdapterFile), dir + "/ip-adapter_a.safetensors");
  const std::string msg = error_of([&] { find_ip_adapter(dir); });
  SD_EXPECT_HAS(msg, "image_encoder");
  fs::copy_file(test::fixture_path(kAdapterFile), dir + "/ip-adapter_b.safetensors");
  SD_EXPECT_HAS(error_of([&] { find_ip_adapter(dir); }), "several ip-adapter*.safetensors");
}

TEST(IPAdapterBadInput, ContextWithoutImageTokensIsRefused) {
  SD_REQUIRE_IP();
  auto unet = fresh_unet();
  auto ip = load_ip_adapter(test::fixture_path(kAdapterDir), *unet);
  torch::NoGradGuard ng;
  const std::string msg = error_of([&] {
    unet->forward(torch::zeros({1, 4, 8, 8}), torch::tensor({10}), torch::zeros({1, 2, 32}));
  });
  SD_EXPECT_HAS(msg, "4 image tokens");
  EXPECT_THROW(ip->adapter->set_scale(std::nan("")), InvalidArgument);
}

}  // namespace
}  // namespace sd
