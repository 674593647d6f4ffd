// AutoencoderTiny (TAESD) against diffusers 0.24 on the fixture models (data-driven over models/*/taesd and the
// cases in modules/<model>/taesd.safetensors), madebyollin's original file layout, config errors, parameter counts.
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/version.h>

#include "common/autoencoder_layouts.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "io/checkpoint_convert.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/autoencoder_tiny.h"

namespace fs = std::filesystem;

namespace {

constexpr double kAtol = 1e-4, kRtol = 1e-5;  // fixture README: single VAE/TAESD calls in float32

// bf16 weights and activations vs the fp32 reference, as a fraction of max|ref|. Measured on the fixture models
// (the test prints them): encode 1.7e-2 (sd15) / 1.8e-2 (sd21), decode 1.3e-2 / 2.0e-2 of max|ref| (max abs 0.091
// with max|ref| 4.5: about 3 bf16 ulps of an output near 4). bf16 keeps 8 mantissa bits (3.9e-3 relative per
// rounding) and each of the ~15 conv layers rounds its output once. The bound leaves 2.5x margin.
constexpr double kBf16Rtol = 5e-2;

using GoldenCase = sd::test::ComponentGoldenCase;

// Runs a case on `vae` (inputs cast to its dtype) and returns {output, reference} in fp32.
std::pair<torch::Tensor, torch::Tensor> run_case(sd::AutoencoderTiny& vae, const GoldenCase& c) {
  auto ref = sd::SafeTensorsFile::open(sd::test::fixture_path("modules/" + c.model + "/taesd.safetensors"));
  torch::NoGradGuard ng;
  if (c.name == "encode") {
    auto out = vae->encode(ref.get("encode.input").to(vae->dtype()));
    return {out.to(torch::kFloat), ref.get("encode.latents")};
  }
  if (c.name == "decode") {
    auto out = vae->decode(ref.get("decode.input").to(vae->dtype()));
    return {out.to(torch::kFloat), ref.get("decode.out")};
  }
  throw sd::FormatError("modules/" + c.model + "/taesd.safetensors", "unknown case '" + c.name + "'");
}

class TaesdGolden : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(TaesdGolden, MatchesDiffusersFp32) {
  const auto& c = GetParam();
  ASSERT_TRUE(c.error.empty()) << c.error;
  auto vae = sd::load_taesd(sd::test::fixture_path("models/" + c.model + "/taesd"));
  EXPECT_DOUBLE_EQ(vae->config().scaling_factor, 1.0);
  sd::test::for_each_cpu_layout(vae, [&](const std::string& layout) {
    auto [out, ref] = run_case(vae, c);
    EXPECT_TRUE(out.is_contiguous());
    SD_EXPECT_CLOSE(out, ref, kAtol, kRtol, c.model + " taesd " + c.name + layout);
  });
}

TEST(CpuLayout, Fp32RunsNchwOnLibtorch1AndOverridesApply) {
  SD_SKIP_WITHOUT_FIXTURE("models/tiny-sd15/taesd");
  sd::nn::ScopedCpuChannelsLast rule(-1);  // the dtype rule, whatever SD_CPU_CHANNELS_LAST says
  // libtorch 1.13's NHWC fp32 convolutions measured x1.4-1.7 slower (models/conv_layout.h); bf16 keeps channels-last.
  EXPECT_EQ(sd::nn::cpu_channels_last(torch::kFloat), TORCH_VERSION_MAJOR >= 2);
  EXPECT_TRUE(sd::nn::cpu_channels_last(torch::kBFloat16));
  {
    sd::nn::ScopedCpuChannelsLast nchw(0);
    EXPECT_FALSE(sd::nn::cpu_channels_last(torch::kBFloat16));
    EXPECT_FALSE(sd::nn::cpu_channels_last(torch::kFloat));
    sd::nn::ScopedCpuChannelsLast nhwc(7);  // any positive mode is channels-last
    EXPECT_TRUE(sd::nn::cpu_channels_last(torch::kFloat));
  }
  EXPECT_EQ(sd::nn::set_cpu_channels_last(-1), -1);  // the scopes restored the rule
  // A bf16 model without a layout of its own follows the rule; one given a layout keeps it.
  auto vae = sd::load_taesd(sd::test::fixture_path("models/tiny-sd15/taesd"), torch::kBFloat16);
  EXPECT_TRUE(vae->channels_last());
  vae->set_channels_last(false);
  EXPECT_FALSE(vae->channels_last());
  sd::nn::ScopedCpuChannelsLast nhwc(1);
  EXPECT_FALSE(vae->channels_last());
}

TEST_P(TaesdGolden, Bf16WithinMeasuredBound) {
  const auto& c = GetParam();
  ASSERT_TRUE(c.error.empty()) << c.error;
  auto vae = sd::load_taesd(sd::test::fixture_path("models/" + c.model + "/taesd"), torch::kBFloat16);
  EXPECT_EQ(vae->dtype(), torch::kBFloat16);
  auto [out, ref] = run_case(vae, c);
  SD_EXPECT_CLOSE(out, ref, 0.0, kBf16Rtol, c.model + " taesd bf16 " + c.name);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TaesdGolden, ::testing::ValuesIn(sd::test::component_golden_cases("taesd")),
                         [](const auto& info) { return sd::test::test_name(info.param.model + "_" + info.param.name); });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(TaesdGolden);

// ---------------------------------------------------------------------------------------------------------------
// madebyollin's original layout: the fixture's weights written back as taesd_encoder/decoder.safetensors must load
// to a bit-identical model, through every entry point.

std::vector<std::string> taesd_models() {
  std::vector<std::string> out;
  for (const auto& m : sd::test::fixture_models())
    if (sd::test::fixture_exists("models/" + m + "/taesd/config.json")) out.push_back(m);
  return out;
}

class TaesdOriginalLayout : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { dir_ = sd::test::make_temp_dir("sd-taesd"); }
  void TearDown() override { fs::remove_all(dir_); }
  std::string dir_;
};

