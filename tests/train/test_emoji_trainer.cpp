// The trainer on a small synthetic dataset (coloured shapes) with scaled-down models: determinism for a seed,
// resuming from a checkpoint gives the same parameters as an uninterrupted run, the loss falls, and the exported
// folder loads through sd::load_pipeline and generates.
#include <cmath>
#include <filesystem>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "common/cli_run.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "io/json_config.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/model_defaults.h"
#include "pipeline/stream_diffusion.h"
#include "train/emoji_trainer.h"

namespace {

std::shared_ptr<sd::train::EmojiDataset> synthetic_dataset() {
  auto d = std::make_shared<sd::train::EmojiDataset>();
  const std::vector<std::pair<std::string, std::vector<int>>> colours = {
      {"red", {230, 30, 30}}, {"green", {30, 200, 60}}, {"blue", {40, 60, 230}}, {"yellow", {250, 220, 30}}};
  const std::vector<std::string> shapes = {"square", "circle", "bar"};
  std::vector<torch::Tensor> imgs;
  const auto yy = torch::arange(64).view({64, 1}).expand({64, 64});
  const auto xx = torch::arange(64).view({1, 64}).expand({64, 64});
  for (const auto& [cname, rgb] : colours)
    for (const auto& s : shapes) {
      torch::Tensor mask;
      if (s == "square") mask = (yy > 16) & (yy < 48) & (xx > 16) & (xx < 48);
      if (s == "circle") mask = ((yy - 32) * (yy - 32) + (xx - 32) * (xx - 32)) < 400;
      if (s == "bar") mask = (yy > 8) & (yy < 56) & (xx > 26) & (xx < 38);
      auto img = torch::full({3, 64, 64}, 255, torch::kUInt8);
      for (int c = 0; c < 3; ++c) img[c].masked_fill_(mask, rgb[c]);
      imgs.push_back(img);
      sd::train::EmojiEntry e;
      e.name = cname + " " + s;
      e.short_names = {s};
      e.category = "shapes";
      e.image = e.name + ".png";
      d->entries.push_back(e);
      d->styles.push_back("google");
    }
  d->images = torch::stack(imgs);
  return d;
}

sd::train::TrainOptions tiny_options(const std::string& work) {
  sd::train::TrainOptions o;
  o.work_dir = work;
  o.seed = 7;
  o.ae_steps = 4;
  o.unet_steps = 6;
  o.ae_batch = 4;
  o.batch = 4;
  o.warmup = 2;
  o.log_every = 0;
  o.checkpoint_every = 0;
  o.bpe = {60, 2};
  o.taesd_config["encoder_block_out_channels"] = {8, 8, 8, 8};
  o.taesd_config["decoder_block_out_channels"] = {8, 8, 8, 8};
  o.unet_config["block_out_channels"] = {16, 32, 32};
  o.unet_config["norm_num_groups"] = 8;
  o.unet_config["attention_head_dim"] = {1, 1, 2};
  o.unet_config["cross_attention_dim"] = 32;
  o.text_config["hidden_size"] = 32;
  o.text_config["intermediate_size"] = 64;
  o.text_config["num_hidden_layers"] = 1;
  o.text_config["num_attention_heads"] = 2;
  return o;
}

double max_param_diff(const std::map<std::string, torch::Tensor>& a, const std::map<std::string, torch::Tensor>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (const auto& [k, v] : a) {
    auto it = b.find(k);
    if (it == b.end()) {
      ADD_FAILURE() << "missing " << k;
      continue;
    }
    m = std::max(m, (v - it->second).abs().max().item<double>());
  }
  return m;
}

class ThreadScope {
 public:
  explicit ThreadScope(int n) : old_(at::get_num_threads()) { at::set_num_threads(n); }
  ~ThreadScope() { at::set_num_threads(old_); }

