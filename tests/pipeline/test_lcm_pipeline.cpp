// diffusers' LatentConsistencyModelPipeline run recorded in unet_variants/cases/lcm_pipeline.{json,safetensors}
// (an LCM-distilled UNet with time_cond_proj_dim, txt2img, no CFG batch), replayed through this port.
//
// What the reference does maps onto the stream in sequential mode: num_inference_steps = n with t_index_list
// 0..n-1 gives the same LCM timesteps; cfg none (LCM ignores negative prompts); each step is
// eps = unet(x, t, timestep_cond = embedding(W - 1)), denoised = c_out·(x − β·eps)/α + c_skip·x, and for all but the
// last step x = α_next·denoised + β_next·noise with a fresh draw (our sequential-mode draw, the scheduler's
// randn); the output latent is the last denoised, decoded by the AutoencoderKL (raw decoder output). The guidance
// embedding comes from LoadOptions::lcm_guidance = guidance_scale. Draws replayed: latents_init and step{i}.noise;
// prepare()'s init_noise draw is overwritten by the input latent in sequential mode (a zero placeholder).
#include <cmath>
#include <map>

#include <nlohmann/json.hpp>

#include "common/fixtures.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "models/embeddings.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/stream_diffusion.h"

namespace sd {
namespace {

using torch::Tensor;

// unet_variants/README.md: per-step latents and final latent atol 1e-4 + rtol 1e-4 x max|ref|, image atol 5e-4;
// single module calls (text encoder) 1e-4 + 1e-5; scheduler scalars as the pipeline goldens.
constexpr double kLatentAtol = 1e-4, kLatentRtol = 1e-4;
constexpr double kImageAtol = 5e-4;
constexpr double kModuleAtol = 1e-4, kModuleRtol = 1e-5;
constexpr double kSchedAtol = 1e-7, kSchedRtol = 1e-6;
constexpr double kEmbeddingAtol = 1e-3;  // README: w_embedding float32 vs float64 1e-4

const char* kJson = "unet_variants/cases/lcm_pipeline.json";
const char* kTensors = "unet_variants/cases/lcm_pipeline.safetensors";
const char* kFolder = "unet_variants/lcm-pipeline";

TEST(LcmPipelineGolden, MatchesLatentConsistencyModelPipeline) {
  if (!test::fixture_exists(kJson)) GTEST_SKIP() << kJson << " not in the fixture root";
  const auto j = read_json_file(test::fixture_path(kJson));
  const auto f = SafeTensorsFile::open(test::fixture_path(kTensors));
  const auto timesteps = j.at("timesteps").get<std::vector<int64_t>>();
  const int64_t n = static_cast<int64_t>(timesteps.size());
  ASSERT_EQ(j.at("num_inference_steps").get<int64_t>(), n);
  const double guidance = j.at("guidance_scale").get<double>();

  LoadOptions lo;
  lo.threads = -1;
  lo.taesd = "none";  // the reference decodes with its AutoencoderKL
  lo.lcm_guidance = guidance;
  auto models = load_pipeline(test::fixture_path(kFolder), lo);
  EXPECT_NE(models->describe().find("LCM guidance"), std::string::npos) << models->describe();

  // Our own embedding of W - 1 against the pipeline's w_embedding (the model set computes the same).
  EXPECT_FLOAT_EQ(f.get("w").item<float>(), static_cast<float>(guidance - 1.0));
  const Tensor w_emb_ref = f.get("w_embedding");
  SD_EXPECT_CLOSE(get_guidance_scale_embedding(f.get("w"), w_emb_ref.size(1)), w_emb_ref, kEmbeddingAtol, 0.0,
                  "w_embedding");

  StreamConfig c;
  c.num_inference_steps = n;
  c.t_index_list.clear();
  for (int64_t i = 0; i < n; ++i) c.t_index_list.push_back(i);
  c.cfg_type = CfgType::None;
  c.frame_buffer_size = 1;
  c.use_denoising_batch = false;
  c.do_add_noise = true;
  c.width = j.at("width").get<int64_t>();
  c.height = j.at("height").get<int64_t>();
  const Tensor latents_init = f.get("latents_init");
  ASSERT_EQ(latents_init.size(2) * models->vae_scale_factor(), c.height);

  std::vector<Tensor> draws{torch::zeros_like(latents_init), latents_init};
  for (int64_t i = 0; i + 1 < n; ++i) draws.push_back(f.get("step" + std::to_string(i) + ".noise"));
  auto rng = std::make_shared<ReplayRng>(draws, "lcm_pipeline");
  StreamDiffusion s(models, c, rng);
  std::map<std::string, Tensor> traced;
  s.set_trace([&](const std::string& name, const Tensor& t) { traced[name] = t.detach().clone(); });
  s.prepare(j.at("prompt").get<std::string>(), "");

  SD_EXPECT_CLOSE(s.cond_embeds(), f.get("prompt_embeds"), kModuleAtol, kModuleRtol, "prompt_embeds");
  EXPECT_EQ(s.sub_timesteps(), timesteps);
  EXPECT_TRUE(torch::equal(f.get("timesteps"), torch::tensor(timesteps, torch::kLong)));
  const auto& steps = j.at("steps");
  ASSERT_EQ(static_cast<int64_t>(steps.size()), n);
  for (int64_t i = 0; i < n; ++i) {
    const auto& st = steps.at(i);
    const std::string k = "step " + std::to_string(i);
    EXPECT_EQ(st.at("timestep").get<int64_t>(), timesteps[i]);
    const double a = st.at("alpha_prod_t").get<double>();
    SD_EXPECT_CLOSE(s.alpha_prod_t_sqrt()[i].reshape({1}), torch::tensor({std::sqrt(a)}, torch::kDouble), kSchedAtol,
                    kSchedRtol, k + " sqrt(alpha_prod_t)");
    SD_EXPECT_CLOSE(s.beta_prod_t_sqrt()[i].reshape({1}), torch::tensor({std::sqrt(1.0 - a)}, torch::kDouble),
                    kSchedAtol, kSchedRtol, k + " sqrt(1 - alpha_prod_t)");
    SD_EXPECT_CLOSE(s.c_skip()[i].reshape({1}), torch::tensor({st.at("c_skip").get<double>()}, torch::kDouble),
                    kSchedAtol, kSchedRtol, k + " c_skip");
    SD_EXPECT_CLOSE(s.c_out()[i].reshape({1}), torch::tensor({st.at("c_out").get<double>()}, torch::kDouble),
                    kSchedAtol, kSchedRtol, k + " c_out");
  }

  const Tensor image = s.txt2img();
  EXPECT_EQ(rng->remaining(), 0u) << "recorded draws left unused";
  EXPECT_EQ(s.stats().unet_calls, n);
  for (int64_t i = 0; i < n; ++i) {
    const std::string step = "step" + std::to_string(i) + ".", unet = "unet" + std::to_string(i) + ".";
    ASSERT_TRUE(traced.count(unet + "sample") && traced.count(unet + "out")) << unet;
    EXPECT_TRUE(torch::equal(traced[unet + "timestep"], torch::tensor({timesteps[i]}, torch::kLong)));
    SD_EXPECT_CLOSE(traced[unet + "sample"], f.get(step + "latents_in"), kLatentAtol, kLatentRtol,
                    step + "latents_in");
    SD_EXPECT_CLOSE(traced[unet + "out"], f.get(step + "model_pred"), kLatentAtol, kLatentRtol, step + "model_pred");
    // The scheduler step from our UNet input/output and coefficients (the stream does not trace it per step).
    const Tensor x = traced[unet + "sample"], eps = traced[unet + "out"];
    const Tensor denoised = s.c_out()[i] * ((x - s.beta_prod_t_sqrt()[i] * eps) / s.alpha_prod_t_sqrt()[i]) +
                            s.c_skip()[i] * x;
    SD_EXPECT_CLOSE(denoised, f.get(step + "denoised"), kLatentAtol, kLatentRtol, step + "denoised");
    if (i + 1 < n)
      SD_EXPECT_CLOSE(traced["unet" + std::to_string(i + 1) + ".sample"], f.get(step + "prev_sample"), kLatentAtol,
                      kLatentRtol, step + "prev_sample");
  }
  SD_EXPECT_CLOSE(traced.at("x_0_pred_out"), f.get("denoised_final"), kLatentAtol, kLatentRtol, "denoised_final");
  SD_EXPECT_CLOSE(image, f.get("image_decoded"), kImageAtol, 0.0, "image_decoded");
  SD_EXPECT_CLOSE((image / 2 + 0.5).clamp(0, 1), f.get("image_pt"), kImageAtol, 0.0, "image_pt");
}

// Each UNet call gets the embedding of W - 1: the model set's unet() equals the UNet run with the recorded
// w_embedding at step 0 only for the recorded W; another W changes the prediction.
TEST(LcmGuidance, ModelSetPassesTheEmbeddingOfW) {
  if (!test::fixture_exists(kJson)) GTEST_SKIP() << kJson << " not in the fixture root";
  const auto j = read_json_file(test::fixture_path(kJson));
  const auto f = SafeTensorsFile::open(test::fixture_path(kTensors));
  LoadOptions lo;
  lo.threads = -1;
  lo.taesd = "none";
  lo.lcm_guidance = j.at("guidance_scale").get<double>();
  auto m = load_pipeline(test::fixture_path(kFolder), lo);
  const Tensor x = f.get("step0.latents_in"), ehs = f.get("prompt_embeds");
  const Tensor t = f.get("timesteps").slice(0, 0, 1);
  const Tensor pred = m->unet(x, t, ehs);
  SD_EXPECT_CLOSE(pred, f.get("step0.model_pred"), kLatentAtol, kLatentRtol, "step0 model_pred via unet()");
  lo.lcm_guidance = 2.0;
  auto m2 = load_pipeline(test::fixture_path(kFolder), lo);
  EXPECT_FALSE(torch::allclose(m2->unet(x, t, ehs), pred, 1e-3, 1e-3));
  // Unset: diffusers' LatentConsistencyModelPipeline default (8.5) is used and named.
  lo.lcm_guidance.reset();
  EXPECT_NE(load_pipeline(test::fixture_path(kFolder), lo)->describe().find("LCM guidance 8.5"), std::string::npos);
}

// A fixture model whose UNet has no time_cond_proj_dim, read from its config rather than assumed ("" when none).
std::string model_without_time_cond_proj() {
  for (const auto& m : test::fixture_models()) {
    const auto u = read_json_file(test::fixture_path("models/" + m + "/unet/config.json"));
    if (!u.contains("time_cond_proj_dim") || u.at("time_cond_proj_dim").is_null()) return m;
  }
  return "";
}

TEST(LcmGuidance, RefusedForUNetsWithoutTimeCondProj) {
  const std::string model = model_without_time_cond_proj();
  if (model.empty()) GTEST_SKIP() << "no fixture model without time_cond_proj_dim";
  LoadOptions lo;
  lo.threads = -1;
  lo.lcm_guidance = 8.0;
  try {
    load_pipeline(test::fixture_path("models/" + model), lo);
    FAIL() << "no error";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("time_cond_proj_dim"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace sd
