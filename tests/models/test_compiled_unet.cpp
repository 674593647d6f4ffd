// Compiled UNets (models/compiled_unet.h): the package metadata's parsing and the load checks against the loaded UNet
// (every build), the clear error where the build cannot load packages (libtorch < 2.11), and, given a package made by
// scripts/compile-unet.py from the tiny-sd21 fixture for cpu fp32 64 px (SD_COMPILED_UNET, as
// scripts/test-libtorch2.sh makes it when a Python with torch 2 and diffusers is given), its outputs against the
// engine's own UNet with the same weights, and after the weights are replaced.
#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/version.h>

#include "common/fixtures.h"
#include "core/error.h"
#include "models/compiled_unet.h"
#include "models/layers.h"
#include "models/unet_2d_condition.h"

namespace {

const char* kModel = "tiny-sd21";

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// The UNet's tensors by name, as the package reads them: a CPU convolution that kept only its oneDNN copy (load_unet
// prepacks) gets its plain weight back first, as CompiledUNet does.
std::vector<std::pair<std::string, torch::Tensor>> named_weights(sd::UNet2DConditionModelImpl& unet) {
  for (auto& m : unet.modules(/*include_self=*/false))
    if (auto* conv = dynamic_cast<sd::nn::Conv2dImpl*>(m.get())) conv->restore_dense();
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : unet.named_parameters()) out.emplace_back(p.key(), p.value());
  for (const auto& b : unet.named_buffers()) out.emplace_back(b.key(), b.value());
  return out;
}

// The metadata scripts/compile-unet.py writes, for the fixture's UNet as loaded here.
std::map<std::string, std::string> metadata_for(sd::UNet2DConditionModelImpl& unet, const std::string& config_json) {
  nlohmann::json w = nlohmann::json::object();
  for (const auto& [k, t] : named_weights(unet)) w[k] = {t.sizes().vec(), t.strides().vec(), "float32"};
  const int64_t ctx = unet.config().cross_attention_dim.front();
  return {{"streamdiffusion.component", "unet"},
          {"streamdiffusion.format", "1"},
          {"streamdiffusion.device", "cpu"},
          {"streamdiffusion.dtype", "fp32"},
          {"streamdiffusion.sample", "1,4,8,8"},
          {"streamdiffusion.sample_layout", "contiguous"},
          {"streamdiffusion.context", "1,77," + std::to_string(ctx)},
          {"streamdiffusion.weights", w.dump()},
          {"streamdiffusion.config", config_json},
          {"streamdiffusion.torch", TORCH_VERSION},
          {"streamdiffusion.mode", "default"}};
}

class CompiledUNetChecks : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!sd::test::fixture_exists("models/" + std::string(kModel) + "/unet/config.json"))
      GTEST_SKIP() << "fixture model " << kModel << " not found";
    dir_ = sd::test::fixture_path("models/" + std::string(kModel) + "/unet");
    unet_ = sd::load_unet(dir_);
    config_json_ = read_text(dir_ + "/config.json");
    meta_ = metadata_for(*unet_, config_json_);
  }
  // The FormatError text of check_compiled_unet on `meta` ("" when it passes).
  std::string check(const std::map<std::string, std::string>& meta, c10::Device device = torch::kCPU,
                    c10::ScalarType dtype = c10::kFloat) {
    try {
      const auto info = sd::parse_compiled_unet_metadata(meta, "pkg.pt2");
      sd::check_compiled_unet(info, unet_->config(), named_weights(*unet_), device, dtype, "pkg.pt2");
    } catch (const sd::FormatError& e) {
      return e.what();
    }
    return "";
  }
  std::string dir_, config_json_;
  sd::UNet2DConditionModel unet_{nullptr};
  std::map<std::string, std::string> meta_;
};

TEST_F(CompiledUNetChecks, MetadataOfTheLoadedUNetPasses) {
  EXPECT_EQ(check(meta_), "");
  const auto info = sd::parse_compiled_unet_metadata(meta_, "pkg.pt2");
  EXPECT_EQ(info.sample, (std::vector<int64_t>{1, 4, 8, 8}));
  EXPECT_EQ(info.context[1], 77);
  EXPECT_FALSE(info.sample_channels_last);
  EXPECT_EQ(info.weights.size(), named_weights(*unet_).size());
}