TEST_P(TaesdOriginalLayout, LoadsBitIdentical) {
  const std::string model = GetParam();
  const std::string folder = sd::test::fixture_path("models/" + model + "/taesd");
  auto ref_vae = sd::load_taesd(folder);
  const auto file = sd::SafeTensorsFile::open(folder + "/diffusion_pytorch_model.safetensors");
  auto [enc, dec] = sd::convert::taesd_diffusers_to_original(file.load_all());
  // The original decoder starts with the parameterless Clamp: its first conv is layer 1, the encoder's is layer 0.
  EXPECT_TRUE(enc.count("0.weight"));
  EXPECT_TRUE(dec.count("1.weight"));
  EXPECT_FALSE(dec.count("0.weight"));
  EXPECT_TRUE(dec.count("3.conv.0.weight"));  // diffusers' decoder.layers.2 (first Block)
  const std::string enc_path = dir_ + "/taesd_encoder.safetensors", dec_path = dir_ + "/taesd_decoder.safetensors";
  sd::save_safetensors(enc_path, enc);
  sd::save_safetensors(dec_path, dec);

  std::vector<std::pair<std::string, sd::AutoencoderTiny>> loaded;
  loaded.emplace_back("folder", sd::load_taesd(dir_));
  loaded.emplace_back("encoder file", sd::load_taesd(enc_path));
  loaded.emplace_back("decoder file", sd::load_taesd(dec_path));
  loaded.emplace_back("explicit pair", sd::load_taesd_original(enc_path, dec_path));

  torch::NoGradGuard ng;
  auto x = torch::rand({2, 3, 64, 64}) * 2 - 1;
  auto z = torch::randn({2, 4, 8, 8}) * 2;
  const auto ref_lat = ref_vae->encode(x), ref_img = ref_vae->decode(z);
  const auto ref_state = sd::state_dict(*ref_vae);
  for (auto& [how, vae] : loaded) {
    SCOPED_TRACE(how);
    // The config is inferred from the weights' shapes and layer indices (the original files carry none).
    const auto& c = vae->config();
    EXPECT_EQ(c.encoder_block_out_channels, ref_vae->config().encoder_block_out_channels);
    EXPECT_EQ(c.num_encoder_blocks, ref_vae->config().num_encoder_blocks);
    EXPECT_EQ(c.num_decoder_blocks, ref_vae->config().num_decoder_blocks);
    EXPECT_EQ(c.latent_channels, ref_vae->config().latent_channels);
    const auto state = sd::state_dict(*vae);
    ASSERT_EQ(state.size(), ref_state.size());
    for (const auto& [k, t] : ref_state) EXPECT_TRUE(torch::equal(state.at(k), t)) << k;
    EXPECT_TRUE(torch::equal(vae->encode(x), ref_lat));
    EXPECT_TRUE(torch::equal(vae->decode(z), ref_img));
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TaesdOriginalLayout, ::testing::ValuesIn(taesd_models()),
                         [](const auto& info) { return sd::test::test_name(info.param); });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(TaesdOriginalLayout);

TEST(TaesdKeyConversion, MapsIndicesBothWays) {
  using sd::convert::TaesdHalf;
  EXPECT_EQ(sd::convert::taesd_key_to_diffusers("14.bias", TaesdHalf::Encoder, "e"), "encoder.layers.14.bias");
  EXPECT_EQ(sd::convert::taesd_key_to_diffusers("3.conv.4.weight", TaesdHalf::Decoder, "d"),
            "decoder.layers.2.conv.4.weight");
  EXPECT_EQ(sd::convert::taesd_key_to_diffusers("19.weight", TaesdHalf::Decoder, "d"), "decoder.layers.18.weight");
  auto back = sd::convert::taesd_key_from_diffusers("decoder.layers.18.weight");
  EXPECT_EQ(back.first, TaesdHalf::Decoder);
  EXPECT_EQ(back.second, "19.weight");
  back = sd::convert::taesd_key_from_diffusers("encoder.layers.1.conv.0.bias");
  EXPECT_EQ(back.first, TaesdHalf::Encoder);
  EXPECT_EQ(back.second, "1.conv.0.bias");
  EXPECT_THROW(sd::convert::taesd_key_from_diffusers("quant_conv.weight"), sd::InvalidArgument);
}

TEST(TaesdKeyConversion, RejectsKeysOutsideTheLayoutNamingFileAndKey) {
  using sd::convert::TaesdHalf;
  auto expect_msg = [](const std::string& key, TaesdHalf half, const std::string& frag) {
    try {
      sd::convert::taesd_key_to_diffusers(key, half, "taesd_x.safetensors");
      FAIL() << "no error for " << key;
    } catch (const sd::FormatError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("taesd_x.safetensors"), std::string::npos) << m;
      EXPECT_NE(m.find("'" + key + "'"), std::string::npos) << m;
      EXPECT_NE(m.find(frag), std::string::npos) << m;
    }
  };
  expect_msg("0.weight", TaesdHalf::Decoder, "Clamp");
  expect_msg("encoder.layers.0.weight", TaesdHalf::Encoder, "not a TAESD encoder key");
  expect_msg("2.conv.1.weight", TaesdHalf::Encoder, "not a TAESD encoder key");
  expect_msg("x.weight", TaesdHalf::Decoder, "not a TAESD decoder key");
}

