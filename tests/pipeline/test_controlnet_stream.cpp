// ControlNets in the stream on the fixture's tiny-sd15 + tiny-controlnet-sd15: two ControlNets at scales (a, b) give
// the UNet the sum of their residuals, scale 0 equals no ControlNet bit for bit, --controlnet-every reuses the
// residuals, a control image of another size is resized, control_guidance_start / _end condition the rows of the steps
// in range only, the single-file (original layout) ControlNet equals the diffusers folder, and a ControlNet of another
// family is refused with both families named.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>

#include <nlohmann/json.hpp>

#include <gtest/gtest.h>

#include "common/error_of.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/ldm_checkpoint.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/layers.h"
#include "models/controlnet.h"
#include "pipeline/controlnet.h"
#include "pipeline/stream_diffusion.h"

namespace sd {
namespace {

using torch::Tensor;
const std::string kCn = "controlnet/models/tiny-controlnet-sd15";

#define SD_REQUIRE_CN() \
  if (!test::fixture_exists(kCn + "/config.json")) GTEST_SKIP() << "no ControlNet fixtures"

std::shared_ptr<const DiffusionModels> tiny_sd15() {
  static auto m = [] {
    LoadOptions o;
    o.threads = -1;
    o.taesd = test::fixture_path("models/tiny-sd15/taesd");
    return load_pipeline(test::fixture_path("models/tiny-sd15"), o);
  }();
  return m;
}

// The fixture model's text width, and the SD family (width, name) a ControlNet must have to be of another family
// than it: derived from the fixture, so the broken value differs whatever the fixture has.
int64_t model_cross_attention_dim() {
  const auto v = read_json_file(test::fixture_path("models/tiny-sd15/unet/config.json")).at("cross_attention_dim");
  return v.is_array() ? v.at(0).get<int64_t>() : v.get<int64_t>();
}
std::pair<int64_t, std::string> another_family(int64_t cross) {
  return cross == 1024 ? std::make_pair(int64_t{768}, std::string("SD 1.x")) : std::make_pair(int64_t{1024}, std::string("SD 2.x"));
}

StreamConfig cfg() {
  StreamConfig c;
  c.width = c.height = 64;
  c.cfg_type = CfgType::Self;
  return c;
}

Tensor control(int which) {
  const auto f = SafeTensorsFile::open(test::fixture_path("controlnet/control_images.safetensors"));
  return f.get("control" + std::to_string(which));
}

Tensor frame() { return torch::linspace(-1, 1, 3 * 64 * 64).reshape({3, 64, 64}); }

// Runs 3 img2img calls and returns the outputs concatenated; `setup` configures the stream after prepare.
Tensor run(const std::function<void(StreamDiffusion&)>& setup, std::map<std::string, Tensor>* traced = nullptr) {
  StreamDiffusion s(tiny_sd15(), cfg());
  // The first call's tensors (later calls' latents differ between runs).
  if (traced) s.set_trace([&](const std::string& n, const Tensor& t) { traced->emplace(n, t.clone()); });
  s.prepare("a cat", "blurry");
  setup(s);
  std::vector<Tensor> outs;
  for (int i = 0; i < 3; ++i) outs.push_back(s.img2img(frame()));
  return torch::cat(outs);
}

TEST(ControlNetStream, ScaleZeroEqualsNoControlNetBitForBit) {
  SD_REQUIRE_CN();
  const auto cn = ControlNet::load(test::fixture_path(kCn), *tiny_sd15());
  const Tensor plain = run([](StreamDiffusion&) {});
  const Tensor zero = run([&](StreamDiffusion& s) {
    s.set_controlnets({{cn, 0.0}});
    s.set_control_image(0, control(0));
  });
  EXPECT_TRUE(torch::equal(plain, zero));
  const Tensor one = run([&](StreamDiffusion& s) {
    s.set_controlnets({{cn, 1.0}});
    s.set_control_image(0, control(0));
  });
  EXPECT_GT((one - plain).abs().max().item<double>(), 1e-3);
  // So a stream whose ControlNets are all at scale 0 may share UNet calls with others (pipeline/multi_stream.h);
  // one at a non-zero scale may not.
  StreamDiffusion s(tiny_sd15(), cfg());
  s.prepare("a cat");
  s.set_controlnets({{cn, 0.0}, {cn, 0.0}});
  EXPECT_EQ(s.batch_blocker(), "");
  s.set_controlnet_scale(1, 0.5);
  EXPECT_EQ(s.batch_blocker(), "ControlNets run on the stream's own UNet batch");
  // Nor does one whose guidance range keeps none of the steps (t_index_list of two: 0.9..1 keeps neither).
  s.set_controlnet_guidance(1, 0.9, 1.0);
  EXPECT_EQ(s.batch_blocker(), "");
  s.set_controlnet_guidance(1, 0.5, 1.0);
  EXPECT_EQ(s.batch_blocker(), "ControlNets run on the stream's own UNet batch");
}

// With an IP-Adapter the context ends with its image tokens, which only the UNet reads: the ControlNet gets the text
// alone, as diffusers' ControlNet pipelines give it. At IP scale 0 the UNet ignores the tokens exactly, so the frames
// equal the same stream without an adapter only if the ControlNet's residuals do.
TEST(ControlNetStream, WithAnIPAdapterTheControlNetSeesTheTextAlone) {
  SD_REQUIRE_CN();
  const std::string adapter = "ipadapter/models/tiny-ip-adapter-sd15";
  if (!test::fixture_exists(adapter + "/image_encoder")) GTEST_SKIP() << "no IP-Adapter fixture";
  LoadOptions o;
  o.threads = -1;
  o.taesd = test::fixture_path("models/tiny-sd15/taesd");
  o.ip_adapter = test::fixture_path(adapter);
  o.ip_adapter_scale = 0.0;
  const auto ip_models = load_pipeline(test::fixture_path("models/tiny-sd15"), o);
  const auto cn = ControlNet::load(test::fixture_path(kCn), *tiny_sd15());
  const Tensor plain = run([&](StreamDiffusion& s) {
    s.set_controlnets({{cn, 1.0}});
    s.set_control_image(0, control(0));
  });
  StreamDiffusion s(ip_models, cfg());
  s.prepare("a cat", "blurry");
  s.set_controlnets({{ControlNet::load(test::fixture_path(kCn), *ip_models), 1.0}});
  s.set_control_image(0, control(0));
  s.set_image_prompt(torch::full({32, 32, 3}, 200, torch::kUInt8));
  ASSERT_GT(s.prompt_embeds().size(1), 77);
  std::vector<Tensor> outs;
  for (int i = 0; i < 3; ++i) outs.push_back(s.img2img(frame()));
  const Tensor with_ip = torch::cat(outs);
  EXPECT_TRUE(torch::equal(with_ip, plain)) << (with_ip - plain).abs().max().item<double>();
}

TEST(ControlNetStream, TwoControlNetsGiveTheSumOfTheirResiduals) {
  SD_REQUIRE_CN();
  const auto cn = ControlNet::load(test::fixture_path(kCn), *tiny_sd15());
  std::map<std::string, Tensor> a, b, ab;
  run([&](StreamDiffusion& s) { s.set_controlnets({{cn, 0.7}}); s.set_control_image(0, control(0)); }, &a);
  run([&](StreamDiffusion& s) { s.set_controlnets({{cn, 0.4}}); s.set_control_image(0, control(1)); }, &b);
  run([&](StreamDiffusion& s) {
    s.set_controlnets({{cn, 0.7}, {cn, 0.4}});
    s.set_control_image(0, control(0));
    s.set_control_image(1, control(1));
  }, &ab);
  // The first call's residuals (same inputs in all three runs).
  for (const std::string k : {"unet0.controlnet_down0", "unet0.controlnet_down3", "unet0.controlnet_mid"}) {
    ASSERT_TRUE(a.count(k) && b.count(k) && ab.count(k)) << k;
    SD_EXPECT_CLOSE(ab[k], a[k] + b[k], 1e-5, 1e-6, k);
  }
}

TEST(ControlNetStream, EveryNReusesTheResidualsAndCountsIt) {
  SD_REQUIRE_CN();
  const auto cn = ControlNet::load(test::fixture_path(kCn), *tiny_sd15());
  StreamDiffusion s(tiny_sd15(), cfg());
  s.prepare("a cat", "blurry");
  s.set_controlnets({{cn, 1.0}});
  s.set_control_image(0, control(0));
  s.set_controlnet_every(2);
  for (int i = 0; i < 4; ++i) s.img2img(frame());
  EXPECT_EQ(s.stats().controlnet_calls, 2);
  EXPECT_EQ(s.stats().controlnet_reused, 2);
  EXPECT_THROW(s.set_controlnet_every(0), InvalidArgument);
}

// control_guidance_start / _end: step i of n keeps the ControlNet unless i / n < start or (i + 1) / n > end, as
// diffusers' pipelines compute controlnet_keep: [1.0 - float(i / n < s or (i + 1) / n > e) for i in range(n)].
TEST(ControlNetGuidance, KeepsIsDiffusersControlnetKeep) {
  struct Case {
    double start, end;
    std::vector<int> want;  // per step of n = want.size()
  };
  for (const Case& c : {Case{0.0, 1.0, {1, 1, 1, 1}}, Case{0.25, 0.75, {0, 1, 1, 0}}, Case{0.0, 0.5, {1, 0}},
                        Case{0.5, 1.0, {0, 1}}, Case{0.1, 0.9, {0, 1, 0}}, Case{0.0, 0.3, {0, 0, 0}},
                        Case{0.0, 0.6, {1, 1, 1, 0, 0}}}) {
    ControlNetUnit u;
    u.guidance_start = c.start;
    u.guidance_end = c.end;
    const int64_t n = static_cast<int64_t>(c.want.size());
    for (int64_t i = 0; i < n; ++i)
      EXPECT_EQ(u.keeps(i, n), c.want[i] == 1) << "start " << c.start << " end " << c.end << " step " << i << "/" << n;
  }
}

// In the stream batch every UNet row is at its own step (cfg self: one row per step; cfg full: the uncond rows
// repeat the steps; cfg initialize: one uncond row of the first step before them), so a range gives the rows of its
// steps the full-range residuals and the others zeros; set live or with the list, the same. A range no step keeps is
// no ControlNet at all.
TEST(ControlNetGuidance, RowsOfTheStepsInRangeGetTheResidualsTheOthersNone) {
  SD_REQUIRE_CN();
  const auto cn = ControlNet::load(test::fixture_path(kCn), *tiny_sd15());
  for (const CfgType cfg_type : {CfgType::Self, CfgType::Full, CfgType::Initialize}) {
    const auto run_with = [&](double start, double end, bool live, std::map<std::string, Tensor>* traced) {
      StreamConfig c = cfg();
      c.cfg_type = cfg_type;
      c.guidance_scale = 1.4;
      StreamDiffusion s(tiny_sd15(), c);
      s.set_trace([&](const std::string& n, const Tensor& t) { traced->emplace(n, t.clone()); });
      s.prepare("a cat", "blurry");
      ControlNetUnit u{cn, 0.8};
      if (!live) {
        u.guidance_start = start;
        u.guidance_end = end;
      }
      s.set_controlnets({u});
      if (live) s.set_controlnet_guidance(0, start, end);
      s.set_control_image(0, control(0));
      std::vector<Tensor> outs;
      for (int i = 0; i < 3; ++i) outs.push_back(s.img2img(frame()));
      return std::make_pair(torch::cat(outs), s.stats().controlnet_calls);
    };
    std::map<std::string, Tensor> full, first, second, none;
    run_with(0.0, 1.0, false, &full);
    run_with(0.0, 0.5, false, &first);
    run_with(0.5, 1.0, true, &second);
    const std::string name = cfg_type_name(cfg_type);
    const int64_t steps = 2, rows = cfg_type == CfgType::Full ? 2 * steps : cfg_type == CfgType::Initialize ? 3 : steps;
    for (const std::string k : {"unet0.controlnet_down0", "unet0.controlnet_down3", "unet0.controlnet_mid"}) {
      ASSERT_TRUE(full.count(k) && first.count(k) && second.count(k)) << name << " " << k;
      ASSERT_EQ(full[k].size(0), rows) << name << " " << k;
      for (int64_t r = 0; r < rows; ++r) {
        // rows [s0, s1] (self), [s0, s1, s0, s1] (full) or [s0, s0, s1] (initialize)
        const bool step0 = cfg_type == CfgType::Initialize ? r < 2 : r % steps == 0;
        EXPECT_GT(full[k][r].abs().max().item<double>(), 0.0) << name << " " << k << " row " << r;
        // A row out of range is exactly zero. One in range equals the full range's row to float rounding: the
        // ControlNet runs on the kept rows alone, and a matrix product of fewer rows may sum in another
        // order (measured: at most 2e-6 on values up to 5.8 in the mid block, 0 elsewhere; bound 1e-5 of the row's
        // largest value, as the device test, for other CPUs' kernels).
        const auto same = [&](const Tensor& got, bool kept) {
          const Tensor want = kept ? full[k][r] : torch::zeros_like(full[k][r]);
          return kept ? torch::allclose(got, want, 0.0, 1e-5 * want.abs().max().item<double>())
                      : torch::equal(got, want);
        };
        EXPECT_TRUE(same(first[k][r], step0)) << name << " " << k << " row " << r;
        EXPECT_TRUE(same(second[k][r], !step0)) << name << " " << k << " row " << r;
      }
    }
    // 0.9..1 keeps neither step of two (0/2 < 0.9, 1/2 < 0.9): the frames of no ControlNet, and no ControlNet call.
    const auto [kept_none, calls] = run_with(0.9, 1.0, false, &none);
    StreamConfig c = cfg();
    c.cfg_type = cfg_type;
    c.guidance_scale = 1.4;
    StreamDiffusion plain(tiny_sd15(), c);
    plain.prepare("a cat", "blurry");
    std::vector<Tensor> outs;
    for (int i = 0; i < 3; ++i) outs.push_back(plain.img2img(frame()));
    EXPECT_TRUE(torch::equal(kept_none, torch::cat(outs))) << name;
    EXPECT_EQ(calls, 0) << name;
  }
}

// Sequential mode (use_denoising_batch false): one UNet call per step, each of one step's rows.
TEST(ControlNetGuidance, SequentialModeConditionsTheCallsOfTheStepsInRange) {
  SD_REQUIRE_CN();
  const auto cn = ControlNet::load(test::fixture_path(kCn), *tiny_sd15());
  std::map<std::string, Tensor> traced;
  StreamConfig c = cfg();
  c.use_denoising_batch = false;
  StreamDiffusion s(tiny_sd15(), c);
  s.set_trace([&](const std::string& n, const Tensor& t) { traced.emplace(n, t.clone()); });
  s.prepare("a cat");
  ControlNetUnit u{cn, 1.0};
  u.guidance_end = 0.5;
  s.set_controlnets({u});
  s.set_control_image(0, control(0));
  s.img2img(frame());
  ASSERT_TRUE(traced.count("unet0.controlnet_mid"));
  EXPECT_GT(traced["unet0.controlnet_mid"].abs().max().item<double>(), 0.0);
  // The second step's call has no row in range: the ControlNet does not run for it.
  EXPECT_EQ(traced.count("unet1.controlnet_mid"), 0u);
  EXPECT_EQ(s.stats().controlnet_calls, 1);
}

// A ControlNet no step keeps is skipped, so it needs no control image (as at scale 0); one that runs does
// (controlnet_runs says which).
TEST(ControlNetGuidance, ARangeOfNoStepNeedsNoControlImage) {
  SD_REQUIRE_CN();
  const auto cn = ControlNet::load(test::fixture_path(kCn), *tiny_sd15());
  StreamDiffusion s(tiny_sd15(), cfg()), plain(tiny_sd15(), cfg());
  s.prepare("a cat");
  plain.prepare("a cat");
  ControlNetUnit u{cn, 1.0};
  u.guidance_start = 0.9;  // t_index_list of two: neither 0/2 nor 1/2 reaches 0.9
  s.set_controlnets({u});
  EXPECT_FALSE(s.controlnet_runs(0));
  Tensor out;
  ASSERT_NO_THROW(out = s.img2img(frame()));
  EXPECT_TRUE(torch::equal(out, plain.img2img(frame())));
  s.set_controlnet_guidance(0, 0.0, 1.0);
  EXPECT_TRUE(s.controlnet_runs(0));
  s.set_controlnet_scale(0, 0.0);
  EXPECT_FALSE(s.controlnet_runs(0));
  s.set_controlnet_scale(0, 1.0);
  const std::string bad = test::error_of<InvalidArgument>([&] { (void)s.controlnet_runs(1); });
  EXPECT_NE(bad.find("ControlNet index 1 out of range (1 ControlNets)"), std::string::npos) << bad;
  const std::string m = test::error_of<InvalidArgument>([&] { s.img2img(frame()); });
  EXPECT_NE(m.find("has no control image"), std::string::npos) << m;
}

// Two steps of one timestep (t_index_list {20, 20}) cannot be told apart by their rows: a range keeping one and not
// the other is refused at the call, naming the timestep; a range keeping both runs.
TEST(ControlNetGuidance, ARepeatedTimestepHalfInRangeIsRefused) {
  SD_REQUIRE_CN();
  const auto cn = ControlNet::load(test::fixture_path(kCn), *tiny_sd15());
  StreamConfig c = cfg();
  c.t_index_list = {20, 20};
  StreamDiffusion s(tiny_sd15(), c);
  s.prepare("a cat");
  ControlNetUnit u{cn, 1.0};
  u.guidance_end = 0.5;
  s.set_controlnets({u});
  s.set_control_image(0, control(0));
  const std::string m = test::error_of<InvalidArgument>([&] { s.img2img(frame()); });
  EXPECT_NE(m.find("ControlNet 0: two steps of t_index_list share timestep"), std::string::npos) << m;
  EXPECT_NE(m.find("give t_index_list distinct entries"), std::string::npos) << m;
  s.set_controlnet_guidance(0, 0.0, 1.0);
  EXPECT_NO_THROW(s.img2img(frame()));
}

// txt2img_one_shot makes n x F separate one-step images: each is step 0 of 1, so any range but 0..1 leaves it
// unconditioned (the images of no ControlNet, bit for bit), whatever row it has.
TEST(ControlNetGuidance, OneShotImagesAreOneStepGenerations) {
  SD_REQUIRE_CN();
  const auto cn = ControlNet::load(test::fixture_path(kCn), *tiny_sd15());
  const auto one_shot = [&](double start, double end, bool with_cn, bool with_image = true) {
    StreamConfig c = cfg();
    c.cfg_type = CfgType::None;
    StreamDiffusion s(tiny_sd15(), c);
    s.prepare("a cat");
    if (with_cn) {
      ControlNetUnit u{cn, 1.0};
      u.guidance_start = start;
      u.guidance_end = end;
      s.set_controlnets({u});
      if (with_image) s.set_control_image(0, control(0));
    }
    return s.txt2img_one_shot();
  };
  const Tensor plain = one_shot(0, 1, false);
  ASSERT_EQ(plain.size(0), 2);  // two steps of one frame: two images
  EXPECT_TRUE(torch::equal(one_shot(0.0, 0.5, true), plain));
  EXPECT_TRUE(torch::equal(one_shot(0.5, 1.0, true), plain));
  EXPECT_GT((one_shot(0.0, 1.0, true) - plain).abs().max().item<double>(), 1e-3);
  // So a partial range needs no control image here (the stream's t_index_list of two would keep a step of it).
  EXPECT_TRUE(torch::equal(one_shot(0.0, 0.5, true, false), plain));
  const std::string m = test::error_of<InvalidArgument>([&] { one_shot(0.0, 1.0, true, false); });
  EXPECT_NE(m.find("txt2img_one_shot: ControlNet 0"), std::string::npos) << m;
}

TEST(ControlNetGuidance, BadRangesAreRefusedNamingTheRule) {
  SD_REQUIRE_CN();
  const auto cn = ControlNet::load(test::fixture_path(kCn), *tiny_sd15());
  StreamDiffusion s(tiny_sd15(), cfg());
  s.prepare("a cat");
  for (const auto& [start, end] : std::vector<std::pair<double, double>>{
           {0.5, 0.5}, {0.6, 0.4}, {-0.1, 1.0}, {0.0, 1.5}, {std::nan(""), 1.0}, {0.0, INFINITY}}) {
    ControlNetUnit u{cn, 1.0};
    u.guidance_start = start;
    u.guidance_end = end;
    const std::string m = test::error_of<InvalidArgument>([&] { s.set_controlnets({u}); });
    EXPECT_NE(m.find("set_controlnets: ControlNet 0: control guidance start"), std::string::npos) << m;
    EXPECT_NE(m.find("0 <= start < end <= 1"), std::string::npos) << m;
  }
  s.set_controlnets({{cn, 1.0}});
  EXPECT_NE(test::error_of<InvalidArgument>([&] { s.set_controlnet_guidance(0, 0.7, 0.2); }).find("0 <= start"),
            std::string::npos);
  EXPECT_NE(test::error_of<InvalidArgument>([&] { s.set_controlnet_guidance(1, 0.0, 0.5); }).find("out of range"),
            std::string::npos);
  EXPECT_EQ(s.controlnets()[0].guidance_start, 0.0);  // a refused range changes nothing
  EXPECT_EQ(s.controlnets()[0].guidance_end, 1.0);
}

TEST(ControlNetStream, MissingControlImageAndWrongSizes) {
  SD_REQUIRE_CN();
  const auto cn = ControlNet::load(test::fixture_path(kCn), *tiny_sd15());
  StreamDiffusion s(tiny_sd15(), cfg());
  s.prepare("a cat");
  s.set_controlnets({{cn, 1.0}});
  try {
    s.img2img(frame());
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("has no control image"), std::string::npos) << e.what();
  }
  EXPECT_EQ(s.stats().calls, 0) << "refused before the call changed anything";
  // Another size is resized, not refused.
  const Tensor image = torch::rand({3, 100, 37});
  s.set_control_image(0, image);
  EXPECT_EQ(s.control_image(0).sizes().vec(), (std::vector<int64_t>{1, 3, 64, 64}));
  // The retry is the call a stream that had its control image from the start makes.
  StreamDiffusion fresh(tiny_sd15(), cfg());
  fresh.prepare("a cat");
  fresh.set_controlnets({{cn, 1.0}});
  fresh.set_control_image(0, image);
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(torch::equal(s.img2img(frame()), fresh.img2img(frame()))) << "call " << i;
  EXPECT_THROW(s.set_control_image(0, torch::zeros({64, 64, 4}, torch::kUInt8)), InvalidArgument);
  EXPECT_THROW(s.set_control_image(1, control(0)), InvalidArgument);
}

TEST(ControlNetLoad, OriginalLayoutSingleFileEqualsTheFolder) {
  SD_REQUIRE_CN();
  const std::string dir = test::fixture_path(kCn);
  auto folder_model = load_controlnet_model(dir);
  sd::nn::restore_dense_convolutions(*folder_model);  // prepacked convolutions keep one copy (models/layers.h)
  std::map<std::string, Tensor> weights = state_dict(*folder_model);
  std::vector<std::string> keys;
  for (const auto& kv : weights) keys.push_back(kv.first);
  const std::string tmp = test::make_temp_dir("cn_single");
  for (const std::string& prefix : {std::string(convert::kControlNetPrefix), std::string()}) {
    const auto table = convert::controlnet_ldm_table(keys, prefix);
    const auto ldm = convert::scatter_ldm(weights, table);
    std::map<std::string, Tensor> out(ldm.begin(), ldm.end());
    const std::string path = tmp + "/control_tiny" + (prefix.empty() ? "_bare" : "") + ".safetensors";
    save_safetensors(path, out);
    // The inferred config has the architecture of the folder's (GroupNorm groups are not in the weights: the
    // family default 32 is assumed, as for every published ControlNet; the tiny fixture uses 8).
    const auto file = SafeTensorsFile::open(path);
    const auto info = convert::inspect_controlnet_file(file);
    EXPECT_EQ(info.prefix, prefix);
    const auto c = ControlNetConfig::from_json(info.config, path);
    EXPECT_EQ(c.conditioning_embedding_out_channels, (std::vector<int64_t>{4, 8, 8, 16}));
    EXPECT_EQ(c.conditioning_channels, 3);
    EXPECT_EQ(c.unet.block_out_channels, (std::vector<int64_t>{32, 64}));
    EXPECT_EQ(c.unet.cross_attention_dim, (std::vector<int64_t>{32, 32}));
    EXPECT_EQ(c.unet.down_block_types, folder_model->config().unet.down_block_types);
    // Every tensor converts back to the folder's, bit for bit.
    const auto back = convert::gather_ldm(file, table, "ControlNet");
    ASSERT_EQ(back.size(), weights.size());
    for (const auto& [k, v] : weights) EXPECT_TRUE(torch::equal(back.at(k), v)) << prefix << k;
    // And it loads as a ControlNet of the model set.
    const auto cn = ControlNet::load(path, *tiny_sd15());
    EXPECT_NE(cn->describe().find("original layout"), std::string::npos) << cn->describe();
  }
  std::filesystem::remove_all(tmp);
}

// A real SD 2.x-shaped ControlNet (cross_attention_dim 1024, its own consistent random weights) reaches the family
// check, which names both sides.
TEST(ControlNetLoad, AnSd2ControlNetOnAnSd15ModelIsRefusedByTheFamilyCheck) {
  SD_REQUIRE_CN();
  const std::string tmp = test::make_temp_dir("cn_sd2");
  const std::string dir = test::fixture_path(kCn);
  const int64_t model_cross = model_cross_attention_dim();
  const auto [cross, family] = another_family(model_cross);
  auto j = nlohmann::json::parse(std::ifstream(dir + "/config.json"));
  j["cross_attention_dim"] = cross;
  std::ofstream(tmp + "/config.json") << j.dump();
  ControlNetModel other(ControlNetConfig::from_json(j, tmp + "/config.json"));
  std::map<std::string, torch::Tensor> weights;
  for (const auto& kv : other->named_parameters()) weights[kv.key()] = kv.value();
  save_safetensors(tmp + "/diffusion_pytorch_model.safetensors", weights);
  try {
    ControlNet::load(tmp, *tiny_sd15());
    FAIL() << "expected an error";
  } catch (const InvalidArgument& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("is for " + family + " (cross_attention_dim " + std::to_string(cross) + ") but the model is"),
              std::string::npos)
        << w;
    EXPECT_NE(w.find(unet_family_name(model_cross, false) + " (cross_attention_dim " + std::to_string(model_cross) + ")"),
              std::string::npos)
        << w;
    EXPECT_NE(w.find(tmp), std::string::npos) << w;
  }
  std::filesystem::remove_all(tmp);
}

