// The emoji model measures (src/train/emoji_eval.h): each metric on inputs with a known answer, the retrieval on the
// real emoji (a real image finds itself), and the figures of the SHIPPED model (models/emoji-tiny) against the floor
// recorded in models/emoji-tiny/README.md and issue 18's bars (the retrieval bars checked, the others printed).
// The shipped-model and real-data tests skip (with the reason) when the emoji data (scripts/fetch-emoji-data.sh) or
// the model is absent.
#include <cmath>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "common/cli_run.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "io/model_folder.h"
#include "pipeline/diffusion_models.h"
#include "train/emoji_dataset.h"
#include "train/emoji_eval.h"

#ifndef SD_SOURCE_DIR
#define SD_SOURCE_DIR "."
#endif

namespace {

using sd::train::rms_gradient;
using sd::train::psnr;
using sd::train::retrieval_features;
using sd::train::retrieval_ranks;
using sd::train::ssim;

// [1, 3, H, W] in [-1, 1] from values in [0, 1].
torch::Tensor img01(const torch::Tensor& x01) { return x01 * 2 - 1; }

TEST(EmojiEvalMetrics, PsnrOfAKnownError) {
  const auto a = img01(torch::full({2, 3, 16, 16}, 0.5));
  auto b = a.clone();
  b[0] = img01(torch::full({3, 16, 16}, 0.6));  // [0, 1] error 0.1 everywhere: MSE 0.01 -> 20 dB
  const auto p = psnr(b, a);
  EXPECT_NEAR(p[0].item<double>(), 20.0, 1e-4);
  EXPECT_NEAR(p[1].item<double>(), 100.0, 1e-6);  // identical: the 1e-10 MSE floor
  // Values outside [-1, 1] are clamped as a saved image would be: 1.5 reads as 1.
  EXPECT_NEAR(psnr(torch::full({1, 3, 8, 8}, 1.5), torch::ones({1, 3, 8, 8}))[0].item<double>(), 100.0, 1e-6);
}

TEST(EmojiEvalMetrics, SsimIsOneForEqualImagesAndTheClosedFormForFlatOnes) {
  torch::manual_seed(1);
  const auto x = torch::rand({2, 3, 32, 32}) * 2 - 1;
  const auto s = ssim(x, x);
  EXPECT_NEAR(s[0].item<double>(), 1.0, 1e-6);
  EXPECT_NEAR(s[1].item<double>(), 1.0, 1e-6);
  // Flat images a, b (no variance): SSIM = (2ab + C1) / (a^2 + b^2 + C1).
  const double a = 0.2, b = 0.7, c1 = 1e-4;
  const auto flat = ssim(img01(torch::full({1, 3, 16, 16}, a)), img01(torch::full({1, 3, 16, 16}, b)));
  EXPECT_NEAR(flat[0].item<double>(), (2 * a * b + c1) / (a * a + b * b + c1), 1e-5);
  // Blurring lowers it; noise lowers it more the stronger it is.
  const auto blurred = torch::avg_pool2d(x, 3, 1, 1, false, false);
  const double s_blur = ssim(blurred, x)[0].item<double>();
  EXPECT_LT(s_blur, 0.9);
  const double s_weak = ssim((x + 0.05 * torch::randn_like(x)), x)[0].item<double>();
  const double s_strong = ssim((x + 0.5 * torch::randn_like(x)), x)[0].item<double>();
  EXPECT_GT(s_weak, s_strong);
  EXPECT_THROW(ssim(torch::zeros({1, 3, 10, 10}), torch::zeros({1, 3, 10, 10})), sd::InvalidArgument);
  EXPECT_THROW(ssim(torch::zeros({1, 3, 16, 16}), torch::zeros({1, 3, 16, 17})), sd::InvalidArgument);
}

TEST(EmojiEvalMetrics, MeanGradientOfStripesAndFlats) {
  // Columns alternating 0 / 1: every horizontal difference is +-1, every vertical one 0.
  const auto cols = (torch::arange(8) % 2).to(torch::kFloat32).view({1, 1, 1, 8}).expand({1, 3, 8, 8});
  EXPECT_NEAR(rms_gradient(img01(cols))[0].item<double>(), 1.0, 1e-6);
  EXPECT_NEAR(rms_gradient(torch::zeros({1, 3, 8, 8}))[0].item<double>(), 0.0, 1e-9);
  // A diagonal ramp of step 0.1 in x and y: sqrt(0.01 + 0.01).
  const auto r = torch::arange(8).to(torch::kFloat32) * 0.1;
  const auto ramp = (r.view({8, 1}) + r.view({1, 8})).clamp_max(1.0).view({1, 1, 8, 8}).expand({1, 3, 8, 8});
  const auto sub = ramp.index({torch::indexing::Slice(), torch::indexing::Slice(), torch::indexing::Slice(0, 4),
                               torch::indexing::Slice(0, 4)});
  EXPECT_NEAR(rms_gradient(img01(sub))[0].item<double>(), std::sqrt(0.02), 1e-5);
  // A step edge and the same edge spread over two pixels: the total variation is the same (one rise of 1 per row),
  // the RMS gradient falls by sqrt(2): 7 positions per row, squared differences 1 vs 0.25 + 0.25.
  const auto step = torch::tensor({0.f, 0.f, 0.f, 0.f, 1.f, 1.f, 1.f, 1.f}).view({1, 1, 1, 8}).expand({1, 3, 2, 8});
  const auto soft = torch::tensor({0.f, 0.f, 0.f, .5f, 1.f, 1.f, 1.f, 1.f}).view({1, 1, 1, 8}).expand({1, 3, 2, 8});
  EXPECT_NEAR(rms_gradient(img01(step))[0].item<double>(), std::sqrt(1.0 / 7), 1e-6);
  EXPECT_NEAR(rms_gradient(img01(soft))[0].item<double>(), std::sqrt(0.5 / 7), 1e-6);
}

TEST(EmojiEvalMetrics, RetrievalRanksAgainstBruteForce) {
  torch::manual_seed(3);
  const auto gallery = torch::rand({40, 12});
  const auto targets = torch::tensor({0, 7, 13, 39, 20}, torch::kInt64);
  auto query = gallery.index_select(0, targets).clone();
  query[1] = gallery[5];                     // looks exactly like another entry: that one is closer
  query[2] = gallery[13] + 0.3 * torch::randn({12});
  const auto ranks = retrieval_ranks(query, gallery, targets);
  for (int64_t b = 0; b < query.size(0); ++b) {
    const auto d = (gallery - query[b]).pow(2).sum(1);
    const int64_t expect = 1 + (d < d[targets[b].item<int64_t>()]).sum().item<int64_t>();
    EXPECT_EQ(ranks[b].item<int64_t>(), expect) << "query " << b;
  }
  EXPECT_EQ(ranks[0].item<int64_t>(), 1);
  EXPECT_EQ(ranks[3].item<int64_t>(), 1);
  EXPECT_GE(ranks[1].item<int64_t>(), 2);
  // A duplicate of the target in the gallery ties with it and does not push it down.
  auto dup = torch::cat({gallery, gallery[7].unsqueeze(0)});
  EXPECT_EQ(retrieval_ranks(gallery[7].unsqueeze(0), dup, torch::tensor({7}, torch::kInt64))[0].item<int64_t>(), 1);
  EXPECT_THROW(retrieval_ranks(query, gallery, torch::tensor({0, 1}, torch::kInt64)), sd::InvalidArgument);
  EXPECT_THROW(retrieval_ranks(query, gallery, torch::tensor({0, 1, 2, 3, 40}, torch::kInt64)), sd::InvalidArgument);
}

TEST(EmojiEvalMetrics, IndexListsOfTheStepCounts) {
  EXPECT_EQ(sd::train::eval_index_list(1), (std::vector<int64_t>{0}));
  EXPECT_EQ(sd::train::eval_index_list(2), (std::vector<int64_t>{0, 45}));
  EXPECT_EQ(sd::train::eval_index_list(4), (std::vector<int64_t>{0, 16, 32, 45}));
  EXPECT_EQ(sd::train::eval_index_list(3), (std::vector<int64_t>{0, 22, 45}));
  EXPECT_THROW(sd::train::eval_index_list(0), sd::InvalidArgument);
}

struct RealData {
  std::string missing;
  sd::train::EmojiDataset data;
};

RealData real_data() {
  RealData r;
  const std::string dir = sd::train::default_emoji_data_dir();
  if (!sd::train::emoji_data_available(dir, "google")) {
    r.missing = "emoji data not installed in " + dir + " (run scripts/fetch-emoji-data.sh)";
    return r;
  }
  r.data = sd::train::load_emoji_dataset(dir, {"google"}, 64);
  return r;
}

std::string shipped_model() {
  if (const char* m = std::getenv("SD_EMOJI_MODEL"); m && *m) return m;
  return std::string(SD_SOURCE_DIR) + "/models/emoji-tiny";
}

// A real emoji finds itself among all of them with both distances: the gallery and the features are those of the
// data; a blurred copy keeps most of its colour-layout rank and loses sharpness.
TEST(EmojiEvalRealData, EveryTestEmojiFindsItself) {
  const auto in = real_data();
  if (!in.missing.empty()) GTEST_SKIP() << in.missing;
  const auto all = in.data.batch(torch::arange(in.data.size(), torch::kInt64));
  const auto f = retrieval_features(all);
  std::vector<int64_t> t;
  for (const auto& p : sd::train::adherence_pairs(in.data.size())) t.push_back(p.first);
  ASSERT_EQ(t.size(), 50u);
  const auto targets = torch::tensor(t, torch::kInt64);
  const auto real = all.index_select(0, targets);
  const auto q = retrieval_features(real);
  EXPECT_EQ(retrieval_ranks(q.rgb, f.rgb, targets).max().item<int64_t>(), 1);
  EXPECT_EQ(retrieval_ranks(q.grad, f.grad, targets).max().item<int64_t>(), 1);
  const auto blurred = torch::avg_pool2d(real, 5, 1, 2, false, false);
  const double ratio = rms_gradient(blurred).mean().item<double>() / rms_gradient(real).mean().item<double>();
  EXPECT_LT(ratio, 0.6);
  EXPECT_GT(ratio, 0.05);
}

// The shipped model's figures (the third version, issue 18; README and models/emoji-tiny/README.md: 26.37 dB, SSIM
// 0.867; top-1 L2 94 / 94 / 92% and top-5 98 / 98 / 98% at 1 / 2 / 4 steps; sharpness 0.767 / 0.744 / 0.749) are held
// to issue 18's bars as they are (PSNR >= 26 dB, top-1 >= 60% and top-5 >= 85% at 4 steps, sharpness >= 0.7 at every
// step count) and to floors at the measured figures less a margin of two names (4%) or a little rounding for other
// CPUs' kernels. The first model measured 18.10 dB, top-5 24 / 28 / 18%, sharpness 0.48 / 0.47 / 0.44; the second
// 24.71 dB, top-1 88 / 86 / 80%, sharpness 0.670 / 0.665 / 0.633.
TEST(EmojiEvalShippedModel, FiguresAtLeastTheRecordedOnes) {
  const auto in = real_data();
  if (!in.missing.empty()) GTEST_SKIP() << in.missing;
  const std::string model = shipped_model();
  if (!sd::is_file(model + "/model_index.json")) GTEST_SKIP() << "no model at " << model;
  sd::LoadOptions lo;
  lo.threads = 1;  // the tiny model runs faster on one thread than on a 2-thread team (and ctest runs two at once)
  const auto models = sd::load_pipeline(model, lo);
  const auto r = sd::train::evaluate_emoji_model(models, in.data);
  std::cout << sd::train::format_eval(r);
  ASSERT_EQ(r.reconstruction.n, in.data.size());
  ASSERT_EQ(r.retrieval.size(), 3u);
  std::cout << "  [issue 18 bars] PSNR >= 26 dB: " << r.reconstruction.psnr_db << "; 4 steps top-1 >= 60%: "
            << 100 * r.retrieval[2].top1_l2 << "%, top-5 >= 85%: " << 100 * r.retrieval[2].top5_l2
            << "%; sharpness >= 0.7: " << r.retrieval[2].sharpness << "\n";
  EXPECT_GE(r.reconstruction.psnr_db, 26.0) << "issue 18's bar";
  EXPECT_GE(r.reconstruction.psnr_db, 26.3);
  EXPECT_GE(r.reconstruction.ssim, 0.86);
  EXPECT_GE(r.retrieval[2].top1_l2, 0.60) << "issue 18's bar at 4 steps";
  EXPECT_GE(r.retrieval[2].top5_l2, 0.85) << "issue 18's bar at 4 steps";
  const double top1_floor[3] = {0.90, 0.90, 0.88}, top5_floor[3] = {0.94, 0.94, 0.94},
               sharp_floor[3] = {0.755, 0.73, 0.735};
  for (size_t i = 0; i < 3; ++i) {
    const auto& s = r.retrieval[i];
    EXPECT_EQ(s.n, 50);
    EXPECT_EQ(s.gallery, in.data.size());
    EXPECT_GE(s.top1_l2, top1_floor[i]) << s.steps << " step(s)";
    EXPECT_GE(s.top5_l2, top5_floor[i]) << s.steps << " step(s)";
    EXPECT_GE(s.top5_l2, s.top1_l2);
    EXPECT_GE(s.sharpness, sharp_floor[i]) << s.steps << " step(s)";
    EXPECT_GE(s.sharpness, 0.7) << "issue 18's bar, " << s.steps << " step(s)";
  }
}

#ifdef SD_CLI_PATH
TEST(EmojiEvalCli, WritesTheJsonAndRefusesBadSteps) {
  const auto in = real_data();
  if (!in.missing.empty()) GTEST_SKIP() << in.missing;
  const auto dir = sd::test::make_temp_dir("eval-cli");
  const std::string json = dir + "/eval.json";
  const auto [status, out] = sd::test::run_command("'" SD_CLI_PATH "' eval --steps 1 --no-reconstruction --threads 1 --json " +
                                                   sd::test::q(json));
  ASSERT_EQ(status, 0) << out;
  EXPECT_NE(out.find("retrieval of 50 names among 1911 emoji"), std::string::npos) << out;
  std::ifstream f(json);
  const auto j = nlohmann::json::parse(f);
  EXPECT_FALSE(j.contains("autoencoder"));
  ASSERT_EQ(j["retrieval"].size(), 1u);
  EXPECT_EQ(j["retrieval"][0]["steps"], 1);
  EXPECT_EQ(j["retrieval"][0]["names"].size(), 50u);
  EXPECT_EQ(j["retrieval"][0]["names"][0]["name"], in.data.entries[0].name);

  const auto bad = sd::test::run_command("'" SD_CLI_PATH "' eval --steps 1,x");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.output.find("--steps: 'x' is not a step count in [1, 46]"), std::string::npos) << bad.output;
  const auto nodata = sd::test::run_command("'" SD_CLI_PATH "' eval --data " + sd::test::q(dir));
  EXPECT_NE(nodata.status, 0);
  EXPECT_NE(nodata.output.find("no emoji data of style 'google' in " + dir), std::string::npos) << nodata.output;
}

