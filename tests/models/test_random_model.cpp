// Full-size architectures: the configs make-random-model writes build models with exactly the published parameter
// counts, and the random init has the intended scale.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/fixtures.h"
#include "core/error.h"
#include "io/state_dict.h"
#include "models/autoencoder_kl.h"
#include "models/autoencoder_tiny.h"
#include "models/clip_text_model.h"
#include "models/controlnet.h"
#include "models/random_model.h"
#include "models/unet_2d_condition.h"

namespace {

TEST(RandomModel, RealArchitecturesHaveThePublishedParameterCounts) {
  auto unet = [](const std::string& arch) {
    return sd::count_parameters(
        *sd::UNet2DConditionModel(sd::UNet2DConditionConfig::from_json(sd::real_unet_config(arch), "unet")));
  };
  EXPECT_EQ(unet("sd-turbo"), 865910724);
  EXPECT_EQ(unet("sd15"), 859520964);
  // The distilled UNets (nota-ai/bk-sdm-tiny, IDKiro/sdxs-512-0.9): built in memory, no weights written.
  EXPECT_EQ(unet("bk-sdm-tiny"), 323384964);
  EXPECT_EQ(unet("sdxs-512"), 328177284);
  auto text = [](const std::string& arch) {
    return sd::count_parameters(
        *sd::CLIPTextModel(sd::CLIPTextConfig::from_json(sd::real_text_encoder_config(arch), "te")));
  };
  EXPECT_EQ(text("sd-turbo"), 340387840);
  EXPECT_EQ(text("sd15"), 123060480);
  EXPECT_EQ(text("bk-sdm-tiny"), 123060480);  // SD 1.4's CLIP ViT-L/14
  EXPECT_EQ(text("sdxs-512"), 340387840);     // SD 2.1 base's OpenCLIP ViT-H/14
  EXPECT_EQ(sd::count_parameters(
                *sd::AutoencoderKL(sd::AutoencoderKLConfig::from_json(sd::real_vae_config("sd-turbo"), "vae"))),
            83653863);
  sd::AutoencoderTiny taesd(sd::AutoencoderTinyConfig::from_json(sd::default_taesd_config(), "taesd"));
  EXPECT_EQ(sd::count_parameters(*taesd), 2445063);
  EXPECT_EQ(sd::count_parameters(*taesd->encoder), 1222532);
  EXPECT_EQ(sd::count_parameters(*taesd->decoder), 1222531);
  // SDXL-Turbo / SDXL base (stabilityai): the UNet, CLIP ViT-L/14 and OpenCLIP bigG/14 with projection, the SDXL VAE
  // (parameters are allocated, never touched: no 10 GB written).
  EXPECT_EQ(unet("sdxl-turbo"), 2567463684);
  EXPECT_EQ(unet("sdxl"), 2567463684);
  EXPECT_EQ(text("sdxl-turbo"), 123060480);
  EXPECT_EQ(sd::count_parameters(*sd::CLIPTextModel(
                sd::CLIPTextConfig::from_json(sd::real_text_encoder_2_config(), "text_encoder_2"))),
            694659840);
  EXPECT_EQ(sd::count_parameters(
                *sd::AutoencoderKL(sd::AutoencoderKLConfig::from_json(sd::real_vae_config("sdxl-turbo"), "vae"))),
            83653863);
  EXPECT_EQ(sd::real_unet_config("sdxl-turbo").at("sample_size"), 64);  // 512 px native
  EXPECT_EQ(sd::real_unet_config("sdxl").at("sample_size"), 128);       // 1024 px native
  EXPECT_THROW(sd::real_unet_config("sdxl-lightning"), sd::InvalidArgument);
}

TEST(RandomModel, InitScaleIsRealisticAndDeterministic) {
  sd::CLIPTextConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 256;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.vocab_size = 1000;
  sd::CLIPTextModel a(c), b(c);
  sd::randomize_parameters(*a, 7);
  sd::randomize_parameters(*b, 7);
  auto sa = sd::state_dict(*a), sb = sd::state_dict(*b);
  for (const auto& [k, v] : sa) EXPECT_TRUE(torch::equal(v, sb.at(k))) << k;
  // fc1 [256, 64]: std 1/sqrt(64) = 0.125; layer norm weights ~ 1; token table std 0.02.
  EXPECT_NEAR(sa.at("text_model.encoder.layers.0.mlp.fc1.weight").std().item<double>(), 0.125, 0.01);
  EXPECT_NEAR(sa.at("text_model.encoder.layers.0.layer_norm1.weight").mean().item<double>(), 1.0, 0.01);
  EXPECT_NEAR(sa.at("text_model.embeddings.token_embedding.weight").std().item<double>(), 0.02, 0.002);
  sd::CLIPTextModel d(c);
  sd::randomize_parameters(*d, 8);
  EXPECT_FALSE(torch::equal(sa.at("text_model.final_layer_norm.weight"),
                            sd::state_dict(*d).at("text_model.final_layer_norm.weight")));
}

// make-random-model --arch controlnet-sd15|controlnet-sd21: ControlNetModel.from_unet of the base UNet, with the
// published conditioning embedding. SD 1.5's: 361,279,120 parameters (1.45 GB in fp32, the size of the published
// control_v11p_sd15_* files); SD 2.1's differs from it exactly by what the two UNet encoders differ by.
TEST(RandomModel, ControlNetArchitectures) {
  auto cn_params = [](const nlohmann::json& c) {
    return sd::count_parameters(*sd::ControlNetModel(sd::ControlNetConfig::from_json(c, "controlnet")));
  };
  const auto sd15 = sd::real_controlnet_config("controlnet-sd15");
  EXPECT_EQ(sd15.at("_class_name"), "ControlNetModel");
  EXPECT_EQ(sd15.at("cross_attention_dim"), 768);
  EXPECT_EQ(sd15.at("block_out_channels"), nlohmann::json({320, 640, 1280, 1280}));
  EXPECT_EQ(sd15.at("conditioning_embedding_out_channels"), nlohmann::json({16, 32, 96, 256}));
  EXPECT_EQ(sd15.at("use_linear_projection"), false);
  EXPECT_FALSE(sd15.contains("up_block_types"));
  EXPECT_FALSE(sd15.contains("out_channels"));
  EXPECT_FALSE(sd15.contains("sample_size"));
  EXPECT_EQ(cn_params(sd15), 361279120);
  const auto sd21 = sd::real_controlnet_config("controlnet-sd21");
  EXPECT_EQ(sd21.at("cross_attention_dim"), 1024);
  EXPECT_EQ(sd21.at("attention_head_dim"), nlohmann::json({5, 10, 20, 20}));
  EXPECT_EQ(sd21.at("use_linear_projection"), true);
  EXPECT_EQ(sd21.at("upcast_attention"), false);  // sd-turbo's null -> ControlNetModel's default
  // The two families differ only in the text width of every cross-attention's to_k / to_v (768 -> 1024) - two
  // transformers in each of the 3 cross-attention down blocks and one in the mid block - and in proj_in / proj_out
  // being linears instead of 1x1 convs (the same number of weights).
  int64_t kv_extra = 0;
  for (int64_t ch : {320, 320, 640, 640, 1280, 1280, 1280}) kv_extra += 2 * ch * (1024 - 768);
  EXPECT_EQ(cn_params(sd21), 361279120 + kv_extra);
  EXPECT_EQ(cn_params(sd21), 364228240);
  EXPECT_THROW(sd::real_controlnet_config("controlnet-sdxl"), sd::InvalidArgument);
  // A UNet without a mid block has no ControlNet.
  try {
    sd::controlnet_config_from_unet(sd::real_unet_config("bk-sdm-tiny"), "bk/unet/config.json");
    ADD_FAILURE() << "no error for a UNet without a mid block";
  } catch (const sd::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("bk/unet/config.json: the UNet has no mid block"), std::string::npos)
        << e.what();
  }
}

