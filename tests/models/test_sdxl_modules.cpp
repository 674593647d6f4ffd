// SDXL's modules against the reference (fixtures sdxl/modules/tiny-sdxl, diffusers 0.24 + transformers 4.35):
// CLIPTextModel and CLIPTextModelWithProjection (last, penultimate, pooled, projected), the text_time UNet with its
// added conditioning (add_embeds, aug_emb, output), the force_upcast AutoencoderKL and TAESDXL; plus the config
// errors of the new fields. Every case is a named, data-driven test; tolerances are the README's (modules: atol 1e-4
// + rtol 1e-5 x max|ref|).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "common/fixtures.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "models/autoencoder_kl.h"
#include "models/autoencoder_tiny.h"
#include "models/clip_text_model.h"
#include "models/embeddings.h"
#include "models/unet_2d_condition.h"

namespace sd {
namespace {

using torch::Tensor;

constexpr double kAtol = 1e-4, kRtol = 1e-5;
const std::string kModel = "sdxl/models/tiny-sdxl";
const std::string kModules = "sdxl/modules/tiny-sdxl";

bool have_fixtures() { return test::fixture_exists(kModel + "/model_index.json"); }

#define SD_REQUIRE_SDXL() \
  if (!have_fixtures()) GTEST_SKIP() << kModel << " not in the fixture root"

class SdxlTextEncoder : public ::testing::TestWithParam<std::string> {};

TEST_P(SdxlTextEncoder, MatchesTransformers) {
  SD_REQUIRE_SDXL();
  const std::string name = GetParam();
  auto enc = load_clip_text_model(test::fixture_path(kModel + "/" + name));
  const auto ref = SafeTensorsFile::open(test::fixture_path(kModules + "/" + name + ".safetensors"));
  torch::NoGradGuard ng;
  const Tensor ids = ref.get("input_ids");
  const auto out = enc->forward_all(ids, true);
  SD_EXPECT_CLOSE(out.last_hidden_state, ref.get("last_hidden_state"), kAtol, kRtol, name + " last_hidden_state");
  SD_EXPECT_CLOSE(out.pooler_output, ref.get("pooler_output"), kAtol, kRtol, name + " pooler_output");
  // What SDXL conditions on: hidden_states[-2] without the final layer norm.
  const auto xl = enc->forward_sdxl(ids);
  SD_EXPECT_CLOSE(xl.hidden, ref.get("hidden_states_penultimate"), kAtol, kRtol, name + " hidden_states[-2]");
  if (name == "text_encoder_2") {
    ASSERT_TRUE(enc->config().with_projection);
    EXPECT_EQ(enc->config().projection_dim, 12);
    // No bias on the projection (transformers: Linear(hidden, projection_dim, bias=False)).
    EXPECT_FALSE(enc->text_projection->bias.defined());
    SD_EXPECT_CLOSE(out.text_embeds, ref.get("text_embeds"), kAtol, kRtol, name + " text_embeds");
    SD_EXPECT_CLOSE(xl.text_embeds, ref.get("text_embeds"), kAtol, kRtol, name + " forward_sdxl text_embeds");
    // The pooled row sits at argmax(input_ids) (legacy eos id 2): the first EOS of each prompt.
    const Tensor pos = ids.argmax(-1);
    for (int64_t i = 0; i < ids.size(0); ++i)
      EXPECT_EQ(ids[i][pos[i].item<int64_t>()].item<int64_t>(), 49407) << "row " << i;
  } else {
    EXPECT_FALSE(enc->config().with_projection);
    EXPECT_FALSE(enc->text_projection);
    EXPECT_FALSE(out.text_embeds.defined());
  }
}

INSTANTIATE_TEST_SUITE_P(TinySdxl, SdxlTextEncoder, ::testing::Values("text_encoder", "text_encoder_2"),
                         [](const auto& info) { return test::test_name(info.param); });

// The second tokenizer pads with "!" (id 0): the reference input_ids carry it, the first encoder's file pads with
// <|endoftext|>.
TEST(SdxlTextEncoder, ReferenceIdsPadDifferently) {
  SD_REQUIRE_SDXL();
  const auto a = SafeTensorsFile::open(test::fixture_path(kModules + "/text_encoder.safetensors")).get("input_ids");
  const auto b = SafeTensorsFile::open(test::fixture_path(kModules + "/text_encoder_2.safetensors")).get("input_ids");
  EXPECT_EQ(a[0][76].item<int64_t>(), 49407);
  EXPECT_EQ(b[0][76].item<int64_t>(), 0);
}

TEST(SdxlTextEncoder, WithProjectionNeedsAProjectionDim) {
  try {
    CLIPTextConfig::from_json(nlohmann::json::parse(R"({"architectures": ["CLIPTextModelWithProjection"],
        "hidden_size": 8, "num_attention_heads": 2})"),
                              "text_encoder_2/config.json");
    FAIL() << "expected FormatError";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("projection_dim"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("text_encoder_2/config.json"), std::string::npos) << e.what();
  }
}

TEST(SdxlTextEncoder, ClipSkipMovesBackFromThePenultimateLayer) {
  SD_REQUIRE_SDXL();
  auto enc = load_clip_text_model(test::fixture_path(kModel + "/text_encoder_2"));
  const auto ref = SafeTensorsFile::open(test::fixture_path(kModules + "/text_encoder_2.safetensors"));
  torch::NoGradGuard ng;
  const auto all = enc->forward_all(ref.get("input_ids"), true);
  // diffusers SDXL: hidden_states[-(clip_skip + 2)]; 3 layers -> 4 hidden states; clip_skip 1 -> index 1.
  EXPECT_TRUE(torch::equal(enc->forward_sdxl(ref.get("input_ids"), 1).hidden, all.hidden_states[1]));
  EXPECT_THROW(enc->forward_sdxl(ref.get("input_ids"), 3), InvalidArgument);
}

class SdxlUNet : public ::testing::TestWithParam<std::string> {};

TEST_P(SdxlUNet, MatchesDiffusersWithAddedCondKwargs) {
  SD_REQUIRE_SDXL();
  const std::string c = GetParam();
  static auto unet = load_unet(test::fixture_path(kModel + "/unet"));
  const auto ref = SafeTensorsFile::open(test::fixture_path(kModules + "/unet.safetensors"));
  torch::NoGradGuard ng;
  const auto& cfg = unet->config();
  ASSERT_TRUE(cfg.text_time());
  EXPECT_EQ(cfg.pooled_text_dim(), 12);
  EXPECT_EQ(cfg.transformer_layers_per_block, (std::vector<int64_t>{1, 2}));
  const Tensor text_embeds = ref.get(c + ".text_embeds"), time_ids = ref.get(c + ".time_ids");
  // The intermediates: add_embeds = cat(text_embeds, sinusoid(time_ids).reshape(B, -1)), aug_emb = add_embedding.
  const int64_t b = time_ids.size(0);
  const Tensor add_embeds =
      torch::cat({text_embeds, timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim,
                                                  cfg.flip_sin_to_cos, cfg.freq_shift)
                                   .reshape({b, -1})},
                 -1);
  SD_EXPECT_CLOSE(add_embeds, ref.get(c + ".add_embeds"), kAtol, kRtol, c + " add_embeds");
  SD_EXPECT_CLOSE(unet->add_embedding(add_embeds), ref.get(c + ".aug_emb"), kAtol, kRtol, c + " aug_emb");
  const Tensor out = unet->forward(ref.get(c + ".sample"), ref.get(c + ".timestep"),
                                   ref.get(c + ".encoder_hidden_states"), {}, text_embeds, time_ids);
  SD_EXPECT_CLOSE(out, ref.get(c + ".out"), kAtol, kRtol, c + " out");
}