// The contact sheet's generated tiles carry their retrieval rank (printed too); a prompt that is no emoji name has none.
TEST(EmojiEvalCli, ContactSheetShowsRetrievalRanks) {
  const auto in = real_data();
  if (!in.missing.empty()) GTEST_SKIP() << in.missing;
  const auto dir = sd::test::make_temp_dir("eval-sheet");
  const auto [status, out] = sd::test::run_command(
      "'" SD_CLI_PATH "' contact-sheet --threads 1 --prompts 'red apple;a purple elephant' --img2img-prompts 'red apple' "
      "--out " + sd::test::q(dir + "/sheet.png"));
  ASSERT_EQ(status, 0) << out;
  EXPECT_NE(out.find("retrieval rank of 'red apple' (1, 2, 4 steps): "), std::string::npos) << out;
  EXPECT_NE(out.find(" of 1911\n"), std::string::npos) << out;
  EXPECT_EQ(out.find("retrieval rank of 'a purple elephant'"), std::string::npos) << out;
  EXPECT_TRUE(std::filesystem::exists(dir + "/sheet.png"));
}

// Review finding: --tile was not checked, so 0 failed in an OpenCV assertion after the whole sheet was generated.
TEST(EmojiEvalCli, ContactSheetTileIsCheckedFirst) {
  const auto dir = sd::test::make_temp_dir("eval-sheet-tile");
  for (const char* tile : {"0", "5000"}) {
    const auto [status, out] = sd::test::run_command("'" SD_CLI_PATH "' contact-sheet --tile " + std::string(tile) +
                                                     " --out " + sd::test::q(dir + "/sheet.png"));
    EXPECT_NE(status, 0) << out;
    EXPECT_NE(out.find("--tile"), std::string::npos) << out;
    EXPECT_EQ(out.find("OpenCV"), std::string::npos) << out;
  }
  EXPECT_FALSE(std::filesystem::exists(dir + "/sheet.png"));
  std::filesystem::remove_all(dir);
}
#endif

}  // namespace
