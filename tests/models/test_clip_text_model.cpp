// CLIPTextModel against transformers' outputs on the fixture models (data-driven over models/*), plus config and
// loading errors.
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "common/fixtures.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/state_dict.h"
#include "models/clip_text_model.h"

namespace fs = std::filesystem;

namespace {

constexpr double kAtol = 1e-4, kRtol = 1e-5;  // fixture README: single module calls in float32

std::vector<std::string> models_with_text_cases() {
  std::vector<std::string> out;
  for (const auto& m : sd::test::fixture_models())
    if (sd::test::fixture_exists("modules/" + m + "/text_encoder.safetensors")) out.push_back(m);
  return out;
}

class TextEncoderGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(TextEncoderGolden, MatchesTransformersFp32) {
  const std::string model = GetParam();
  auto enc = sd::load_clip_text_model(sd::test::fixture_path("models/" + model + "/text_encoder"));
  auto ref = sd::SafeTensorsFile::open(sd::test::fixture_path("modules/" + model + "/text_encoder.safetensors"));
  torch::NoGradGuard ng;
  auto out = enc->forward_all(ref.get("input_ids"), true);
  SD_EXPECT_CLOSE(out.last_hidden_state, ref.get("last_hidden_state"), kAtol, kRtol,
                                      model + " last_hidden_state");
  SD_EXPECT_CLOSE(out.pooler_output, ref.get("pooler_output"), kAtol, kRtol,
                                      model + " pooler_output");
  const auto& hs = out.hidden_states;
  ASSERT_EQ(static_cast<int64_t>(hs.size()), enc->config().num_hidden_layers + 1);
  SD_EXPECT_CLOSE(hs[hs.size() - 2], ref.get("hidden_states_penultimate"), kAtol, kRtol,
                                      model + " hidden_states[-2]");
  // forward() is the same tensor as forward_all().last_hidden_state; clip_skip 1 = final norm of hidden_states[-2].
  EXPECT_TRUE(torch::equal(enc->forward(ref.get("input_ids")), out.last_hidden_state));
  EXPECT_TRUE(torch::allclose(enc->forward_clip_skip(ref.get("input_ids"), 1),
                              enc->text_model->final_layer_norm(hs[hs.size() - 2])));
}

// bf16 weights and activations against the fp32 reference. Measured: max abs error 5.0e-2 for tiny-sd15 (1.2% of
// max|ref| 4.1) and 3.3e-2 for tiny-sd21 (1.0%); bf16 keeps 8 mantissa bits (3.9e-3 relative per rounding) and the
// errors of ~10 rounded ops add up. Bound: 2.5% of max|ref| (2x headroom).
TEST_P(TextEncoderGolden, Bf16WithinMeasuredBound) {
  const std::string model = GetParam();
  auto enc = sd::load_clip_text_model(sd::test::fixture_path("models/" + model + "/text_encoder"), torch::kBFloat16);
  auto ref = sd::SafeTensorsFile::open(sd::test::fixture_path("modules/" + model + "/text_encoder.safetensors"));
  torch::NoGradGuard ng;
  auto out = enc->forward(ref.get("input_ids"));
  EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
  SD_EXPECT_CLOSE(out, ref.get("last_hidden_state"), 0.0, 2.5e-2, model + " bf16");
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TextEncoderGolden, ::testing::ValuesIn(models_with_text_cases()),
                         [](const auto& info) { return sd::test::test_name(info.param); });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(TextEncoderGolden);

sd::CLIPTextConfig config_of(const std::string& json) {
  return sd::CLIPTextConfig::from_json(nlohmann::json::parse(json), "text_encoder/config.json");
}

TEST(CLIPTextConfig, DefaultsAndFields) {
  auto c = config_of(R"({"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                         "intermediate_size": 3072, "hidden_act": "quick_gelu", "unknown_field": 3})");
  EXPECT_EQ(c.hidden_size, 768);
  EXPECT_EQ(c.vocab_size, 49408);
  EXPECT_EQ(c.max_position_embeddings, 77);
  EXPECT_DOUBLE_EQ(c.layer_norm_eps, 1e-5);
}

TEST(CLIPTextConfig, ErrorsNameTheField) {
  auto expect_msg = [](const std::string& json, const std::string& frag) {
    try {
      config_of(json);
      FAIL() << "no error for " << json;
    } catch (const sd::FormatError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("text_encoder/config.json"), std::string::npos) << m;
      EXPECT_NE(m.find(frag), std::string::npos) << m;
    }
  };
  expect_msg(R"({"hidden_size": "big"})", "'hidden_size'");
  expect_msg(R"({"hidden_act": "relu"})", "'hidden_act'");
  expect_msg(R"({"hidden_size": 30, "num_attention_heads": 4})", "'num_attention_heads'");
  expect_msg(R"({"num_hidden_layers": 0})", "'num_hidden_layers'");
  expect_msg(R"([1, 2])", "JSON object");
}