// ---------------------------------------------------------------------------------------------------------------
// Pickles are refused with a conversion hint.

class TaesdFiles : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = sd::test::make_temp_dir("sd-taesd-files"); }
  void TearDown() override { fs::remove_all(dir_); }
  void touch(const std::string& name, const std::string& content = "PK\x03\x04") {
    std::ofstream(dir_ + "/" + name, std::ios::binary) << content;
  }
  void expect_error(const std::string& path, std::vector<std::string> frags) {
    try {
      sd::load_taesd(path);
      FAIL() << "no error for " << path;
    } catch (const sd::FormatError& e) {
      const std::string m = e.what();
      for (const auto& f : frags) EXPECT_NE(m.find(f), std::string::npos) << "missing '" << f << "' in: " << m;
    }
  }
  std::string dir_;
};

TEST_F(TaesdFiles, PthIsRefusedWithConversionMessage) {
  touch("taesd_encoder.pth");
  touch("taesd_decoder.pth");
  for (const std::string& p : {dir_ + "/taesd_decoder.pth", dir_})
    expect_error(p, {".pth", "never loaded", "convert it to safetensors", "save_file", "taesd_"});
  expect_error(dir_ + "/taesd_encoder.pth", {"taesd_encoder.pth", "taesd_encoder.safetensors"});
}

