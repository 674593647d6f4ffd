// IP-Adapter in the stream (load_pipeline with LoadOptions::ip_adapter + StreamDiffusion::set_image_prompt), on
// tiny-sd15 with the fixture adapter (ipadapter/): at scale 0 the stream gives exactly what the stream without an
// IP-Adapter gives, at scale > 0 the image prompt changes the output; the image is encoded once, not per frame; the
// cond / uncond rows of the UNet context carry the image prompt's / the zero image's tokens; a live scale change
// and a new image prompt take effect from the next call; errors without an adapter. (The reference has no
// StreamDiffusion runs with IP-Adapter; the UNet itself is checked against diffusers in tests/models.)
#include <gtest/gtest.h>

#include <filesystem>

#include "common/fixtures.h"
#include "common/ip_adapter_plus.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "models/ip_adapter.h"
#include "models/unet_2d_condition.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/stream_diffusion.h"
#include "stream_outputs.h"

namespace sd {

// gtest prints the parameter with the test (ctest, --gtest_list_tests); an enum would show as its number. In sd, not
// the anonymous namespace, so that gtest finds it by argument-dependent lookup.
inline void PrintTo(CfgType t, std::ostream* os) { *os << cfg_type_name(t); }

namespace {

using torch::Tensor;

const std::string kAdapterDir = "ipadapter/models/tiny-ip-adapter-sd15";

std::shared_ptr<const DiffusionModels> load(bool with_ip, double scale = 1.0) {
  LoadOptions o;
  o.threads = -1;
  o.taesd = test::fixture_path("models/tiny-sd15/taesd");
  if (with_ip) o.ip_adapter = test::fixture_path(kAdapterDir);
  o.ip_adapter_scale = scale;
  return load_pipeline(test::fixture_path("models/tiny-sd15"), o);
}

Tensor frame(int k) {
  auto g = torch::arange(3 * 64 * 64, torch::kFloat).reshape({1, 3, 64, 64});
  return torch::sin(g * (0.001 * (k + 1)) + k).mul(0.9);
}

// The image prompts: the reference's uint8 frames (32x32, the encoder's size) and a larger one (resized + cropped).
Tensor image_prompt(int k) {
  return SafeTensorsFile::open(test::fixture_path("ipadapter/modules/image_encoder.safetensors")).get("image_u8")[k];
}

StreamConfig config(CfgType cfg) {
  StreamConfig c;
  c.t_index_list = {32, 45};
  c.cfg_type = cfg;
  c.width = c.height = 64;
  c.guidance_scale = 1.4;
  c.delta = 0.8;
  return c;
}

std::vector<Tensor> run(StreamDiffusion& s, int calls) {
  std::vector<Tensor> out;
  for (int i = 0; i < calls; ++i) out.push_back(s.img2img(frame(i)));
  return out;
}

using test::max_diff;

class IPAdapterStream : public ::testing::TestWithParam<CfgType> {
 protected:
  void SetUp() override {
    if (!test::fixture_exists("models/tiny-sd15") || !test::fixture_exists(kAdapterDir + "/image_encoder"))
      GTEST_SKIP() << "tiny-sd15 / ipadapter fixtures absent";
  }
};

TEST_P(IPAdapterStream, ScaleZeroIsThePlainStreamAndScaleChangesIt) {
  const CfgType cfg = GetParam();
  const auto plain_models = load(false);
  StreamDiffusion plain(plain_models, config(cfg));
  plain.prepare("a photo of a cat", "blurry");
  const auto ref = run(plain, 3);

  const auto ip_models = load(true, 0.0);
  ASSERT_NE(ip_models->ip_adapter(), nullptr);
  StreamDiffusion s(ip_models, config(cfg));
  s.set_image_prompt(image_prompt(0));  // before prepare
  s.prepare("a photo of a cat", "blurry");
  const auto at0 = run(s, 3);
  for (size_t i = 0; i < ref.size(); ++i)
    EXPECT_TRUE(torch::equal(at0[i], ref[i])) << "call " << i << ": scale 0 differs by "
                                              << (at0[i] - ref[i]).abs().max().item<double>();

  ip_models->set_ip_adapter_scale(0.6);
  StreamDiffusion s2(ip_models, config(cfg));
  s2.prepare("a photo of a cat", "blurry");
  s2.set_image_prompt(image_prompt(0));  // after prepare
  const auto at06 = run(s2, 3);
  const double d = max_diff(at06, ref);
  std::cout << "  [ip effect] " << cfg_type_name(cfg) << " scale 0.6 vs plain: max abs " << d << "\n";
  EXPECT_GT(d, 1e-3);
  // One image, one encoder call, however many frames.
  EXPECT_EQ(s.stats().image_prompt_encodes, 1);
  EXPECT_EQ(s2.stats().image_prompt_encodes, 1);
  EXPECT_EQ(s2.stats().processed, 3);
}

TEST_P(IPAdapterStream, ContextRowsCarryImageAndZeroImageTokens) {
  const CfgType cfg = GetParam();
  const auto models = load(true, 0.6);
  const IPAdapterModels* ip = models->ip_adapter();
  StreamDiffusion s(models, config(cfg));
  s.prepare("a photo of a cat", "blurry");
  torch::NoGradGuard ng;
  const Tensor zero_tokens = ip->image_tokens(ip->image_embeds(Tensor()));
  // No image yet: every row has the unconditional image's tokens.
  EXPECT_FALSE(s.has_image_prompt());
  EXPECT_EQ(s.prompt_embeds().size(1), 77 + 4);
  EXPECT_TRUE(torch::equal(s.prompt_embeds().slice(1, 77), zero_tokens.expand({s.prompt_embeds().size(0), 4, 32})));
  s.set_image_prompt(image_prompt(1));
  const Tensor img_tokens = ip->image_tokens(ip->image_embeds(image_prompt(1)));
  const Tensor pe = s.prompt_embeds();
  const int64_t u = s.uncond_rows();
  EXPECT_EQ(u, cfg == CfgType::Full ? s.batch_size() : cfg == CfgType::Initialize ? 1 : 0);
  for (int64_t r = 0; r < pe.size(0); ++r) {
    EXPECT_TRUE(torch::equal(pe[r].slice(0, 77), (r < u ? zero_tokens : img_tokens)[0])) << "row " << r;
    EXPECT_TRUE(torch::equal(pe[r].slice(0, 0, 77), (r < u ? s.uncond_embeds() : s.cond_embeds())[0])) << "row " << r;
  }
  EXPECT_TRUE(torch::equal(s.cond_image_tokens(), img_tokens));
  EXPECT_TRUE(torch::equal(s.uncond_image_tokens(), zero_tokens));
  // A live prompt change keeps the image tokens; clearing goes back to the zero image.
  s.update_prompt("a dog", "blurry");
  EXPECT_TRUE(torch::equal(s.prompt_embeds()[pe.size(0) - 1].slice(0, 77), img_tokens[0]));
  s.clear_image_prompt();
  EXPECT_TRUE(torch::equal(s.prompt_embeds()[pe.size(0) - 1].slice(0, 77), zero_tokens[0]));
  EXPECT_EQ(s.stats().image_prompt_encodes, 1);
}

INSTANTIATE_TEST_SUITE_P(Cfg, IPAdapterStream,
                         ::testing::Values(CfgType::None, CfgType::Self, CfgType::Full, CfgType::Initialize),
                         [](const auto& info) { return cfg_type_name(info.param); });

// IP-Adapter Plus (a made-up file, common/ip_adapter_plus.h): 16 tokens of the image's penultimate hidden states in
// every row, the zero image's in the uncond rows; scale 0 is the plain stream bit for bit, scale 0.6 changes it.
TEST_P(IPAdapterStream, PlusAdapterRowsAndScaleZero) {
  const CfgType cfg = GetParam();
  const std::string dir = test::make_temp_dir("ip_plus_stream");
  {
    auto unet = load_unet(test::fixture_path("models/tiny-sd15/unet"));
    save_safetensors(dir + "/ip-adapter-plus_sd15.safetensors", test::plus_tensors(*unet));
  }
  std::filesystem::copy(test::fixture_path(kAdapterDir + "/image_encoder"), dir + "/image_encoder",
                        std::filesystem::copy_options::recursive);
  LoadOptions o;
  o.threads = -1;
  o.taesd = test::fixture_path("models/tiny-sd15/taesd");
  o.ip_adapter = dir;
  o.ip_adapter_scale = 0.0;
  const auto models = load_pipeline(test::fixture_path("models/tiny-sd15"), o);
  const IPAdapterModels* ip = models->ip_adapter();
  ASSERT_TRUE(ip && ip->adapter->plus());
  StreamDiffusion s(models, config(cfg));
  s.prepare("a photo of a cat", "blurry");
  s.set_image_prompt(image_prompt(1));
  const int64_t q = test::kPlusQ;
  ASSERT_EQ(s.prompt_embeds().size(1), 77 + q);
  const Tensor img = ip->image_tokens(ip->image_embeds(image_prompt(1)));
  const Tensor zero = ip->image_tokens(ip->image_embeds(Tensor()));
  const Tensor pe = s.prompt_embeds();
  for (int64_t r = 0; r < pe.size(0); ++r)
    EXPECT_TRUE(torch::equal(pe[r].slice(0, 77), (r < s.uncond_rows() ? zero : img)[0])) << "row " << r;
  const auto at0 = run(s, 3);
  const auto plain_models = load(false);
  StreamDiffusion plain(plain_models, config(cfg));
  plain.prepare("a photo of a cat", "blurry");
  const auto ref = run(plain, 3);
  EXPECT_EQ(max_diff(at0, ref), 0.0) << "scale 0 is the plain stream";
  models->set_ip_adapter_scale(0.6);
  StreamDiffusion s2(models, config(cfg));
  s2.prepare("a photo of a cat", "blurry");
  s2.set_image_prompt(image_prompt(1));
  EXPECT_GT(max_diff(run(s2, 3), ref), 1e-3);
  std::filesystem::remove_all(dir);
}

class IPAdapterStreamLive : public IPAdapterStream {};

// A new image prompt or scale takes effect from the next call (the latents in flight keep the conditioning they
// were denoised with), and a new image is encoded exactly once.
TEST_F(IPAdapterStreamLive, ScaleAndImageChangesTakeEffectFromTheNextCall) {
  const auto models = load(true, 0.6);
  StreamDiffusion a(models, config(CfgType::Self)), b(models, config(CfgType::Self));
  a.set_image_prompt(image_prompt(0));
  b.set_image_prompt(image_prompt(0));
  a.prepare("a photo of a cat");
  b.prepare("a photo of a cat");
  // Streams on one model set share the scale: run a and b in lockstep, changing b's image only.
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(torch::equal(a.img2img(frame(i)), b.img2img(frame(i))));
  b.set_image_prompt(image_prompt(1));
  EXPECT_FALSE(torch::equal(a.img2img(frame(2)), b.img2img(frame(2))));
  EXPECT_EQ(b.stats().image_prompt_encodes, 2);
  EXPECT_EQ(a.stats().image_prompt_encodes, 1);
  // The scale: the same stream state run at two scales gives different outputs from the call after the change.
  // A change moves weights_version() (the attention reads the scale on the host, so CUDA graphs recorded at the old
  // scale are dropped); setting the same scale again does not.
  const uint64_t v0 = models->weights_version();
  models->set_ip_adapter_scale(0.0);
  const uint64_t v1 = models->weights_version();
  EXPECT_NE(v1, v0);
  const Tensor off = a.txt2img_one_shot();
  models->set_ip_adapter_scale(0.0);
  EXPECT_EQ(models->weights_version(), v1);
  models->set_ip_adapter_scale(1.0);
  EXPECT_NE(models->weights_version(), v1);
  const Tensor on = a.txt2img_one_shot();
  EXPECT_GT((on - off).abs().max().item<double>(), 1e-3);
}

TEST_F(IPAdapterStreamLive, ErrorsWithoutAnAdapterOrWithABadImage) {
  const auto plain = load(false);
  EXPECT_EQ(plain->ip_adapter(), nullptr);
  StreamDiffusion s(plain, config(CfgType::None));
  try {
    s.set_image_prompt(image_prompt(0));
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--ip-adapter"), std::string::npos) << e.what();
  }
  EXPECT_THROW(plain->set_ip_adapter_scale(0.5), InvalidArgument);
  const auto models = load(true);
  EXPECT_NE(models->describe().find("IP-Adapter ip-adapter_tiny-ip-adapter-sd15.safetensors"), std::string::npos)
      << models->describe();
  StreamDiffusion t(models, config(CfgType::None));
  EXPECT_THROW(t.set_image_prompt(torch::zeros({32, 32, 3}, torch::kFloat)), InvalidArgument);
  EXPECT_THROW(t.set_image_prompt(torch::zeros({1, 32, 32, 3}, torch::kUInt8)), InvalidArgument);
  EXPECT_THROW(models->set_ip_adapter_scale(std::nan("")), InvalidArgument);
  // A larger, non-square image goes through the resize + centre crop.
  t.set_image_prompt(torch::randint(0, 256, {48, 80, 3}, torch::kLong).to(torch::kUInt8));
  EXPECT_TRUE(t.has_image_prompt());
}

}  // namespace
}  // namespace sd