// The real architectures' parameter counts (issue facts), built in memory (parameters are empty: no init cost).
TEST(CLIPTextModel, FullSizeParameterCounts) {
  auto sd_turbo = config_of(R"({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                                "num_attention_heads": 16, "hidden_act": "gelu"})");
  EXPECT_EQ(sd::count_parameters(*sd::CLIPTextModel(sd_turbo)), 340387840);
  auto sd15 = config_of(R"({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                            "num_attention_heads": 12, "hidden_act": "quick_gelu"})");
  EXPECT_EQ(sd::count_parameters(*sd::CLIPTextModel(sd15)), 123060480);
}

TEST(CLIPTextModel, KeysAreTransformersNames) {
  auto c = config_of(R"({"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "vocab_size": 10, "max_position_embeddings": 5})");
  auto sdict = sd::state_dict(*sd::CLIPTextModel(c));
  for (const char* k : {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
                        "text_model.encoder.layers.1.self_attn.q_proj.bias",
                        "text_model.encoder.layers.0.mlp.fc2.weight", "text_model.encoder.layers.0.layer_norm2.bias",
                        "text_model.final_layer_norm.weight"})
    EXPECT_TRUE(sdict.count(k)) << k;
  EXPECT_EQ(sdict.size(), 2u + 2u * 16u + 2u);
}

class TextEncoderLoadErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = sd::test::make_temp_dir("sd-clip");
    std::ofstream(dir_ + "/config.json") << R"({"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "vocab_size": 10, "max_position_embeddings": 5})";
    auto c = sd::CLIPTextConfig::from_json(sd::read_json_file(dir_ + "/config.json"), "config.json");
    sd::CLIPTextModel m(c);
    for (auto& p : m->parameters()) p.data().normal_();
    weights_ = sd::state_dict(*m);
  }
  std::string dir_;
  std::map<std::string, torch::Tensor> weights_;
};

TEST_F(TextEncoderLoadErrors, LoadsAndIgnoresPositionIds) {
  auto w = weights_;
  w["text_model.embeddings.position_ids"] = torch::arange(5).unsqueeze(0);
  sd::save_safetensors(dir_ + "/model.safetensors", w);
  auto m = sd::load_clip_text_model(dir_);
  torch::NoGradGuard ng;
  EXPECT_EQ(m->forward(torch::tensor({{1, 2, 3}})).sizes(), (std::vector<int64_t>{1, 3, 8}));
  EXPECT_THROW(m->forward(torch::tensor({{1, 2, 30}})), sd::InvalidArgument);
  EXPECT_THROW(m->forward(torch::zeros({1, 6}, torch::kLong)), sd::InvalidArgument);
}

TEST_F(TextEncoderLoadErrors, ReportsAllMissingUnexpectedAndMismatchedKeysAtOnce) {
  auto w = weights_;
  w.erase("text_model.final_layer_norm.weight");
  w.erase("text_model.encoder.layers.0.mlp.fc1.bias");
  w["text_model.extra.weight"] = torch::zeros({1});
  w["text_model.encoder.layers.0.self_attn.q_proj.weight"] = torch::zeros({8, 9});
  // Raw integer codes where a float weight belongs (a quantised file): not cast silently.
  w["text_model.encoder.layers.0.self_attn.k_proj.weight"] = torch::zeros({8, 8}, torch::kInt8);
  sd::save_safetensors(dir_ + "/model.safetensors", w);
  try {
    sd::load_clip_text_model(dir_);
    FAIL();
  } catch (const sd::FormatError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("model.safetensors"), std::string::npos) << m;
    EXPECT_NE(m.find("missing keys (2)"), std::string::npos) << m;
    EXPECT_NE(m.find("text_model.final_layer_norm.weight"), std::string::npos) << m;
    EXPECT_NE(m.find("text_model.encoder.layers.0.mlp.fc1.bias"), std::string::npos) << m;
    EXPECT_NE(m.find("unexpected keys (1)"), std::string::npos) << m;
    EXPECT_NE(m.find("text_model.extra.weight"), std::string::npos) << m;
    EXPECT_NE(m.find("q_proj.weight: file has [8, 9], model expects [8, 8]"), std::string::npos) << m;
    EXPECT_NE(m.find("k_proj.weight: file has Char values, model expects floating point"), std::string::npos) << m;
  }
}

TEST_F(TextEncoderLoadErrors, PickleOnlyFolderIsRefused) {
  std::ofstream(dir_ + "/pytorch_model.bin") << "not really a pickle";
  try {
    sd::load_clip_text_model(dir_);
    FAIL();
  } catch (const sd::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("convert them to .safetensors"), std::string::npos) << e.what();
  }
}

TEST_F(TextEncoderLoadErrors, Bf16AndFp32LoadKeepDtype) {
  sd::save_safetensors(dir_ + "/model.safetensors", weights_);
  auto m = sd::load_clip_text_model(dir_, torch::kBFloat16);
  for (const auto& p : m->parameters()) EXPECT_EQ(p.scalar_type(), torch::kBFloat16);
}

}  // namespace