TEST_F(TaesdFiles, DiffusersFolderWithOnlyPickleIsRefused) {
  std::ofstream(dir_ + "/config.json") << R"({"_class_name": "AutoencoderTiny"})";
  touch("diffusion_pytorch_model.bin");
  expect_error(dir_, {"pickle", "safetensors"});
}

TEST_F(TaesdFiles, MissingHalfAndUnknownFolderAreNamed) {
  expect_error(dir_, {dir_, "not a TAESD folder"});
  sd::save_safetensors(dir_ + "/taesd_encoder.safetensors",
                       std::vector<std::pair<std::string, torch::Tensor>>{{"0.weight", torch::zeros({8, 3, 3, 3})}});
  expect_error(dir_, {"decoder file is missing"});
  expect_error(dir_ + "/taesd_encoder.safetensors", {"taesd_decoder.safetensors", "not found"});
  expect_error(dir_ + "/nothing_here", {"no such file"});
}

TEST_F(TaesdFiles, WrongKeysInOriginalFileNameFileAndKey) {
  sd::save_safetensors(dir_ + "/taesd_encoder.safetensors",
                       std::vector<std::pair<std::string, torch::Tensor>>{{"0.weight", torch::zeros({8, 3, 3, 3})}});
  sd::save_safetensors(dir_ + "/taesd_decoder.safetensors",
                       std::vector<std::pair<std::string, torch::Tensor>>{{"0.weight", torch::zeros({8, 4, 3, 3})}});
  expect_error(dir_, {"taesd_decoder.safetensors", "'0.weight'", "Clamp"});
}

// ---------------------------------------------------------------------------------------------------------------
// Config and architecture.

sd::AutoencoderTinyConfig config_of(const std::string& json) {
  return sd::AutoencoderTinyConfig::from_json(nlohmann::json::parse(json), "taesd/config.json");
}

TEST(AutoencoderTinyConfig, DefaultsAreDiffusers) {
  auto c = config_of(R"({"_class_name": "AutoencoderTiny", "block_out_channels": [64, 64, 64, 64]})");
  EXPECT_EQ(c.encoder_block_out_channels, (std::vector<int>{64, 64, 64, 64}));
  EXPECT_EQ(c.decoder_block_out_channels, (std::vector<int>{64, 64, 64, 64}));
  EXPECT_EQ(c.num_encoder_blocks, (std::vector<int>{1, 3, 3, 3}));
  EXPECT_EQ(c.num_decoder_blocks, (std::vector<int>{3, 3, 3, 1}));
  EXPECT_EQ(c.latent_channels, 4);
  EXPECT_EQ(c.upsampling_scaling_factor, 2);
  EXPECT_EQ(c.act_fn, "relu");
  EXPECT_DOUBLE_EQ(c.scaling_factor, 1.0);
  EXPECT_DOUBLE_EQ(c.latent_magnitude, 3.0);
  EXPECT_DOUBLE_EQ(c.latent_shift, 0.5);
  EXPECT_EQ(c.spatial_factor(), 8);
}

TEST(AutoencoderTinyConfig, ErrorsNameTheField) {
  auto expect_msg = [](const std::string& json, const std::string& frag) {
    try {
      config_of(json);
      FAIL() << "no error for " << json;
    } catch (const sd::FormatError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("taesd/config.json"), std::string::npos) << m;
      EXPECT_NE(m.find(frag), std::string::npos) << m;
    }
  };
  expect_msg(R"({"act_fn": "silu"})", "'act_fn'");
  expect_msg(R"({"num_encoder_blocks": "1,3,3,3"})", "'num_encoder_blocks'");
  expect_msg(R"({"latent_channels": 4.5})", "'latent_channels'");
  expect_msg(R"({"scaling_factor": "one"})", "'scaling_factor'");
  expect_msg(R"({"num_decoder_blocks": [3, 3, 1]})", "num_decoder_blocks");
  expect_msg(R"({"encoder_block_out_channels": [64, 64, 128, 128]})", "encoder_block_out_channels");
  expect_msg(R"({"upsampling_scaling_factor": 3})", "upsampling_scaling_factor");
  expect_msg(R"({"latent_channels": 0})", "latent_channels");
  expect_msg(R"({"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]})", "'_class_name'");
}

