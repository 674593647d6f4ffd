// LoRA through load_pipeline: a live scale change on a running stream (DiffusionModels::set_lora_scale, the control
// channel's `lora NAME SCALE`) gives what a fresh stream fused at that scale gives; the shared models' text-encoder
// change is noticed by every stream; load options and errors.
#include <filesystem>

#include <gtest/gtest.h>

#include "common/fixtures.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/image.h"
#include "pipeline/stream_diffusion.h"

namespace sd {
namespace {

using torch::Tensor;

const char* kStyle = "lora/files/sd15_kohya_unet_te.safetensors";  // UNet + text encoder
const char* kLcm = "lora/files/sd15_kohya_lcm.safetensors";         // UNet only

std::shared_ptr<const DiffusionModels> load(std::vector<LoraSpec> loras, bool live = true,
                                            c10::ScalarType dtype = c10::kFloat) {
  LoadOptions o;
  o.threads = -1;
  o.dtype = dtype;
  o.taesd = test::fixture_path("models/tiny-sd15/taesd");
  o.loras = std::move(loras);
  o.lora_live = live;
  return load_pipeline(test::fixture_path("models/tiny-sd15"), o);
}

LoraSpec spec(const char* rel, double scale) { return {test::fixture_path(rel), scale, ""}; }

Tensor frame(int k) {
  // Deterministic 64x64 frames in [-1, 1].
  auto g = torch::arange(3 * 64 * 64, torch::kFloat).reshape({1, 3, 64, 64});
  return torch::sin(g * (0.001 * (k + 1)) + k).mul(0.9);
}

StreamConfig config(std::vector<int64_t> t, CfgType cfg) {
  StreamConfig c;
  c.t_index_list = std::move(t);
  c.cfg_type = cfg;
  c.width = c.height = 64;
  c.guidance_scale = 1.2;
  c.delta = 0.8;
  return c;
}

class LoraPipeline : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::fixture_exists("models/tiny-sd15") || !test::fixture_exists(kStyle) || !test::fixture_exists(kLcm))
      GTEST_SKIP() << "tiny-sd15 / LoRA fixtures absent";
  }
};

TEST_F(LoraPipeline, LoadReportsNamesScalesAndDescribe) {
  auto m = load({spec(kLcm, 1.0), spec(kStyle, 0.7)});
  const auto l = m->loras();
  ASSERT_EQ(l.size(), 2u);
  EXPECT_EQ(l[0].name, "sd15_kohya_lcm");
  EXPECT_EQ(l[0].scale, 1.0);
  EXPECT_EQ(l[0].layout, "kohya");
  EXPECT_EQ(l[0].module_count("unet"), 79u);
  EXPECT_EQ(l[1].name, "sd15_kohya_unet_te");
  EXPECT_EQ(l[1].scale, 0.7);
  EXPECT_EQ(l[1].module_count("text_encoder"), 12u);
  EXPECT_NE(m->describe().find(", LoRA sd15_kohya_lcm + sd15_kohya_unet_te, fp32, cpu)"), std::string::npos)
      << m->describe();
  m->set_lora_scale("sd15_kohya_lcm", 0.5);
  EXPECT_EQ(m->loras()[0].scale, 0.5);
  EXPECT_THROW(m->set_lora_scale("other", 0.5), InvalidArgument);
  // Without LoRAs: the interface's default refuses with a hint.
  auto plain = load({});
  EXPECT_TRUE(plain->loras().empty());
  try {
    plain->set_lora_scale("x", 1.0);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--lora"), std::string::npos) << e.what();
  }
  // One-shot loads keep no base weights.
  auto once = load({spec(kStyle, 1.0)}, /*live=*/false);
  EXPECT_THROW(once->set_lora_scale("sd15_kohya_unet_te", 0.5), InvalidArgument);
}

