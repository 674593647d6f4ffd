// Model folders and VAE files as they are published, not as diffusers 0.24's save_pretrained writes them: VAEs saved
// before diffusers ~0.14 (mid-block attention named query / key / value / proj_attn: the SD 1.x / 2.x vae/ folders,
// sd-vae-ft-mse) and component folders downloaded with only a variant's weights (diffusion_pytorch_model.fp16.
// safetensors). Each loads as the model it was made from, bit for bit; what cannot be told apart is refused by name.
#include <cstring>
#include <filesystem>

#include <gtest/gtest.h>

#include "common/error_of.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/rng.h"
#include "pipeline/stream_diffusion.h"
#include "stream_outputs.h"

namespace sd {
namespace {

namespace fs = std::filesystem;
using test::load_models;
using test::stream_outputs;

constexpr const char* kModel = "models/tiny-sd15";

// A diffusers 0.24 AutoencoderKL key under the names diffusers wrote before ~0.14 (what
// ModelMixin._convert_deprecated_attention_blocks renames at load).
std::string deprecated_attention_name(const std::string& key) {
  static const std::pair<const char*, const char*> kOld[] = {
      {".to_q.", ".query."}, {".to_k.", ".key."}, {".to_v.", ".value."}, {".to_out.0.", ".proj_attn."}};
  if (key.find(".mid_block.attentions.") == std::string::npos) return key;
  for (const auto& [now, old] : kOld)
    if (const size_t p = key.find(now); p != std::string::npos)
      return key.substr(0, p) + old + key.substr(p + std::strlen(now));
  return key;
}

class PublishedLayouts : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::fixture_exists(kModel)) GTEST_SKIP() << "fixture absent";
    tmp_ = test::make_temp_dir("sd-published");
  }
  void TearDown() override {
    std::error_code ec;
    if (!tmp_.empty()) fs::remove_all(tmp_, ec);
  }
  // A writable copy of the fixture model.
  std::string copy_model(const std::string& name) const {
    const std::string m = tmp_ + "/" + name;
    fs::copy(test::fixture_path(kModel), m, fs::copy_options::recursive);
    return m;
  }
  std::string tmp_;
};

// One latent decoded and one image encoded (with the same posterior draw): both mid-block attentions run.
struct VaeOutputs {
  torch::Tensor decoded, encoded;
};
VaeOutputs vae_outputs(const DiffusionModels& m) {
  const auto z = torch::linspace(-1, 1, 4 * 8 * 8).view({1, 4, 8, 8});
  const auto img = torch::linspace(-1, 1, 3 * 64 * 64).view({1, 3, 64, 64});
  TorchRng rng(3);
  return {m.decode_latent(z), m.encode_image(img, rng)};
}

// diffusers' AutoencoderKL weights under the names diffusers wrote before ~0.14, in `dir`/vae/ and as a --vae file.
class DeprecatedVaeNames : public PublishedLayouts {
 protected:
  void SetUp() override {
    PublishedLayouts::SetUp();
    if (IsSkipped()) return;
    model_ = copy_model("old-vae");
    const std::string weights = model_ + "/vae/diffusion_pytorch_model.safetensors";
    std::map<std::string, torch::Tensor> old;
    int renamed = 0;
    {
      const auto f = SafeTensorsFile::open(weights);
      for (const auto& k : f.keys()) {
        const std::string o = deprecated_attention_name(k);
        renamed += o != k;
        old[o] = f.get(k).clone();
      }
    }
    ASSERT_EQ(renamed, 16);  // {encoder, decoder} x {q, k, v, out} x {weight, bias}
    ASSERT_TRUE(old.count("decoder.mid_block.attentions.0.proj_attn.weight"));
    save_safetensors(weights, old);
    file_ = tmp_ + "/old-vae.safetensors";
    save_safetensors(file_, old);
    LoadOptions none;
    none.taesd = "none";
    ref_ = vae_outputs(*load_models(test::fixture_path(kModel), none));
  }
  std::string model_, file_;
  VaeOutputs ref_;
};