TEST_F(CompiledUNetChecks, MissingOrMalformedMetadataIsNamed) {
  auto m = meta_;
  m.erase("streamdiffusion.sample");
  EXPECT_NE(check(m).find("no streamdiffusion.sample"), std::string::npos) << check(m);
  m = meta_;
  m["streamdiffusion.component"] = "vae";
  EXPECT_NE(check(m).find("expected \"unet\""), std::string::npos) << check(m);
  m = meta_;
  m["streamdiffusion.format"] = "2";
  EXPECT_NE(check(m).find("format 1"), std::string::npos) << check(m);
  m = meta_;
  m["streamdiffusion.sample"] = "1,4,x,8";
  EXPECT_NE(check(m).find("streamdiffusion.sample = \"1,4,x,8\""), std::string::npos) << check(m);
  m = meta_;
  m["streamdiffusion.weights"] = "{not json";
  EXPECT_NE(check(m).find("streamdiffusion.weights is not JSON"), std::string::npos) << check(m);
  m["streamdiffusion.weights"] = R"({"conv_in.weight": )" + std::string(100000, '[') + std::string(100000, ']') + "}";
  EXPECT_NE(check(m).find("streamdiffusion.weights is not JSON of weights: arrays / objects nested more than 64"),
            std::string::npos)
      << check(m).substr(0, 300);
  m = meta_;
  m["streamdiffusion.weights"] = R"({"conv_in.weight": [[1], [1, 2], "float32"]})";
  EXPECT_NE(check(m).find("conv_in.weight\"] is not [shape, strides, dtype]"), std::string::npos) << check(m);
  m = meta_;
  m["streamdiffusion.sample_layout"] = "nhwc";
  EXPECT_NE(check(m).find("sample_layout"), std::string::npos) << check(m);
  m = meta_;
  m["streamdiffusion.dtype"] = "int4";
  EXPECT_NE(check(m).find("dtype \"int4\""), std::string::npos) << check(m);
}

TEST_F(CompiledUNetChecks, AnotherDeviceDtypeOrTorchIsRefused) {
  EXPECT_NE(check(meta_, torch::kCPU, c10::kBFloat16).find("compiled for cpu fp32, the models are on cpu in bf16"),
            std::string::npos)
      << check(meta_, torch::kCPU, c10::kBFloat16);
  auto m = meta_;
  m["streamdiffusion.device"] = "cuda";
  EXPECT_NE(check(m).find("compiled for cuda fp32"), std::string::npos) << check(m);
  m = meta_;
  m["streamdiffusion.torch"] = "1.0.0";
  EXPECT_NE(check(m).find("compiled by PyTorch 1.0.0"), std::string::npos) << check(m);
}

TEST_F(CompiledUNetChecks, AnotherConfigIsRefusedNamingTheField) {
  auto cfg = nlohmann::json::parse(config_json_);
  const auto heads = cfg.at("attention_head_dim");
  cfg["attention_head_dim"] = heads.is_array() ? nlohmann::json(std::vector<int>(heads.size(), 1)) : nlohmann::json(1);
  auto m = meta_;
  m["streamdiffusion.config"] = cfg.dump();
  const std::string e = check(m);
  EXPECT_NE(e.find("another UNet config"), std::string::npos) << e;
  EXPECT_NE(e.find("num_attention_heads"), std::string::npos) << e;
  m["streamdiffusion.config"] = "[1, 2";
  EXPECT_NE(check(m).find("streamdiffusion.config is not JSON"), std::string::npos) << check(m);
  // Nested 100,000 levels deep it overflowed the stack where the config reader quoted the field (a crash).
  m["streamdiffusion.config"] =
      R"({"block_out_channels": )" + std::string(100000, '[') + std::string(100000, ']') + "}";
  EXPECT_NE(check(m).find("streamdiffusion.config is not a UNet config: arrays / objects nested more than 64"),
            std::string::npos)
      << check(m).substr(0, 300);
}