TEST(AutoencoderTiny, RealTaesdParameterCounts) {
  sd::AutoencoderTiny vae(sd::AutoencoderTinyConfig{});
  EXPECT_EQ(sd::count_parameters(*vae->encoder), 1222532);
  EXPECT_EQ(sd::count_parameters(*vae->decoder), 1222531);
  EXPECT_EQ(sd::count_parameters(*vae), 2445063);
}

TEST(AutoencoderTiny, KeysAreDiffusersNames) {
  sd::AutoencoderTiny vae(sd::AutoencoderTinyConfig{});
  const auto s = sd::state_dict(*vae);
  for (const char* k : {"encoder.layers.0.weight", "encoder.layers.0.bias", "encoder.layers.1.conv.0.weight",
                        "encoder.layers.1.conv.4.bias", "encoder.layers.2.weight", "encoder.layers.14.bias",
                        "decoder.layers.0.weight", "decoder.layers.2.conv.2.weight", "decoder.layers.6.weight",
                        "decoder.layers.17.conv.4.bias", "decoder.layers.18.bias"})
    EXPECT_TRUE(s.count(k)) << k;
  // Stride-2 / post-upsample convs have no bias; ReLU (decoder 1) and Upsample (decoder 5, 10, 15) hold nothing.
  for (const char* k : {"encoder.layers.2.bias", "decoder.layers.6.bias", "decoder.layers.1.weight",
                        "decoder.layers.5.weight", "decoder.layers.19.weight"})
    EXPECT_FALSE(s.count(k)) << k;
  EXPECT_EQ(s.size(), 2u * (10u * 6u + 3u + 2u + 2u));
}

// The structure inference used for the original files recovers the real config from a state dict's keys/shapes.
TEST(AutoencoderTiny, InfersConfigFromWeights) {
  sd::AutoencoderTinyConfig wide;
  wide.latent_channels = 16;  // taesd3 / taef1-style latents
  wide.num_encoder_blocks = {1, 2, 3, 1};
  wide.num_decoder_blocks = {2, 3, 1, 1};
  wide.encoder_block_out_channels = {32, 32, 32, 32};
  wide.decoder_block_out_channels = {48, 48, 48, 48};
  sd::AutoencoderTiny vae(wide);
  auto c = sd::infer_autoencoder_tiny_config(sd::state_dict(*vae), "mem");
  EXPECT_EQ(c.latent_channels, 16);
  EXPECT_EQ(c.num_encoder_blocks, wide.num_encoder_blocks);
  EXPECT_EQ(c.num_decoder_blocks, wide.num_decoder_blocks);
  EXPECT_EQ(c.encoder_block_out_channels, wide.encoder_block_out_channels);
  EXPECT_EQ(c.decoder_block_out_channels, wide.decoder_block_out_channels);
  EXPECT_EQ(c.in_channels, 3);
  EXPECT_EQ(c.out_channels, 3);
}

TEST(AutoencoderTiny, ShapesAndInputChecks) {
  sd::AutoencoderTinyConfig c;
  c.encoder_block_out_channels = c.decoder_block_out_channels = {8, 8, 8, 8};
  sd::AutoencoderTiny vae(c);
  torch::NoGradGuard ng;
  for (auto& p : vae->parameters()) p.normal_(0, 0.1);
  EXPECT_EQ(vae->encode(torch::zeros({1, 3, 64, 96})).sizes(), (std::vector<int64_t>{1, 4, 8, 12}));
  EXPECT_EQ(vae->decode(torch::zeros({2, 4, 5, 7})).sizes(), (std::vector<int64_t>{2, 3, 40, 56}));
  EXPECT_THROW(vae->encode(torch::zeros({1, 4, 64, 64})), sd::InvalidArgument);
  EXPECT_THROW(vae->decode(torch::zeros({4, 8, 8})), sd::InvalidArgument);
  EXPECT_THROW(vae->decode(torch::zeros({1, 4, 8, 8}, torch::kBFloat16)), sd::InvalidArgument);
  // Latent storage mapping of diffusers (scale_latents / unscale_latents) is a round trip inside (-3, 3).
  auto z = torch::linspace(-2.9, 2.9, 11);
  EXPECT_TRUE(torch::allclose(vae->unscale_latents(vae->scale_latents(z)), z, 1e-6, 1e-5));
}

}  // namespace