// The 16 mid-block attention tensors under their old names load as the new ones: the same decoder and encoder, bit
// for bit.
TEST_F(DeprecatedVaeNames, FolderLoadsAsTheOriginal) {
  LoadOptions none;
  none.taesd = "none";
  const auto folder = vae_outputs(*load_models(model_, none));
  EXPECT_TRUE(torch::equal(folder.decoded, ref_.decoded));
  EXPECT_TRUE(torch::equal(folder.encoded, ref_.encoded));
}

// As a --vae file the architecture is inferred from the names: the old ones must tell that there is mid attention
// (without it the file built another model and then refused its own attention weights).
TEST_F(DeprecatedVaeNames, VaeFileLoadsAsTheOriginal) {
  LoadOptions v;
  v.vae = file_;
  const auto f = vae_outputs(*load_models(test::fixture_path(kModel), v));
  EXPECT_TRUE(torch::equal(f.decoded, ref_.decoded));
  EXPECT_TRUE(torch::equal(f.encoded, ref_.encoded));
}

// The same layer under both names (a half-converted file) is ambiguous: diffusers would silently take the old one.
TEST_F(PublishedLayouts, VaeWithBothAttentionNamesForOneLayerIsRefused) {
  const std::string m = copy_model("both-vae");
  const std::string weights = m + "/vae/diffusion_pytorch_model.safetensors";
  std::map<std::string, torch::Tensor> both;
  {
    const auto f = SafeTensorsFile::open(weights);
    for (const auto& k : f.keys()) both[k] = f.get(k).clone();
  }
  both["encoder.mid_block.attentions.0.key.bias"] = both.at("encoder.mid_block.attentions.0.to_k.bias") + 1;
  save_safetensors(weights, both);
  const std::string file = tmp_ + "/both-vae.safetensors";
  save_safetensors(file, both);
  const std::string expected =
      ": encoder.mid_block.attentions.0.key.bias (the name diffusers used before 0.14) and "
      "encoder.mid_block.attentions.0.to_k.bias are the same layer: expected one of the two names, not both";
  LoadOptions none;
  none.taesd = "none";
  EXPECT_EQ(test::error_of<Error>([&] { load_models(m, none); }), weights + expected);
  LoadOptions v;
  v.vae = file;
  EXPECT_EQ(test::error_of<Error>([&] { load_models(test::fixture_path(kModel), v); }), file + expected);
}

// Downloading only the fp16 files of a hub model (allow_patterns="*.fp16.safetensors") leaves no plain weight file:
// the one variant there is the weights.
TEST_F(PublishedLayouts, FolderWithOnlyAVariantWeightFileLoadsIt) {
  const std::string m = copy_model("fp16-only");
  fs::rename(m + "/unet/diffusion_pytorch_model.safetensors", m + "/unet/diffusion_pytorch_model.fp16.safetensors");
  fs::rename(m + "/text_encoder/model.safetensors", m + "/text_encoder/model.fp16.safetensors");
  const auto a = stream_outputs(load_models(test::fixture_path(kModel), {}), 2);
  const auto b = stream_outputs(load_models(m, {}), 2);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_TRUE(torch::equal(a[i], b[i])) << "frame " << i << " max diff " << (a[i] - b[i]).abs().max().item<double>();
}

// Two variants and no plain file: which one was meant cannot be told; the error names both and how to choose.
TEST_F(PublishedLayouts, FolderWithSeveralVariantsAndNoPlainFileIsRefused) {
  const std::string m = copy_model("two-variants");
  const std::string unet = m + "/unet";
  fs::copy_file(unet + "/diffusion_pytorch_model.safetensors", unet + "/diffusion_pytorch_model.bf16.safetensors");
  fs::rename(unet + "/diffusion_pytorch_model.safetensors", unet + "/diffusion_pytorch_model.fp16.safetensors");
  EXPECT_EQ(test::error_of<Error>([&] { load_models(m, {}); }),
            unet + ": no plain .safetensors weight file and 2 variants (diffusion_pytorch_model.bf16.safetensors, "
                   "diffusion_pytorch_model.fp16.safetensors): which one to load cannot be told; keep only that one "
                   "in the folder (move the others out) or add the full weights as "
                   "diffusion_pytorch_model.safetensors");
}

}  // namespace
}  // namespace sd