TEST(RandomModel, ControlNetInitIsUNetScaled) {
  // A small ControlNet from a small UNet config: the conditioning embedding's convs and the zero convs get the
  // 1/sqrt(fan_in) scale of every conv (not the 0.02 of embedding tables), deterministic per seed.
  nlohmann::json unet = {{"block_out_channels", {32, 64}},
                         {"down_block_types", {"CrossAttnDownBlock2D", "DownBlock2D"}},
                         {"up_block_types", {"UpBlock2D", "CrossAttnUpBlock2D"}},
                         {"cross_attention_dim", 32},
                         {"layers_per_block", 1},
                         {"norm_num_groups", 8},
                         {"attention_head_dim", 8},
                         {"sample_size", 8},
                         {"out_channels", 4}};
  const auto cfg = sd::controlnet_config_from_unet(unet);
  EXPECT_EQ(cfg.at("mid_block_type"), "UNetMidBlock2DCrossAttn");
  sd::ControlNetModel a(sd::ControlNetConfig::from_json(cfg, "c")), b(sd::ControlNetConfig::from_json(cfg, "c"));
  sd::randomize_parameters(*a, 3);
  sd::randomize_parameters(*b, 3);
  const auto sa = sd::state_dict(*a), sb = sd::state_dict(*b);
  for (const auto& [k, v] : sa) EXPECT_TRUE(torch::equal(v, sb.at(k))) << k;
  // conv_out 256 -> 32, 3x3: fan_in 2304, std 1/48; a zero conv 64 -> 64 1x1: std 1/8.
  EXPECT_NEAR(sa.at("controlnet_cond_embedding.conv_out.weight").std().item<double>(), 1.0 / 48, 0.002);
  EXPECT_NEAR(sa.at("controlnet_mid_block.weight").std().item<double>(), 0.125, 0.01);
}

}  // namespace