// One step, no guidance: the output depends only on the frame, the fixed noise and the weights, so after the live
// change every frame equals the fresh stream's - bit for bit, prompt embeddings included.
TEST_F(LoraPipeline, LiveScaleChangeEqualsFreshStreamOneStep) {
  auto live = load({spec(kStyle, 1.0)});
  auto fresh = load({spec(kStyle, 0.7)});
  StreamDiffusion a(live, config({45}, CfgType::None));
  StreamDiffusion b(fresh, config({45}, CfgType::None));
  a.prepare("a photo of a cat");
  b.prepare("a photo of a cat");
  const Tensor emb_before = a.cond_embeds().clone();
  const Tensor out0 = a.img2img(frame(0));
  EXPECT_FALSE(torch::equal(out0, b.img2img(frame(0)))) << "scale 1 and 0.7 must differ";
  live->set_lora_scale("sd15_kohya_unet_te", 0.7);
  for (int k = 1; k < 4; ++k) {
    const Tensor oa = a.img2img(frame(k)), ob = b.img2img(frame(k));
    EXPECT_TRUE(torch::equal(oa, ob)) << "frame " << k << " max diff " << (oa - ob).abs().max().item<double>();
  }
  EXPECT_FALSE(torch::equal(a.cond_embeds(), emb_before)) << "the text-encoder LoRA changed: prompts re-encoded";
  EXPECT_TRUE(torch::equal(a.cond_embeds(), b.cond_embeds()));
  EXPECT_EQ(a.stats().text_encodes, 2) << "encoded at prepare and once after the change";
}

// Several steps with RCFG self: the stream batch carries latents made with the old weights, so the equality holds
// from a re-prepare on (the same caches and noise as a fresh stream), for every later call; txt2img too.
TEST_F(LoraPipeline, LiveScaleChangeThenPrepareEqualsFreshStream) {
  for (const bool txt2img : {false, true}) {
    SCOPED_TRACE(txt2img ? "txt2img" : "img2img");
    auto live = load({spec(kLcm, 1.0), spec(kStyle, 0.2)});
    auto fresh = load({spec(kLcm, 0.6), spec(kStyle, 0.9)});
    const auto cfg = txt2img ? config({0, 16, 32, 45}, CfgType::None) : config({32, 45}, CfgType::Self);
    StreamDiffusion a(live, cfg), b(fresh, cfg);
    a.prepare("a cat", "blurry");
    for (int k = 0; k < 2; ++k) txt2img ? a.txt2img() : a.img2img(frame(k));
    live->set_lora_scale("sd15_kohya_lcm", 0.6);
    live->set_lora_scale("sd15_kohya_unet_te", 0.9);
    a.prepare("a cat", "blurry");
    b.prepare("a cat", "blurry");
    for (int k = 0; k < 4; ++k) {
      const Tensor oa = txt2img ? a.txt2img() : a.img2img(frame(k));
      const Tensor ob = txt2img ? b.txt2img() : b.img2img(frame(k));
      EXPECT_TRUE(torch::equal(oa, ob)) << "call " << k << " max diff " << (oa - ob).abs().max().item<double>();
    }
  }
}

// The models are shared: a change made for one stream reaches every stream on them (prompts re-encoded on each
// stream's next call), and a UNet-only LoRA does not make anyone re-encode.
TEST_F(LoraPipeline, SharedModelsEveryStreamSeesTheChange) {
  auto live = load({spec(kLcm, 1.0), spec(kStyle, 1.0)});
  StreamDiffusion a(live, config({45}, CfgType::None)), b(live, config({45}, CfgType::None));
  a.prepare("a cat");
  b.prepare("a dog");
  a.img2img(frame(0));
  b.img2img(frame(0));
  live->set_lora_scale("sd15_kohya_lcm", 0.5);
  a.img2img(frame(1));
  EXPECT_EQ(a.stats().text_encodes, 1) << "UNet-only change: embeddings still valid";
  live->set_lora_scale("sd15_kohya_unet_te", 0.5);
  a.img2img(frame(2));
  b.img2img(frame(2));
  EXPECT_EQ(a.stats().text_encodes, 2);
  EXPECT_EQ(b.stats().text_encodes, 2);
  EXPECT_TRUE(torch::equal(b.cond_embeds(), live->encode_prompt("a dog")));
}