INSTANTIATE_TEST_SUITE_P(TinySdxl, SdxlUNet,
                         ::testing::Values("b1_t999", "b2_mixed", "b2_cfg_zero_uncond", "b3_same"),
                         [](const auto& info) { return test::test_name(info.param); });

TEST(SdxlUNet, AddedConditioningIsRequiredAndChecked) {
  SD_REQUIRE_SDXL();
  auto unet = load_unet(test::fixture_path(kModel + "/unet"));
  const auto ref = SafeTensorsFile::open(test::fixture_path(kModules + "/unet.safetensors"));
  torch::NoGradGuard ng;
  const Tensor x = ref.get("b1_t999.sample"), t = ref.get("b1_t999.timestep");
  const Tensor ehs = ref.get("b1_t999.encoder_hidden_states");
  auto msg = [&](const std::function<void()>& f) {
    try {
      f();
    } catch (const InvalidArgument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(msg([&] { unet->forward(x, t, ehs); }).find("text_time"), std::string::npos);
  EXPECT_NE(msg([&] { unet->forward(x, t, ehs, {}, torch::zeros({1, 11}), torch::zeros({1, 6})); })
                .find("text_embeds must be [1, 12]"),
            std::string::npos);
  EXPECT_NE(msg([&] { unet->forward(x, t, ehs, {}, torch::zeros({1, 12}), torch::zeros({1, 5})); })
                .find("time_ids must be [1, 6]"),
            std::string::npos);
}

TEST(SdxlUNet, PlainUNetsRefuseAddedConditioning) {
  UNet2DConditionConfig c;
  c.block_out_channels = {8, 8};
  c.down_block_types = {"DownBlock2D", "CrossAttnDownBlock2D"};
  c.up_block_types = {"CrossAttnUpBlock2D", "UpBlock2D"};
  c.layers_per_block = {1, 1};
  c.transformer_layers_per_block = {1, 1};
  c.only_cross_attention = {false, false};
  c.cross_attention_dim = {4, 4};
  c.num_attention_heads = {1, 1};
  c.norm_num_groups = 4;
  UNet2DConditionModel unet(c);
  torch::NoGradGuard ng;
  EXPECT_THROW(unet->forward(torch::zeros({1, 4, 8, 8}), torch::tensor({1}), torch::zeros({1, 77, 4}), {},
                             torch::zeros({1, 4}), torch::zeros({1, 6})),
               InvalidArgument);
}

TEST(SdxlUNet, ConfigErrorsNameTheField) {
  SD_REQUIRE_SDXL();
  const std::string path = test::fixture_path(kModel + "/unet/config.json");
  const nlohmann::json base = read_json_file(path);
  auto fails_with = [&](nlohmann::json j, const std::string& frag) {
    try {
      UNet2DConditionConfig::from_json(j, "unet/config.json");
      ADD_FAILURE() << "expected FormatError mentioning " << frag;
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find(frag), std::string::npos) << e.what();
    }
  };
  auto j = base;
  j["addition_embed_type"] = "image";
  fails_with(j, "addition_embed_type");
  j = base;
  // 6 time ids x addition_time_embed_dim of the fixture: no room for the pooled text.
  j["projection_class_embeddings_input_dim"] = 6 * base.at("addition_time_embed_dim").get<int64_t>();
  fails_with(j, "projection_class_embeddings_input_dim");
  j = base;
  j["addition_time_embed_dim"] = nullptr;
  fails_with(j, "addition_time_embed_dim");
  // The tiny model's config parses: the SDXL fields are read, not ignored.
  const auto ok = UNet2DConditionConfig::from_json(base, path);
  EXPECT_EQ(ok.addition_time_embed_dim, base.at("addition_time_embed_dim").get<int64_t>());
  EXPECT_EQ(ok.projection_class_embeddings_input_dim, base.at("projection_class_embeddings_input_dim").get<int64_t>());
}

TEST(SdxlAutoencoders, AutoencoderKLMatchesDiffusers) {
  SD_REQUIRE_SDXL();
  auto vae = load_vae(test::fixture_path(kModel + "/vae"));
  EXPECT_TRUE(vae->config().force_upcast);
  EXPECT_DOUBLE_EQ(vae->config().scaling_factor, 0.13025);
  const auto ref = SafeTensorsFile::open(test::fixture_path(kModules + "/vae.safetensors"));
  torch::NoGradGuard ng;
  const auto post = vae->encode(ref.get("encode.input"));
  SD_EXPECT_CLOSE(post.mean, ref.get("encode.mean"), kAtol, kRtol, "vae encode mean");
  SD_EXPECT_CLOSE(post.std(), ref.get("encode.std"), kAtol, kRtol, "vae encode std");
  SD_EXPECT_CLOSE(vae->decode(ref.get("decode.input")), ref.get("decode.out"), kAtol, kRtol, "vae decode");
}

TEST(SdxlAutoencoders, TaesdxlMatchesDiffusers) {
  SD_REQUIRE_SDXL();
  auto taesd = load_taesd(test::fixture_path(kModel + "/taesdxl"));
  const auto ref = SafeTensorsFile::open(test::fixture_path(kModules + "/taesdxl.safetensors"));
  torch::NoGradGuard ng;
  SD_EXPECT_CLOSE(taesd->encode(ref.get("encode.input")), ref.get("encode.latents"), kAtol, kRtol, "taesdxl encode");
  SD_EXPECT_CLOSE(taesd->decode(ref.get("decode.input")), ref.get("decode.out"), kAtol, kRtol, "taesdxl decode");
}

}  // namespace
}  // namespace sd