TEST_F(CompiledUNetChecks, WeightsThatDifferAreListedByName) {
  auto w = nlohmann::json::parse(meta_.at("streamdiffusion.weights"));
  w["conv_in.weight"][0][0] = 99;            // shape
  w["conv_out.bias"][2] = "float16";         // dtype
  w.erase("time_embedding.linear_1.weight");  // missing from the package
  w["extra.weight"] = {{2}, {1}, "float32"};  // not in the UNet
  auto m = meta_;
  m["streamdiffusion.weights"] = w.dump();
  const std::string e = check(m);
  EXPECT_NE(e.find("4 weight(s) differ"), std::string::npos) << e;
  EXPECT_NE(e.find("conv_in.weight: shape [99"), std::string::npos) << e;
  EXPECT_NE(e.find("conv_out.bias: dtype fp16 vs loaded fp32"), std::string::npos) << e;
  EXPECT_NE(e.find("extra.weight is not a weight of the loaded UNet"), std::string::npos) << e;
  EXPECT_NE(e.find("time_embedding.linear_1.weight (a weight of the loaded UNet) is not in the package"),
            std::string::npos)
      << e;
  // Strides: the compiled code indexes the weights as they were when it was compiled.
  w = nlohmann::json::parse(meta_.at("streamdiffusion.weights"));
  auto st = w["conv_in.weight"][1].get<std::vector<int64_t>>();
  std::reverse(st.begin(), st.end());
  w["conv_in.weight"][1] = st;
  m["streamdiffusion.weights"] = w.dump();
  EXPECT_NE(check(m).find("conv_in.weight: strides"), std::string::npos) << check(m);
}

TEST_F(CompiledUNetChecks, CallsOfAnotherShapeOrDtypeAreNamed) {
  const auto info = sd::parse_compiled_unet_metadata(meta_, "pkg.pt2");
  const int64_t ctx = unet_->config().cross_attention_dim.front();
  const auto t = torch::tensor({500}, torch::kLong);
  EXPECT_EQ(sd::compiled_unet_mismatch(info, torch::zeros({1, 4, 8, 8}), t, torch::zeros({1, 77, ctx})), "");
  EXPECT_EQ(sd::compiled_unet_mismatch(info, torch::zeros({2, 4, 8, 8}), t, torch::zeros({2, 77, ctx})),
            "sample [2, 4, 8, 8], compiled for [1, 4, 8, 8]");
  EXPECT_EQ(sd::compiled_unet_mismatch(info, torch::zeros({1, 4, 8, 8}), t, torch::zeros({1, 81, ctx})),
            "encoder_hidden_states [1, 81, " + std::to_string(ctx) + "], expected [1, 77, " + std::to_string(ctx) +
                "]");
  EXPECT_EQ(sd::compiled_unet_mismatch(info, torch::zeros({1, 4, 16, 8}), t, torch::zeros({1, 77, ctx})),
            "sample [1, 4, 16, 8], compiled for [1, 4, 8, 8]");
  EXPECT_EQ(sd::compiled_unet_mismatch(info, torch::zeros({4, 8, 8}), t, torch::zeros({1, 77, ctx})),
            "sample [4, 8, 8], compiled for [1, 4, 8, 8]");
  EXPECT_EQ(sd::compiled_unet_mismatch(info, torch::zeros({1, 4, 8, 8}, torch::kBFloat16), t,
                                       torch::zeros({1, 77, ctx}, torch::kBFloat16)),
            "inputs in bf16, compiled for fp32");
  EXPECT_EQ(sd::compiled_unet_mismatch(info, torch::zeros({1, 4, 8, 8}), torch::tensor({1, 2, 3}),
                                       torch::zeros({1, 77, ctx})),
            "timesteps [3] for 1 rows");
}