 private:
  int old_;
};

TEST(EmojiTrainer, SameSeedSameModel) {
  ThreadScope threads(1);
  const auto data = synthetic_dataset();
  const auto root = sd::test::make_temp_dir("train_det");
  sd::train::EmojiTrainer a(tiny_options(root + "/a"), data);
  const auto sa = a.run();
  sd::train::EmojiTrainer b(tiny_options(root + "/b"), data);
  b.run();
  EXPECT_EQ(sa.step, 10);
  const double d = max_param_diff(a.parameters(), b.parameters());
  std::cout << "  [determinism] max |param diff| after 10 steps, same seed, 1 thread: " << d << "\n";
  EXPECT_EQ(d, 0.0);
  // A different seed gives a different model.
  auto other = tiny_options(root + "/c");
  other.seed = 8;
  sd::train::EmojiTrainer c(other, data);
  c.run();
  EXPECT_GT(max_param_diff(a.parameters(), c.parameters()), 1e-3);
}

TEST(EmojiTrainer, ResumeEqualsUninterrupted) {
  ThreadScope threads(1);
  const auto data = synthetic_dataset();
  const auto root = sd::test::make_temp_dir("train_resume");
  sd::train::EmojiTrainer full(tiny_options(root + "/full"), data);
  full.run();
  // Interrupted twice: inside the autoencoder phase and inside the UNet phase.
  for (int64_t stop : {3, 4}) {
    auto o = tiny_options(root + "/part");
    o.stop_after = stop;
    sd::train::EmojiTrainer t(o, data);
    t.run();
  }
  auto o = tiny_options(root + "/part");
  sd::train::EmojiTrainer rest(o, data);
  const auto st = rest.run();
  EXPECT_EQ(st.step, 10);
  const double d = max_param_diff(full.parameters(), rest.parameters());
  std::cout << "  [resume] max |param diff| resumed (3 + 4 + 3 steps) vs uninterrupted 10 steps: " << d << "\n";
  EXPECT_EQ(d, 0.0);
  // A checkpoint of another seed is refused with a clear error.
  auto wrong = tiny_options(root + "/part");
  wrong.seed = 99;
  sd::train::EmojiTrainer w(wrong, data);
  EXPECT_THROW(w.run(), sd::FormatError);
}

// The autoencoder's loss is an option: "edge" (the default: L1 + L2 + gradient L1) and "l2l1" (the first model's)
// train different weights from the same seed; an unknown name is refused with the accepted ones.
TEST(EmojiTrainer, AutoencoderLossOption) {
  ThreadScope threads(1);
  const auto data = synthetic_dataset();
  const auto root = sd::test::make_temp_dir("train_ae_loss");
  auto edge = tiny_options(root + "/edge");
  edge.unet_steps = 0;
  EXPECT_EQ(edge.ae_loss, "edge");
  sd::train::EmojiTrainer a(edge, data);
  const auto sa = a.run();
  auto old = edge;
  old.work_dir = root + "/l2l1";
  old.ae_loss = "l2l1";
  sd::train::EmojiTrainer b(old, data);
  const auto sb = b.run();
  EXPECT_EQ(sa.step, 4);
  // Same data and init, so the loss values differ by the gradient term (>= 0) and the L1 weight.
  EXPECT_GT(sa.ae_loss, sb.ae_loss);
  EXPECT_GT(max_param_diff(a.parameters(), b.parameters()), 1e-6);
  auto bad = edge;
  bad.work_dir = root + "/bad";
  bad.ae_loss = "ssim";
  try {
    sd::train::EmojiTrainer t(bad, data);
    FAIL() << "an unknown autoencoder loss was accepted";
  } catch (const sd::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("autoencoder loss 'ssim' is not one of l2l1, edge"), std::string::npos)
        << e.what();
  }
}