// bf16: the live change is bit-identical to a fresh bf16 load too (both fuse in float32 from the same bf16 base).
TEST_F(LoraPipeline, Bf16LiveScaleChangeEqualsFreshStream) {
  auto live = load({spec(kStyle, 1.0)}, true, c10::kBFloat16);
  auto fresh = load({spec(kStyle, 0.7)}, true, c10::kBFloat16);
  StreamDiffusion a(live, config({45}, CfgType::None)), b(fresh, config({45}, CfgType::None));
  a.prepare("a cat");
  b.prepare("a cat");
  a.img2img(frame(0));
  live->set_lora_scale("sd15_kohya_unet_te", 0.7);
  const Tensor oa = a.img2img(frame(1)), ob = b.img2img(frame(1));
  EXPECT_TRUE(torch::equal(oa, ob)) << (oa.to(torch::kFloat) - ob.to(torch::kFloat)).abs().max().item<double>();
}

// A refused live scale leaves the frames as they were. Here the LoRA's first module fuses at the new scale and its
// second overflows, so the first is fused back: new tensors with the old values, which moves weights_version() (a CUDA
// graph recorded on the old tensors must be recorded again).
TEST_F(LoraPipeline, RefusedScaleKeepsTheFrames) {
  const std::string dir = test::make_temp_dir("lora_refused");
  const std::string f = dir + "/two.safetensors";
  const std::string a_key = "lora_unet_down_blocks_0_attentions_0_proj_in.",
                    b_key = "lora_unet_up_blocks_1_attentions_0_proj_out.";
  save_safetensors(f, std::vector<std::pair<std::string, Tensor>>{
                          {a_key + "lora_down.weight", torch::full({4, 32, 1, 1}, 0.01f)},
                          {a_key + "lora_up.weight", torch::full({32, 4, 1, 1}, 0.01f)},
                          {b_key + "lora_down.weight", torch::ones({4, 32, 1, 1})},
                          {b_key + "lora_up.weight", torch::full({32, 4, 1, 1}, 1e30f)}});
  auto live = load({{f, 0.0, "two"}});
  auto base = load({});
  StreamDiffusion a(live, config({45}, CfgType::None)), b(base, config({45}, CfgType::None));
  a.prepare("a cat");
  b.prepare("a cat");
  a.img2img(frame(0));
  b.img2img(frame(0));
  const uint64_t v = live->weights_version();
  try {
    live->set_lora_scale("two", 1e10);  // proj_in: 4e-4 * 1e10 is finite; proj_out: 4e30 * 1e10 is not
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(std::string(e.what()), "LoRA 'two': scale 1e+10 refused (it stays 0, no weight changed): " + f +
                                         ": its LoRA weight difference on unet up_blocks.1.attentions.0.proj_out "
                                         "overflows float32 at that scale");
  }
  EXPECT_NE(live->weights_version(), v);
  EXPECT_EQ(live->loras()[0].scale, 0.0);
  const Tensor oa = a.img2img(frame(1)), ob = b.img2img(frame(1));
  EXPECT_TRUE(torch::equal(oa, ob)) << (oa - ob).abs().max().item<double>();
  std::filesystem::remove_all(dir);
}

TEST_F(LoraPipeline, LoadErrors) {
  // An SD 2.x LoRA on SD 1.5: the error names the key and both shapes.
  try {
    load({spec("lora/files/sd21_kohya.safetensors", 1.0)});
    FAIL() << "expected FormatError";
  } catch (const FormatError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("sd21_kohya.safetensors"), std::string::npos) << msg;
    EXPECT_NE(msg.find("proj_in.lora_down.weight [4, 32]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[32, 32, 1, 1]"), std::string::npos) << msg;
  }
  // Two LoRAs with the same stem get distinct names.
  auto m = load({spec(kLcm, 1.0), spec(kLcm, 0.5)});
  ASSERT_EQ(m->loras().size(), 2u);
  EXPECT_EQ(m->loras()[1].name, "sd15_kohya_lcm_2");
}

}  // namespace
}  // namespace sd