// A package compiled with --rows MIN-MAX takes every call with a row count in the range, and says which it takes.
TEST_F(CompiledUNetChecks, ARowRangeTakesEveryRowCountInIt) {
  auto m = meta_;
  m["streamdiffusion.sample"] = "2,4,8,8";
  const int64_t ctx = unet_->config().cross_attention_dim.front();
  m["streamdiffusion.context"] = "2,77," + std::to_string(ctx);
  m["streamdiffusion.rows"] = "1-32";
  ASSERT_EQ(check(m), "");
  const auto info = sd::parse_compiled_unet_metadata(m, "pkg.pt2");
  EXPECT_EQ(info.rows_min, 1);
  EXPECT_EQ(info.rows_max, 32);
  for (int64_t rows : {1, 2, 17, 32}) {
    EXPECT_EQ(sd::compiled_unet_mismatch(info, torch::zeros({rows, 4, 8, 8}), torch::full({rows}, 500, torch::kLong),
                                         torch::zeros({rows, 77, ctx})),
              "")
        << rows;
    EXPECT_EQ(sd::compiled_unet_mismatch(info, torch::zeros({rows, 4, 8, 8}), torch::tensor({500}, torch::kLong),
                                         torch::zeros({rows, 77, ctx})),
              "")
        << rows << " rows, one timestep for all";
  }
  EXPECT_EQ(sd::compiled_unet_mismatch(info, torch::zeros({33, 4, 8, 8}), torch::tensor({500}),
                                       torch::zeros({33, 77, ctx})),
            "sample [33, 4, 8, 8], compiled for [1-32, 4, 8, 8]");
  EXPECT_EQ(sd::compiled_unet_mismatch(info, torch::zeros({3, 4, 8, 8}), torch::tensor({500}),
                                       torch::zeros({2, 77, ctx})),
            "encoder_hidden_states [2, 77, " + std::to_string(ctx) + "], expected [3, 77, " + std::to_string(ctx) +
                "]");
  EXPECT_EQ(sd::compiled_unet_mismatch(info, torch::zeros({3, 4, 8, 8}), torch::tensor({1, 2}),
                                       torch::zeros({3, 77, ctx})),
            "timesteps [2] for 3 rows");
  // Without the entry (packages of fixed rows made before it): the sample's rows only.
  const auto fixed = sd::parse_compiled_unet_metadata(meta_, "pkg.pt2");
  EXPECT_EQ(fixed.rows_min, 1);
  EXPECT_EQ(fixed.rows_max, 1);
  // A range that is not one, or that leaves out the example the package was compiled with.
  for (const char* bad : {"4-2", "x-3", "1-", "3-8", "0-4"}) {
    m["streamdiffusion.rows"] = bad;
    EXPECT_NE(check(m).find("streamdiffusion.rows"), std::string::npos) << bad << ": " << check(m);
  }
}

TEST_F(CompiledUNetChecks, LoadSaysWhatIsMissing) {
  if (!sd::compiled_unet_available()) {
    try {
      sd::CompiledUNet::load("/nonexistent.pt2", *unet_, torch::kCPU, c10::kFloat);
      FAIL() << "no error";
    } catch (const sd::InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("need libtorch >= 2.11"), std::string::npos) << e.what();
    }
    return;
  }
  try {
    sd::CompiledUNet::load("/nonexistent.pt2", *unet_, torch::kCPU, c10::kFloat);
    FAIL() << "no error";
  } catch (const sd::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent.pt2: no such file"), std::string::npos) << e.what();
  }
  // A file that is not a package.
  const std::string bogus = testing::TempDir() + "/not-a-package.pt2";
  std::ofstream(bogus) << "not a zip";
  try {
    sd::CompiledUNet::load(bogus, *unet_, torch::kCPU, c10::kFloat);
    FAIL() << "no error";
  } catch (const sd::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find(bogus + ": not an AOTInductor package"), std::string::npos) << e.what();
  }
}

