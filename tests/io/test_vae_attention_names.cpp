// The AutoencoderKL mid-block attention names of VAEs saved before diffusers ~0.14 (io/checkpoint_convert): renamed
// as diffusers 0.24's _convert_deprecated_attention_blocks does, the same tensors, and both names for one layer
// refused naming the two keys.
#include <filesystem>
#include <map>
#include <string>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "common/error_of.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "io/checkpoint_convert.h"
#include "io/ldm_checkpoint.h"
#include "io/safetensors.h"

namespace {

namespace cv = sd::convert;

TEST(VaeAttentionNames, DeprecatedNamesAreRenamedToTheCurrentOnes) {
  std::map<std::string, torch::Tensor> w;
  const std::map<std::string, std::string> expected = {
      {"encoder.mid_block.attentions.0.query.weight", "encoder.mid_block.attentions.0.to_q.weight"},
      {"encoder.mid_block.attentions.0.key.bias", "encoder.mid_block.attentions.0.to_k.bias"},
      {"encoder.mid_block.attentions.0.value.weight", "encoder.mid_block.attentions.0.to_v.weight"},
      {"decoder.mid_block.attentions.0.proj_attn.weight", "decoder.mid_block.attentions.0.to_out.0.weight"},
      {"decoder.mid_block.attentions.0.proj_attn.bias", "decoder.mid_block.attentions.0.to_out.0.bias"},
      // Already current, or names diffusers keeps: unchanged.
      {"decoder.mid_block.attentions.0.to_q.weight", "decoder.mid_block.attentions.0.to_q.weight"},
      {"decoder.mid_block.attentions.0.group_norm.weight", "decoder.mid_block.attentions.0.group_norm.weight"},
      {"encoder.down_blocks.0.resnets.0.conv1.weight", "encoder.down_blocks.0.resnets.0.conv1.weight"},
      // Outside a mid block diffusers renames nothing (an AutoencoderKL has no such layer: load_weights names it).
      {"decoder.up_blocks.0.attentions.0.query.weight", "decoder.up_blocks.0.attentions.0.query.weight"},
      {"decoder.mid_block.attentions.0.query.weight.extra", "decoder.mid_block.attentions.0.query.weight.extra"},
  };
  std::map<std::string, const void*> data;
  int64_t i = 0;
  for (const auto& [old_key, now] : expected) {
    w[old_key] = torch::full({2}, static_cast<float>(++i));
    data[now] = w[old_key].data_ptr();
  }
  EXPECT_EQ(cv::vae_deprecated_attention_to_current(w, "vae.safetensors"), 5u);
  ASSERT_EQ(w.size(), expected.size());
  for (const auto& [now, ptr] : data) {
    ASSERT_TRUE(w.count(now)) << now;
    EXPECT_EQ(w.at(now).data_ptr(), ptr) << now << ": the same tensor, not a copy";
  }
  EXPECT_TRUE(cv::is_deprecated_vae_attention_key("decoder.mid_block.attentions.0.value.bias"));
  EXPECT_FALSE(cv::is_deprecated_vae_attention_key("decoder.mid_block.attentions.0.to_v.bias"));
  EXPECT_FALSE(cv::is_deprecated_vae_attention_key("mid_block.attentions.0.query.weight"));  // a UNet2DModel's
  // Converting twice changes nothing.
  EXPECT_EQ(cv::vae_deprecated_attention_to_current(w, "vae.safetensors"), 0u);
}

TEST(VaeAttentionNames, BothNamesForOneLayerAreRefusedNamingThem) {
  std::map<std::string, torch::Tensor> w = {{"decoder.mid_block.attentions.0.proj_attn.bias", torch::zeros({2})},
                                            {"decoder.mid_block.attentions.0.to_out.0.bias", torch::ones({2})}};
  EXPECT_EQ(sd::test::error_of<sd::Error>([&] { cv::vae_deprecated_attention_to_current(w, "vae.safetensors"); }),
            "vae.safetensors: decoder.mid_block.attentions.0.proj_attn.bias (the name diffusers used before 0.14) and "
            "decoder.mid_block.attentions.0.to_out.0.bias are the same layer: expected one of the two names, not "
            "both");
  EXPECT_EQ(w.size(), 2u);  // nothing renamed
}

// A --vae file's architecture is read from its names: the old ones tell that the mid blocks have attention, as the
// current ones do (a model without it would then refuse the file's own attention weights).
TEST(VaeAttentionNames, InferredConfigOfAFileSeesTheDeprecatedNames) {
  const std::string src = sd::test::fixture_path("models/tiny-sd15/vae/diffusion_pytorch_model.safetensors");
  if (!sd::test::fixture_exists("models/tiny-sd15/vae/diffusion_pytorch_model.safetensors")) GTEST_SKIP();
  const auto current = sd::SafeTensorsFile::open(src);
  std::map<std::string, torch::Tensor> old;
  for (const auto& k : current.keys()) {
    std::string o = k;
    const std::string to_q = ".attentions.0.to_q.";
    if (const size_t p = o.find(to_q); p != std::string::npos) o.replace(p, to_q.size(), ".attentions.0.query.");
    old[o] = current.get(k);
  }
  ASSERT_TRUE(old.count("encoder.mid_block.attentions.0.query.weight"));
  const std::string dir = sd::test::make_temp_dir("sd-vae-names");
  sd::save_safetensors(dir + "/old.safetensors", old);
  const auto a = cv::inspect_vae_file(current).config;
  const auto b = cv::inspect_vae_file(sd::SafeTensorsFile::open(dir + "/old.safetensors")).config;
  EXPECT_EQ(a.at("mid_block_add_attention"), true);
  EXPECT_EQ(b, a);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

}  // namespace