// A full Stable Diffusion checkpoint given as the ControlNet: the error says what it is and where it belongs.
TEST(ControlNetLoad, AFullCheckpointIsNotAControlNetWithAHint) {
  SD_REQUIRE_CN();
  const std::string ckpt = test::fixture_path("single_file/tiny-sd15.safetensors");
  if (!test::fixture_exists("single_file/tiny-sd15.safetensors")) GTEST_SKIP() << "no single-file fixture";
  try {
    ControlNet::load(ckpt, *tiny_sd15());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("not a ControlNet"), std::string::npos) << w;
    EXPECT_NE(w.find("full Stable Diffusion checkpoint: pass it as the model"), std::string::npos) << w;
    EXPECT_NE(w.find(ckpt), std::string::npos) << w;
  }
}

TEST(ControlNetLoad, AnotherFamilyIsRefusedNamingBoth) {
  SD_REQUIRE_CN();
  const std::string tmp = test::make_temp_dir("cn_family");
  const std::string dir = test::fixture_path(kCn);
  const auto [cross, family] = another_family(model_cross_attention_dim());
  auto j = nlohmann::json::parse(std::ifstream(dir + "/config.json"));
  j["cross_attention_dim"] = cross;  // a ControlNet of another family
  std::ofstream(tmp + "/config.json") << j.dump();
  std::filesystem::copy_file(dir + "/diffusion_pytorch_model.safetensors", tmp + "/diffusion_pytorch_model.safetensors");
  try {
    ControlNet::load(tmp, *tiny_sd15());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    // Either the shape check of the weights or the family check names what is wrong.
    const std::string w = e.what();
    EXPECT_TRUE(w.find(std::to_string(cross)) != std::string::npos || w.find(family) != std::string::npos) << w;
  }
  EXPECT_THROW(ControlNet::load(test::fixture_path("models/tiny-sd15/unet/config.json"), *tiny_sd15()), Error);
  std::filesystem::remove_all(tmp);
}

}  // namespace
}  // namespace sd