// A real package: SD_COMPILED_UNET = scripts/compile-unet.py <fixtures>/models/tiny-sd21 --device cpu --dtype fp32
// --width 64 --height 64 (made with the torch of this build's libtorch).
TEST_F(CompiledUNetChecks, PackageComputesTheUNetWithTheEnginesWeights) {
  const char* path = std::getenv("SD_COMPILED_UNET");
  if (!sd::compiled_unet_available()) GTEST_SKIP() << sd::compiled_unet_unavailable_reason();
  if (!path || !*path)
    GTEST_SKIP() << "SD_COMPILED_UNET not set (scripts/test-libtorch2.sh makes one with SD_COMPILE_PYTHON)";
  torch::NoGradGuard ng;
  auto own = sd::load_unet(dir_);  // the reference: the engine's UNet, untouched
  auto c = sd::CompiledUNet::load(path, *unet_, torch::kCPU, c10::kFloat);
  const int64_t ctx = unet_->config().cross_attention_dim.front();
  torch::manual_seed(3);
  const auto x = torch::randn({1, 4, 8, 8});
  const auto t = torch::tensor({500}, torch::kLong);
  const auto e = torch::randn({1, 77, ctx});
  const auto ref = own->forward(x, t, e);
  const auto out = c->run(x, t, e);
  const double scale = ref.abs().max().item<double>();
  // Inductor's fused CPU kernels reorder the float32 sums: the module tolerance of the goldens (1e-4 abs + 1e-5 rel).
  EXPECT_TRUE(torch::allclose(out, ref, 1e-5, 1e-4)) << "max |diff| " << (out - ref).abs().max().item<double>()
                                                     << " of " << scale;
  // The engine's UNet (whose weights the package reads) gives the same numbers as before.
  EXPECT_TRUE(torch::allclose(unet_->forward(x, t, e), ref, 1e-6, 1e-6));
  // A timestep given once for all rows, as the UNet takes it.
  EXPECT_TRUE(torch::allclose(c->run(x, torch::tensor(500, torch::kLong), e), out, 0, 0));
  EXPECT_THROW(c->run(torch::randn({2, 4, 8, 8}), torch::tensor({500, 500}), torch::randn({2, 77, ctx})),
               sd::InvalidArgument);

  // Weights replaced (as a LoRA re-fuse replaces them: set_data), handed over again: the package follows. (The
  // reference's convolutions get their plain weights back first, or their scaled copy would be an empty tensor.)
  named_weights(*own);
  for (auto& p : unet_->named_parameters())
    if (p.key() == "conv_in.weight" || p.key().find("attn2.to_k.weight") != std::string::npos)
      p.value().set_data(p.value() * 1.5);
  for (auto& p : own->named_parameters())
    if (p.key() == "conv_in.weight" || p.key().find("attn2.to_k.weight") != std::string::npos)
      p.value().set_data(p.value() * 1.5);
  c->load_weights();
  const auto ref2 = own->forward(x, t, e);
  EXPECT_GT((ref2 - ref).abs().max().item<double>(), 1e-3 * scale);  // the change shows
  const auto out2 = c->run(x, t, e);
  EXPECT_TRUE(torch::allclose(out2, ref2, 1e-5, 1e-4)) << "max |diff| " << (out2 - ref2).abs().max().item<double>();
}

// A package of a row range: SD_COMPILED_UNET_ROWS = scripts/compile-unet.py <fixtures>/models/tiny-sd21 --device cpu
// --dtype fp32 --width 64 --height 64 --rows 1-4. Each row count in the range computes what the engine's UNet does,
// row for row (each row its own timestep), and a count outside it is refused before the package runs.
TEST_F(CompiledUNetChecks, PackageOfARowRangeComputesEveryRowCount) {
  const char* path = std::getenv("SD_COMPILED_UNET_ROWS");
  if (!sd::compiled_unet_available()) GTEST_SKIP() << sd::compiled_unet_unavailable_reason();
  if (!path || !*path)
    GTEST_SKIP() << "SD_COMPILED_UNET_ROWS not set (scripts/test-libtorch2.sh makes one with SD_COMPILE_PYTHON)";
  torch::NoGradGuard ng;
  auto own = sd::load_unet(dir_);
  auto c = sd::CompiledUNet::load(path, *unet_, torch::kCPU, c10::kFloat);
  ASSERT_EQ(c->info().rows_min, 1);
  ASSERT_EQ(c->info().rows_max, 4);
  const int64_t ctx = unet_->config().cross_attention_dim.front();
  torch::manual_seed(5);
  for (int64_t rows : {1, 2, 3, 4}) {
    const auto x = torch::randn({rows, 4, 8, 8});
    const auto t = torch::arange(rows, torch::kLong) * 250 + 100;  // 100, 350, 600, 850
    const auto e = torch::randn({rows, 77, ctx});
    const auto ref = own->forward(x, t, e);
    const auto out = c->run(x, t, e);
    ASSERT_EQ(out.sizes(), ref.sizes()) << rows;
    // The module tolerance of the goldens (1e-4 abs + 1e-5 rel), as for a package of fixed rows.
    EXPECT_TRUE(torch::allclose(out, ref, 1e-5, 1e-4))
        << rows << " rows: max |diff| " << (out - ref).abs().max().item<double>();
  }
  try {
    c->run(torch::randn({5, 4, 8, 8}), torch::tensor({500}), torch::randn({5, 77, ctx}));
    FAIL() << "5 rows ran";
  } catch (const sd::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("sample [5, 4, 8, 8], compiled for [1-4, 4, 8, 8]"), std::string::npos)
        << e.what();
  }
}

}  // namespace
