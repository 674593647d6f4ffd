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

}  // namespace