// ae_channels replaces both channel lists of the autoencoder config (the exported taesd/config.json and the weights
// follow); 0 keeps the config's own lists; a negative count is refused before anything is trained.
TEST(EmojiTrainer, AutoencoderChannelsOption) {
  ThreadScope threads(1);
  const auto data = synthetic_dataset();
  const auto root = sd::test::make_temp_dir("train_ae_channels");
  auto o = tiny_options(root + "/c12");
  o.ae_steps = 1;
  o.unet_steps = 0;
  o.ae_channels = 12;
  sd::train::EmojiTrainer t(o, data);
  t.log = nullptr;
  t.run();
  const auto params = t.parameters();
  const auto w = params.find("taesd.decoder.layers.0.weight");
  ASSERT_NE(w, params.end()) << "no taesd.decoder.layers.0.weight among the trainer's parameters";
  EXPECT_EQ(w->second.size(0), 12) << "the decoder's first convolution has " << w->second.size(0) << " outputs";
  t.export_model(root + "/model", torch::kFloat32);
  const auto cfg = sd::read_json_file(root + "/model/taesd/config.json");
  EXPECT_EQ(cfg["encoder_block_out_channels"], nlohmann::json({12, 12, 12, 12}));
  EXPECT_EQ(cfg["decoder_block_out_channels"], nlohmann::json({12, 12, 12, 12}));

  auto keep = tiny_options(root + "/keep");  // 0: tiny_options' own 8-channel lists
  keep.ae_steps = 1;
  keep.unet_steps = 0;
  sd::train::EmojiTrainer k(keep, data);
  k.log = nullptr;
  EXPECT_EQ(k.parameters().at("taesd.decoder.layers.0.weight").size(0), 8);

  auto bad = tiny_options(root + "/bad");
  bad.ae_channels = -3;
  try {
    sd::train::EmojiTrainer b(bad, data);
    FAIL() << "a negative channel count was accepted";
  } catch (const sd::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("autoencoder channels must be >= 1, or 0 for the config's own lists; got -3"),
              std::string::npos)
        << e.what();
  }
}

