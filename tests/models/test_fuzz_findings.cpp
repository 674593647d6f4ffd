// Regression tests of what the fuzz targets (tests/fuzz, docs/FUZZING.md) found in the model configs' readers.
#include <functional>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/error_of.h"
#include "core/error.h"
#include "models/autoencoder_kl.h"
#include "models/autoencoder_tiny.h"
#include "models/clip_text_model.h"
#include "models/clip_vision_model.h"
#include "models/unet_2d_condition.h"

namespace {

std::string format_error_of(const std::function<void()>& f) { return sd::test::error_of<sd::FormatError>(f); }

// fuzz_config: a text_time UNet config with a huge addition_time_embed_dim overflowed 6 x addition_time_embed_dim
// (UBSan: "signed integer overflow: 6 * 4611686018427387904") before the check that compares it with
// projection_class_embeddings_input_dim.
TEST(FuzzFindings, UNetTextTimeDimsAreBounded) {
  const std::string m = format_error_of([] {
    sd::UNet2DConditionConfig::from_json(
        nlohmann::json::parse(R"({"addition_embed_type": "text_time", "addition_time_embed_dim": 4611686018427387904,
                                  "projection_class_embeddings_input_dim": 5})"),
        "unet/config.json");
  });
  EXPECT_EQ(m.rfind("unet/config.json: field 'addition_time_embed_dim': expected a positive integer up to 1048576", 0),
            0u)
      << m;
  const std::string p = format_error_of([] {
    sd::UNet2DConditionConfig::from_json(
        nlohmann::json::parse(R"({"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                                  "projection_class_embeddings_input_dim": 9223372036854775807})"),
        "unet/config.json");
  });
  EXPECT_NE(p.find("field 'projection_class_embeddings_input_dim': expected an integer up to 1048576"),
            std::string::npos)
      << p;
}

// fuzz_config: spatial_factor() (the VAE scale factor every loader asks for) is 2^(blocks - 1): a config with 64 or
// more blocks made that shift undefined behaviour. At most 16 blocks are accepted.
TEST(FuzzFindings, AutoencoderKLBlockCountIsBounded) {
  nlohmann::json j;
  j["block_out_channels"] = std::vector<int>(70, 32);
  j["down_block_types"] = std::vector<std::string>(70, "DownEncoderBlock2D");
  j["up_block_types"] = std::vector<std::string>(70, "UpDecoderBlock2D");
  const std::string m = format_error_of([&] { sd::AutoencoderKLConfig::from_json(j, "vae/config.json"); });
  EXPECT_NE(m.find("vae/config.json: AutoencoderKL config: block_out_channels has 70 entries, at most 16"),
            std::string::npos)
      << m;
}

// Review: the UNet config had no upper bounds: 65 or more levels made 2^(levels - 1) undefined behaviour, and absurd
// widths reached an allocation whose error names no file.
TEST(FuzzFindings, UNetConfigIsBounded) {
  nlohmann::json j;
  j["down_block_types"] = std::vector<std::string>(70, "DownBlock2D");
  j["up_block_types"] = std::vector<std::string>(70, "UpBlock2D");
  j["block_out_channels"] = std::vector<int>(70, 32);
  std::string m = format_error_of([&] { sd::UNet2DConditionConfig::from_json(j, "unet/config.json"); });
  EXPECT_NE(m.find("unet/config.json"), std::string::npos) << m;
  EXPECT_NE(m.find("down_block_types has 70 entries, at most 16"), std::string::npos) << m;
  m = format_error_of([] {
    sd::UNet2DConditionConfig::from_json(nlohmann::json::parse(R"({"in_channels": 9000000000000000000})"),
                                         "unet/config.json");
  });
  EXPECT_NE(m.find("field 'in_channels' is 9000000000000000000, at most 65536"), std::string::npos) << m;
  m = format_error_of([] {
    sd::UNet2DConditionConfig::from_json(
        nlohmann::json::parse(R"({"layers_per_block": 100000, "transformer_layers_per_block": 1})"),
        "unet/config.json");
  });
  EXPECT_NE(m.find("field 'layers_per_block' is 100000, at most 256"), std::string::npos) << m;
}

// Review: the text encoder, image encoder, VAE and TAESD configs had no upper bounds: a vocab_size of 4e9 asked the
// allocator for 512 GB ("can't allocate memory", no file named), 1e8 layers ran out of memory after 12 s.
TEST(FuzzFindings, TextEncoderVaeAndTaesdConfigsAreBounded) {
  auto clip = [](const std::string& text) {
    return format_error_of(
        [&] { sd::CLIPTextConfig::from_json(nlohmann::json::parse(text), "text_encoder/config.json"); });
  };
  EXPECT_EQ(clip(R"({"vocab_size": 4000000000})"),
            "text_encoder/config.json: field 'vocab_size': expected a positive integer up to 1048576, "
            "found 4000000000");
  EXPECT_EQ(clip(R"({"num_hidden_layers": 100000000})"),
            "text_encoder/config.json: field 'num_hidden_layers': expected a positive integer up to 256, "
            "found 100000000");
  EXPECT_EQ(clip(R"({"hidden_size": 1048576, "num_attention_heads": 8})"),
            "text_encoder/config.json: field 'hidden_size': expected a positive integer up to 65536, "
            "found 1048576");
  EXPECT_EQ(clip(R"({"vocab_size": 49408, "hidden_size": 768, "num_hidden_layers": 12})"), "") << "CLIP ViT-L";
  const std::string v = format_error_of([] {
    sd::CLIPVisionConfig::from_json(nlohmann::json::parse(R"({"num_hidden_layers": 100000})"),
                                    "image_encoder/config.json");
  });
  EXPECT_EQ(v, "image_encoder/config.json: field 'num_hidden_layers': expected a positive integer up to 256, "
               "found 100000");
  const std::string k = format_error_of([] {
    sd::AutoencoderKLConfig::from_json(nlohmann::json::parse(R"({"layers_per_block": 2000000000})"), "vae/config.json");
  });
  EXPECT_EQ(k, "vae/config.json: AutoencoderKL config: layers_per_block 2000000000 must be in [1, 256]");
  const std::string w = format_error_of([] {
    sd::AutoencoderKLConfig::from_json(nlohmann::json::parse(R"({"block_out_channels": [1048576]})"),
                                       "vae/config.json");
  });
  EXPECT_NE(w.find("block_out_channels [1048576] must be positive multiples of norm_num_groups 32, at most 65536"),
            std::string::npos)
      << w;
  const std::string t = format_error_of([] {
    sd::AutoencoderTinyConfig::from_json(nlohmann::json::parse(R"({"num_encoder_blocks": [1, 3, 3, 2000000000]})"),
                                         "taesd/config.json");
  });
  EXPECT_EQ(t,
            "taesd/config.json: AutoencoderTiny config: num_encoder_blocks [1, 3, 3, 2000000000] must be in [0, 256]");
  nlohmann::json levels;
  levels["encoder_block_out_channels"] = levels["decoder_block_out_channels"] = std::vector<int>(70, 64);
  levels["num_encoder_blocks"] = levels["num_decoder_blocks"] = std::vector<int>(70, 1);
  const std::string l = format_error_of([&] { sd::AutoencoderTinyConfig::from_json(levels, "taesd/config.json"); });
  EXPECT_EQ(l,
            "taesd/config.json: AutoencoderTiny config: num_encoder_blocks has 70 entries, at most 16 are supported");
}

}  // namespace