#ifdef SD_CLI_PATH
// The CLI checks --ae-channels before it loads any data.
TEST(EmojiTrainerCli, RefusesANegativeChannelCountBeforeLoading) {
  const auto root = sd::test::make_temp_dir("train_cli_channels");
  const auto r = sd::test::run_command("'" SD_CLI_PATH "' train --ae-channels -1 --data " +
                                       sd::test::q(root + "/no-such-data") + " --work-dir " +
                                       sd::test::q(root + "/w") + " --out " + sd::test::q(root + "/m"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--ae-channels must be >= 1 (or 0 for the recipe's), got -1"), std::string::npos)
      << r.output;
  EXPECT_EQ(r.output.find("no-such-data"), std::string::npos) << "the data was read first:\n" << r.output;
  EXPECT_FALSE(std::filesystem::exists(root + "/w"));
}
#endif

TEST(EmojiTrainer, ProbeReportsAdherenceAndDoesNotChangeTheTraining) {
  ThreadScope threads(1);
  const auto data = synthetic_dataset();
  const auto root = sd::test::make_temp_dir("train_probe");
  sd::train::EmojiTrainer plain(tiny_options(root + "/plain"), data);
  plain.run();
  auto o = tiny_options(root + "/probed");
  o.probe_every = 2;
  o.log_every = 1;
  sd::train::EmojiTrainer probed(o, data);
  std::vector<std::string> probe_lines;
  probed.log = [&](const std::string& l) {
    if (l.find("[probe]") != std::string::npos) probe_lines.push_back(l);
  };
  probed.run();
  // The autoencoder at the end of its phase (step 4), then UNet steps 2, 4, 6 (the last is also the end).
  ASSERT_EQ(probe_lines.size(), 4u);
  EXPECT_NE(probe_lines.front().find("autoencoder at step 4: PSNR "), std::string::npos) << probe_lines.front();
  EXPECT_NE(probe_lines.front().find(" over 12 images"), std::string::npos) << probe_lines.front();
  EXPECT_NE(probe_lines.back().find("step 10: 1-step adherence "), std::string::npos) << probe_lines.back();
  EXPECT_NE(probe_lines.back().find("; retrieval top-1 "), std::string::npos) << probe_lines.back();
  EXPECT_EQ(max_param_diff(plain.parameters(), probed.parameters()), 0.0);
  // 12 samples (< 50): every one is probed, each against another sample.
  const auto p = probed.probe_adherence();
  EXPECT_EQ(p.n, 12);
  EXPECT_GE(p.closer, 0);
  EXPECT_LE(p.closer, 12);
  EXPECT_TRUE(std::isfinite(p.mean_own) && p.mean_own > 0);
  EXPECT_TRUE(std::isfinite(p.mean_other) && p.mean_other > 0);
  EXPECT_GE(p.top1, 0.0);
  EXPECT_LE(p.top1, p.top5);
  EXPECT_LE(p.top5, 1.0);
  EXPECT_TRUE(std::isfinite(p.sharpness) && p.sharpness > 0);
  // The autoencoder probe: every sample, finite PSNR below the exact-match cap, SSIM in (-1, 1).
  const auto ae = probed.probe_autoencoder();
  EXPECT_EQ(ae.n, 12);
  EXPECT_TRUE(std::isfinite(ae.psnr_db) && ae.psnr_db > 0 && ae.psnr_db < 100);
  EXPECT_GT(ae.ssim, -1.0);
  EXPECT_LT(ae.ssim, 1.0);
  // Probing is repeatable (its own generator) and leaves the parameters alone.
  const auto q = probed.probe_adherence();
  EXPECT_EQ(q.closer, p.closer);
  EXPECT_DOUBLE_EQ(q.mean_own, p.mean_own);
  EXPECT_EQ(max_param_diff(plain.parameters(), probed.parameters()), 0.0);
}

TEST(EmojiTrainer, LossFallsAndExportLoadsInThePipeline) {
  const auto data = synthetic_dataset();
  const auto root = sd::test::make_temp_dir("train_export");
  auto o = tiny_options(root + "/work");
  o.ae_steps = 60;
  o.unet_steps = 60;
  o.log_every = 10;
  o.ae_lr = 3e-3;
  o.lr = 2e-3;
  sd::train::EmojiTrainer t(o, data);
  t.log = nullptr;
  const auto st = t.run();
  ASSERT_GE(st.loss_curve.size(), 12u);
  const double ae_first = st.loss_curve.front().second, ae_last = st.loss_curve[5].second;
  const double un_first = st.loss_curve[6].second, un_last = st.loss_curve.back().second;
  std::cout << "  [loss] autoencoder " << ae_first << " -> " << ae_last << ", unet " << un_first << " -> " << un_last
            << "\n";
  EXPECT_LT(ae_last, ae_first);
  EXPECT_LT(un_last, un_first);
  EXPECT_GT(t.latent_scaling_factor(), 0.0);

  const std::string model = root + "/model";
  t.export_model(model, torch::kFloat16);
  // The exported streamdiffusion.json: its native size and the dtype --dtype auto loads on a CPU.
  const auto defaults = sd::read_model_defaults(model);
  EXPECT_EQ(defaults.native_width, 64);
  EXPECT_EQ(defaults.cpu_dtype.value_or("none"), "fp32");
  EXPECT_EQ(defaults.cpu_threads.value_or(0), 1);
  sd::LoadOptions lo;
  lo.threads = -1;
  const auto models = sd::load_pipeline(model, lo);
  EXPECT_EQ(models->vae_scale_factor(), 8);
  sd::StreamConfig c;
  c.width = c.height = 64;
  c.t_index_list = {0, 45};
  c.cfg_type = sd::CfgType::None;
  c.use_denoising_batch = false;
  sd::StreamDiffusion s(models, c);
  s.prepare("red circle");
  const auto img = s.txt2img();
  EXPECT_EQ(img.sizes(), (std::vector<int64_t>{1, 3, 64, 64}));
  EXPECT_TRUE(torch::isfinite(img).all().item<bool>());
}

}  // namespace
