// Golden tests: every case of pipeline/cases.json, lora/pipeline/cases.json and sdxl/stream/cases.json (discovered
// from the files) run with the real tiny model named by the case (with the case's LoRAs fused, in order), the recorded random draws injected
// (ReplayRng) and the recorded Python uniform draws for the filter, comparing every call's output and every recorded
// intermediate tensor (README tolerances).
#include <iostream>
#include <map>
#include <mutex>
#include <set>

#include <nlohmann/json.hpp>

#include "common/fixtures.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "pipeline/controlnet.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/image.h"
#include "pipeline/stream_diffusion.h"
#include "sdxl_single_file_fixture.h"

namespace sd {
namespace {

using torch::Tensor;

// README tolerances.
constexpr double kPipeAtol = 5e-4, kPipeRtol = 1e-4;     // outputs, latents, stock noise, buffers
constexpr double kModuleAtol = 1e-4, kModuleRtol = 1e-5;  // single module calls (text encoder rows)
constexpr double kSchedAtol = 1e-7, kSchedRtol = 1e-6;    // scheduler scalars
constexpr double kRngAtol = 1.4e-6;                       // libtorch randn vs recording (AVX2 vs scalar kernels)

const char* kCases = "pipeline/cases.json";
const char* kLoraSet = "lora/pipeline";  // the same layout, with params.loras
const char* kSdxlSet = "sdxl/stream";    // StreamDiffusion on SDXL (+ prepare.pooled / add_text_embeds / add_time_ids)
const char* kControlNetSet = "controlnet/pipeline";  // + params.controlnet / conditioning_scale / control_schedule

// Where a set's models live: sdxl/models/ for the SDXL set, models/ for the others.
std::string model_root(const std::string& set) { return set.rfind("sdxl/", 0) == 0 ? "sdxl/models/" : "models/"; }

struct GoldenCase {
  int index;
  std::string name;
  std::string set = "pipeline";  // fixture folder holding cases.json, the case files and input_images.safetensors
  std::string single_file;  // "" = the diffusers folder; else single_file/<file> loaded with --config <folder>
};

std::vector<GoldenCase> golden_cases(const std::string& set = "pipeline") {
  std::vector<GoldenCase> out;
  const std::string cases = set + "/cases.json";
  if (!test::fixture_exists(cases)) return out;
  const auto j = read_json_file(test::fixture_path(cases));
  int i = 0;
  for (const auto& c : j.at("cases")) out.push_back({i++, c.at("params").at("name").get<std::string>(), set, ""});
  return out;
}

// The same cases replayed through a single-file (LDM layout) load: every float32 file of single_file/cases.json
// holds exactly its folder's weights, so the recorded runs apply unchanged. The AutoencoderKL cases are taken (they
// run all three converted components).
std::vector<GoldenCase> single_file_cases() {
  std::vector<GoldenCase> out;
  if (!test::fixture_exists(kCases) || !test::fixture_exists("single_file/cases.json")) return out;
  const auto files = read_json_file(test::fixture_path("single_file/cases.json"));
  const auto j = read_json_file(test::fixture_path(kCases));
  for (const auto& f : files.at("files")) {
    if (f.at("dtype") != "float32") continue;
    const std::string folder = f.at("equal_diffusers_folder").get<std::string>();
    int i = 0;
    for (const auto& c : j.at("cases")) {
      const auto& p = c.at("params");
      if ("models/" + p.at("model").get<std::string>() == folder && p.at("vae") == "autoencoderkl" &&
          c.at("result").at("ok").get<bool>())
        out.push_back({i, p.at("name").get<std::string>(), "pipeline", f.at("file").get<std::string>()});
      ++i;
    }
  }
  return out;
}

// The SDXL stream cases replayed through the tiny-sdxl folder written as an SDXL single file (Stability's layout,
// sdxl_single_file_fixture.h), loaded with --config <the folder>: the weights are the folder's, so the recorded
// runs apply unchanged (AutoencoderKL and TAESDXL cases).
const char* kSdxlSingleFile = "@tiny-sdxl";
std::vector<GoldenCase> sdxl_single_file_cases() {
  auto out = golden_cases(kSdxlSet);
  for (auto& c : out) c.single_file = kSdxlSingleFile;
  return out;
}

void PrintTo(const GoldenCase& c, std::ostream* os) { *os << c.name; }

// Models are loaded once per (model, autoencoder, LoRAs, single file) and shared by the cases, as the library
// intends. `loras`: params.loras of a LoRA case ([{file, api, scale}], fused in order; file =
// lora/files/<file>.safetensors). `single_file`: single_file/<file> loaded with --config <the model's folder>.
std::shared_ptr<const DiffusionModels> models_for(const std::string& model, const std::string& vae,
                                                  const nlohmann::json& loras = nlohmann::json::array(),
                                                  const std::string& single_file = "",
                                                  const std::string& root = "models/") {
  static std::mutex mu;
  static std::map<std::string, std::shared_ptr<const DiffusionModels>> cache;
  std::lock_guard<std::mutex> lock(mu);
  const std::string key = root + model + "/" + vae + "/" + loras.dump() + "/" + single_file;
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  LoadOptions opt;
  opt.threads = -1;  // keep the test runner's setting
  for (const auto& l : loras)
    opt.loras.push_back({test::fixture_path("lora/files/" + l.at("file").get<std::string>() + ".safetensors"),
                         l.at("scale").get<double>(), ""});
  opt.strict_lora = true;
  if (vae == "taesd" || vae == "taesdxl")
    opt.taesd = test::fixture_path(root + model + "/" + vae);
  else if (vae == "autoencoderkl")
    opt.taesd = "none";
  else
    throw FormatError(kCases, "unknown vae '" + vae + "'");
  if (!single_file.empty()) opt.config = test::fixture_path(root + model);
  const std::string path = single_file.empty()               ? test::fixture_path(root + model)
                           : single_file == kSdxlSingleFile ? test::tiny_sdxl_single_file()
                                                            : test::fixture_path("single_file/" + single_file);
  auto m = load_pipeline(path, opt);
  if (!single_file.empty() && m->describe().find("single file") == std::string::npos)
    throw Error("not loaded as a single file: " + m->describe());
  cache[key] = m;
  return m;
}

// Tracks the worst error relative to its bound per tensor family for the report line.
struct ErrorReport {
  std::map<std::string, std::pair<double, double>> worst;  // family -> (max err, bound at that point)
  void add(const std::string& family, const Tensor& a, const Tensor& r, double atol, double rtol) {
    const auto ad = a.detach().to(torch::kDouble), rd = r.detach().to(torch::kDouble);
    const double err = (ad - rd).abs().max().item<double>();
    const double bound = atol + rtol * rd.abs().max().item<double>();
    auto& w = worst[family];
    if (w.second == 0 || err / bound > w.first / w.second) w = {err, bound};
  }
  std::string str() const {
    std::ostringstream o;
    for (const auto& [k, v] : worst) o << " " << k << "=" << v.first << "/" << v.second;
    return o.str();
  }
};

::testing::AssertionResult close(ErrorReport& rep, const std::string& family, const Tensor& actual, const Tensor& ref,
                                 double atol, double rtol, const std::string& what) {
  auto r = test::tensors_close(actual, ref, atol, rtol, what);
  if (actual.sizes().equals(ref.sizes())) rep.add(family, actual, ref, atol, rtol);
  return r;
}

StreamConfig config_from(const nlohmann::json& p, const SafeTensorsFile& f, int64_t vae_scale,
                         const std::string& set = "pipeline") {
  StreamConfig c;
  c.t_index_list = p.at("t_index_list").get<std::vector<int64_t>>();
  c.num_inference_steps = p.at("num_inference_steps").get<int64_t>();
  c.cfg_type = parse_cfg_type(p.at("cfg_type").get<std::string>());
  c.guidance_scale = p.at("guidance_scale").get<double>();
  c.delta = p.at("delta").get<double>();
  c.frame_buffer_size = p.at("frame_buffer_size").get<int64_t>();
  c.use_denoising_batch = p.at("use_denoising_batch").get<bool>();
  c.do_add_noise = p.at("do_add_noise").get<bool>();
  c.seed = p.at("seed").get<uint64_t>();
  // The stream size is not a parameter: it is the input images' size (README: 64x64), or for cases without
  // calls, the latent size of init_noise times the VAE scale factor.
  const auto imgs = SafeTensorsFile::open(test::fixture_path(set + "/input_images.safetensors"));
  if (f.contains("prepare.init_noise")) {
    const auto& s = f.info("prepare.init_noise").shape;
    c.height = s.at(2) * vae_scale;
    c.width = s.at(3) * vae_scale;
  } else {
    const auto& s = imgs.info("image0").shape;
    c.height = s.at(0);
    c.width = s.at(1);
  }
  const auto sf = p.value("similar_image_filter", nlohmann::json());
  if (!sf.is_null()) {
    c.similarity_filter.enabled = true;
    c.similarity_filter.threshold = sf.at("threshold").get<double>();
    c.similarity_filter.max_skip_frame = sf.at("max_skip_frame").get<int>();
    c.similarity_filter.sleep_on_skip = false;  // the reference's timer was patched to 0 s
  }
  return c;
}

// The recorded random draws rng0, rng1, ... in order (their cases.json entries give the shapes).
std::vector<Tensor> recorded_draws(const nlohmann::json& result, const SafeTensorsFile& f) {
  std::vector<Tensor> out;
  const auto& draws = result.at("random_draws");
  for (size_t j = 0; j < draws.size(); ++j) {
    const std::string kind = draws[j].at("kind").get<std::string>();
    const std::string key = "rng" + std::to_string(j) + "." + kind;
    Tensor t = f.get(key);
    EXPECT_EQ(t.sizes().vec(), draws[j].at("shape").get<std::vector<int64_t>>()) << key;
    out.push_back(t);
  }
  return out;
}

void check_prepare(StreamDiffusion& s, const nlohmann::json& params, const nlohmann::json& result,
                   const SafeTensorsFile& f, ErrorReport& rep, bool init_noise_replayed) {
  const int64_t F = s.config().frame_buffer_size;
  const auto get = [&](const std::string& k) { return f.get("prepare." + k); };
  const Tensor cond_ref = get("prompt_embeds_cond");
  const Tensor uncond_ref = get("prompt_embeds_uncond");
  EXPECT_TRUE(close(rep, "text", s.cond_embeds(), cond_ref, kModuleAtol, kModuleRtol, "prompt_embeds_cond"));
  const Tensor uncond = s.uncond_embeds().defined() ? s.uncond_embeds()
                                                    : s.models().encode_prompt(params.at("negative_prompt").get<std::string>());
  EXPECT_TRUE(close(rep, "text", uncond, uncond_ref, kModuleAtol, kModuleRtol, "prompt_embeds_uncond"));
  if (result.contains("prompt_embeds_layout") && !result.at("prompt_embeds_layout").is_null()) {
    const auto& L = result.at("prompt_embeds_layout");
    const int64_t u = L.at("uncond_rows_first").get<int64_t>(), c = L.at("cond_rows_after").get<int64_t>();
    const Tensor pe = s.prompt_embeds();
    ASSERT_EQ(pe.size(0), L.at("rows").get<int64_t>()) << "prompt_embeds rows";
    EXPECT_EQ(s.uncond_rows(), u);
    const Tensor expect = u > 0 ? torch::cat({uncond_ref.repeat({u, 1, 1}), cond_ref.repeat({c, 1, 1})}, 0)
                                : cond_ref.repeat({c, 1, 1});
    EXPECT_TRUE(close(rep, "text", pe, expect, kModuleAtol, kModuleRtol, "prompt_embeds layout"));
  }
  if (f.contains("prepare.pooled_prompt_embeds_cond")) {
    // SDXL: the pooled text of both prompts and the per-row added conditioning passed to every UNet call.
    const Tensor pooled_uncond = s.uncond_pooled().defined()
                                     ? s.uncond_pooled()
                                     : s.models().encode_text(params.at("negative_prompt").get<std::string>()).pooled;
    EXPECT_TRUE(close(rep, "text", s.cond_pooled(), get("pooled_prompt_embeds_cond"), kModuleAtol, kModuleRtol,
                      "pooled_prompt_embeds_cond"));
    EXPECT_TRUE(close(rep, "text", pooled_uncond, get("pooled_prompt_embeds_uncond"), kModuleAtol, kModuleRtol,
                      "pooled_prompt_embeds_uncond"));
    ASSERT_TRUE(s.added_conditioning().defined());
    EXPECT_TRUE(close(rep, "text", s.added_conditioning().text_embeds, get("add_text_embeds"), kModuleAtol, kModuleRtol,
                      "add_text_embeds"));
    EXPECT_TRUE(torch::equal(s.added_conditioning().time_ids, get("add_time_ids"))) << s.added_conditioning().time_ids;
  } else {
    EXPECT_FALSE(s.added_conditioning().defined());
  }
  if (init_noise_replayed)
    EXPECT_TRUE(torch::equal(s.init_noise(), get("init_noise"))) << "init_noise must be the replayed rng0";
  else
    EXPECT_TRUE(close(rep, "rng", s.init_noise(), get("init_noise"), kRngAtol, 0.0, "init_noise (TorchRng)"));
  EXPECT_TRUE(torch::equal(s.sub_timesteps_tensor(), get("sub_timesteps_tensor"))) << s.sub_timesteps_tensor();
  EXPECT_TRUE(close(rep, "coef", s.alpha_prod_t_sqrt(), get("alpha_prod_t_sqrt"), kSchedAtol, kSchedRtol, "alpha"));
  EXPECT_TRUE(close(rep, "coef", s.beta_prod_t_sqrt(), get("beta_prod_t_sqrt"), kSchedAtol, kSchedRtol, "beta"));
  // The reference keeps c_skip/c_out at n rows; this port repeats them per frame like α/β (identical for F = 1).
  for (const char* k : {"c_skip", "c_out"}) {
    Tensor ref = get(k);
    const Tensor ours = std::string(k) == "c_skip" ? s.c_skip() : s.c_out();
    if (ours.size(0) != ref.size(0)) ref = ref.repeat_interleave(F, 0);
    EXPECT_TRUE(close(rep, "coef", ours, ref, kSchedAtol, kSchedRtol, k));
  }
  EXPECT_EQ(s.timesteps(), result.at("timesteps_all").get<std::vector<int64_t>>());
  EXPECT_EQ(s.sub_timesteps(), result.at("sub_timesteps").get<std::vector<int64_t>>());
  EXPECT_EQ(s.batch_size(), result.at("batch_size").get<int64_t>());
  EXPECT_EQ(s.unet_batch_size(), result.at("trt_unet_batch_size").get<int64_t>());
  EXPECT_EQ(s.guidance_scale(), result.at("guidance_scale_effective").get<double>());
}

Tensor input_batch(const SafeTensorsFile& imgs, const nlohmann::json& ids) {
  std::vector<Tensor> xs;
  for (const auto& id : ids) xs.push_back(image_to_tensor(imgs.get("image" + std::to_string(id.get<int>()))));
  return torch::cat(xs, 0);
}

class PipelineGolden : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(PipelineGolden, MatchesReference) {
  const std::string& set = GetParam().set;
  const auto all = read_json_file(test::fixture_path(set + "/cases.json"));
  const auto& c = all.at("cases").at(GetParam().index);
  const auto& p = c.at("params");
  const auto& result = c.at("result");
  const std::string model = p.at("model").get<std::string>();
  if (!test::fixture_exists(model_root(set) + model)) GTEST_SKIP() << "model " << model << " not in the fixture root";
  const auto f = SafeTensorsFile::open(test::fixture_path(set + "/" + c.at("file").get<std::string>()));
  const auto imgs = SafeTensorsFile::open(test::fixture_path(set + "/input_images.safetensors"));
  auto models = models_for(model, p.at("vae").get<std::string>(), p.value("loras", nlohmann::json::array()),
                           GetParam().single_file, model_root(set));
  if (p.contains("loras")) {
    ASSERT_EQ(models->loras().size(), p.at("loras").size());
  }
  const StreamConfig cfg = config_from(p, f, models->vae_scale_factor(), set);
  const bool ok = result.at("ok").get<bool>();
  const std::string mode = p.at("mode").get<std::string>();
  const int n_calls = p.at("n_calls").get<int>();
  ErrorReport rep;

  if (!ok) {
    // The original cannot run this combination (see cases.json result.error). This port runs it with the intended
    // layout (spec §3.6) / CFG per sequential step; its semantics are pinned by the stub tests
    // (StreamVsSpec *_F2_*, StreamStub.BufferHoldsRenoisedPredictionsWithFixedNoise,
    // StreamStub.SequentialFullIsPlainCfgPerStep). Here: the caches the reference built before raising must match,
    // and the real model must run every call with the expected output shape.
    std::cout << "[ note ] " << GetParam().name << ": the reference raises ("
              << result.at("error").get<std::string>().substr(0, 80)
              << "...); checking prepare() and running the intended semantics\n";
    StreamDiffusion s(models, cfg, std::make_shared<TorchRng>(cfg.seed));
    s.prepare(p.at("prompt").get<std::string>(), p.at("negative_prompt").get<std::string>());
    if (f.contains("prepare.init_noise")) check_prepare(s, p, result, f, rep, false);
    for (int i = 0; i < std::max(n_calls, 3); ++i) {
      Tensor out;
      if (mode == "img2img") {
        std::vector<Tensor> xs;
        for (int64_t k = 0; k < cfg.frame_buffer_size; ++k)
          xs.push_back(image_to_tensor(imgs.get("image" + std::to_string((i * cfg.frame_buffer_size + k) % 12))));
        out = s.img2img(torch::cat(xs, 0));
      } else {
        out = s.txt2img();
      }
      EXPECT_EQ(out.sizes().vec(), (std::vector<int64_t>{cfg.frame_buffer_size, 3, cfg.height, cfg.width}));
      EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
    }
    RecordProperty("errors", rep.str());
    std::cout << "[ errors ] " << GetParam().name << ":" << rep.str() << "\n";
    return;
  }

  auto rng = std::make_shared<ReplayRng>(recorded_draws(result, f), GetParam().name);
  std::vector<double> uniforms;
  if (result.contains("python_uniform_draws"))
    uniforms = result.at("python_uniform_draws").get<std::vector<double>>();
  auto uniform = std::make_shared<ReplayUniformSource>(uniforms);
  StreamDiffusion s(models, cfg, rng, uniform);
  const bool controlnet = p.contains("controlnet");
  std::unique_ptr<SafeTensorsFile> control_images;
  if (controlnet) {
    // ControlNet cases: the case's ControlNet at its conditioning scale; control images set before the listed calls.
    s.set_controlnets({{ControlNet::load(test::fixture_path("controlnet/" + p.at("controlnet").get<std::string>()),
                                         *models),
                        p.at("conditioning_scale").get<double>()}});
    control_images = std::make_unique<SafeTensorsFile>(
        SafeTensorsFile::open(test::fixture_path("controlnet/control_images.safetensors")));
  }
  std::map<std::string, Tensor> traced;
  s.set_trace([&](const std::string& name, const Tensor& t) { traced[name] = t.detach().clone(); });
  s.prepare(p.at("prompt").get<std::string>(), p.at("negative_prompt").get<std::string>());
  check_prepare(s, p, result, f, rep, true);
  const Tensor init_noise0 = s.init_noise().clone();

  // Tensor names of each call, from the file.
  std::map<int, std::set<std::string>> per_call;
  for (const auto& key : f.keys()) {
    if (key.rfind("call", 0) != 0) continue;
    const auto dot = key.find('.');
    per_call[std::stoi(key.substr(4, dot - 4))].insert(key.substr(dot + 1));
  }
  const auto& calls = result.at("calls");
  ASSERT_EQ(static_cast<int>(calls.size()), n_calls);
  for (int i = 0; i < n_calls; ++i) {
    SCOPED_TRACE("call " + std::to_string(i));
    const auto& call = calls.at(i);
    traced.clear();
    const int64_t unet_before = s.stats().unet_calls;
    if (call.contains("set_control_image"))
      s.set_control_image(0, control_images->get(call.at("set_control_image").get<std::string>()));
    Tensor out;
    if (mode == "img2img")
      out = s.img2img(input_batch(imgs, call.at("input_image_ids")));
    else
      out = s.txt2img();
    if (call.contains("skipped_by_similarity_filter") && call.at("skipped_by_similarity_filter").is_boolean()) {
      const bool skipped = call.at("skipped_by_similarity_filter").get<bool>();
      if (cfg.similarity_filter.enabled) {
        EXPECT_EQ(!s.last_filter_decision().process, skipped);
      } else {
        EXPECT_FALSE(skipped) << "the reference skipped a call without a filter";
      }
    }
    EXPECT_EQ(s.stats().unet_calls - unet_before, call.at("unet_calls").get<int64_t>());

    const std::string pre = "call" + std::to_string(i) + ".";
    for (const auto& name : per_call[i]) {
      const Tensor ref = f.get(pre + name);
      const std::string what = pre + name;
      if (name == "control_image_u8") {
        // The input itself: the image set before this call.
        EXPECT_TRUE(torch::equal(ref, control_images->get(call.at("set_control_image").get<std::string>()))) << what;
      } else if (name == "output") {
        EXPECT_TRUE(close(rep, "output", out, ref, kPipeAtol, kPipeRtol, what));
      } else if (name == "stock_noise_after") {
        EXPECT_TRUE(close(rep, "state", s.stock_noise(), ref, kPipeAtol, kPipeRtol, what));
      } else if (name == "x_t_latent_buffer_after") {
        ASSERT_TRUE(s.latent_buffer().defined()) << what;
        EXPECT_TRUE(close(rep, "state", s.latent_buffer(), ref, kPipeAtol, kPipeRtol, what));
      } else if (name == "init_noise_after") {
        EXPECT_TRUE(close(rep, "state", s.init_noise(), ref, kPipeAtol, kPipeRtol, what));
      } else if (name.size() > 9 && name.compare(name.size() - 9, 9, ".timestep") == 0) {
        ASSERT_TRUE(traced.count(name)) << what << " was not produced";
        EXPECT_TRUE(torch::equal(traced[name], ref)) << what << ": " << traced[name] << " vs " << ref;
      } else if (name == "image_latent" || name == "x_t_latent_in" || name == "x_0_pred_out" ||
                 name.rfind("unet", 0) == 0) {
        ASSERT_TRUE(traced.count(name)) << what << " was not produced";
        EXPECT_TRUE(close(rep, "latent", traced[name], ref, kPipeAtol, kPipeRtol, what));
      } else {
        ADD_FAILURE() << "unhandled fixture tensor " << what;
      }
    }
    // State the reference leaves out when it is zero / unchanged / absent.
    if (!per_call[i].count("stock_noise_after")) {
      EXPECT_EQ(s.stock_noise().abs().max().item<double>(), 0.0) << "stock_noise should still be zero";
    }
    if (!per_call[i].count("init_noise_after")) {
      EXPECT_TRUE(torch::equal(s.init_noise(), init_noise0));
    }
    if (!per_call[i].count("x_t_latent_buffer_after")) {
      EXPECT_FALSE(s.latent_buffer().defined());
    }
    // Nothing traced that the reference did not record (a skipped call produces nothing).
    // (ControlNet residuals are recorded for the calls in record_residuals only.)
    for (const auto& [name, t] : traced)
      EXPECT_TRUE(per_call[i].count(name) || (controlnet && name.find(".controlnet_") != std::string::npos))
          << "produced " << pre + name << " which the reference does not have";
  }
  EXPECT_EQ(rng->remaining(), 0u) << "recorded random draws left unused";
  EXPECT_EQ(uniform->consumed(), uniforms.size()) << "recorded uniform draws left unused";
  RecordProperty("errors", rep.str());
  std::cout << "[ errors ] " << GetParam().name << ":" << rep.str() << "\n";
}

INSTANTIATE_TEST_SUITE_P(Fixture, PipelineGolden, ::testing::ValuesIn(golden_cases()),
                         [](const auto& info) { return test::test_name(info.param.name); });
// StreamDiffusion with fused LoRAs (fixtures README "LoRA", pipeline cases): the same checks.
INSTANTIATE_TEST_SUITE_P(Lora, PipelineGolden, ::testing::ValuesIn(golden_cases(kLoraSet)),
                         [](const auto& info) { return test::test_name(info.param.name); });
// StreamDiffusion on SDXL (fixtures README "SDXL"): the original algorithm plus only the added conditioning.
INSTANTIATE_TEST_SUITE_P(Sdxl, PipelineGolden, ::testing::ValuesIn(golden_cases(kSdxlSet)),
                         [](const auto& info) { return test::test_name(info.param.name); });
// StreamDiffusion + ControlNet (fixtures README "ControlNet"): every UNet call runs the ControlNet on its batch.
INSTANTIATE_TEST_SUITE_P(ControlNet, PipelineGolden, ::testing::ValuesIn(golden_cases(kControlNetSet)),
                         [](const auto& info) { return test::test_name(info.param.name); });
INSTANTIATE_TEST_SUITE_P(SdxlSingleFile, PipelineGolden, ::testing::ValuesIn(sdxl_single_file_cases()),
                         [](const auto& info) { return test::test_name("tiny_sdxl_" + info.param.name); });
INSTANTIATE_TEST_SUITE_P(SingleFile, PipelineGolden, ::testing::ValuesIn(single_file_cases()),
                         [](const auto& info) { return test::test_name(info.param.single_file + "_" + info.param.name); });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(PipelineGolden);

}  // namespace
}  // namespace sd

namespace sd {
namespace {

// Reduced precision: the same stream in bf16 (weights, activations, latents, coefficients) follows the float32
// reference loosely. The README's tolerances are for float32; bf16 keeps ~3 significant digits, so the bound here
// is 0.1 + 0.05 * max|ref| on the decoded images. Returns the max abs error over the calls.
double bf16_follows_reference(const std::string& set, const std::string& name) {
  const auto all = read_json_file(test::fixture_path(set + "/cases.json"));
  const nlohmann::json* c = nullptr;
  for (const auto& x : all.at("cases"))
    if (x.at("params").at("name") == name) c = &x;
  EXPECT_NE(c, nullptr);
  if (!c) return 0;
  const auto& p = c->at("params");
  const auto f = SafeTensorsFile::open(test::fixture_path(set + "/" + c->at("file").get<std::string>()));
  const auto imgs = SafeTensorsFile::open(test::fixture_path(set + "/input_images.safetensors"));
  LoadOptions opt;
  opt.dtype = torch::kBFloat16;
  opt.threads = -1;
  opt.taesd = test::fixture_path("models/tiny-sd15/taesd");
  for (const auto& l : p.value("loras", nlohmann::json::array()))
    opt.loras.push_back({test::fixture_path("lora/files/" + l.at("file").get<std::string>() + ".safetensors"),
                         l.at("scale").get<double>(), ""});
  auto models = load_pipeline(test::fixture_path("models/tiny-sd15"), opt);
  const StreamConfig cfg = config_from(p, f, models->vae_scale_factor(), set);
  StreamDiffusion s(models, cfg, std::make_shared<ReplayRng>(recorded_draws(c->at("result"), f)));
  std::unique_ptr<SafeTensorsFile> control_images;
  if (p.contains("controlnet")) {
    s.set_controlnets({{ControlNet::load(test::fixture_path("controlnet/" + p.at("controlnet").get<std::string>()),
                                         *models),
                        p.at("conditioning_scale").get<double>()}});
    control_images = std::make_unique<SafeTensorsFile>(
        SafeTensorsFile::open(test::fixture_path("controlnet/control_images.safetensors")));
  }
  s.prepare(p.at("prompt").get<std::string>(), p.at("negative_prompt").get<std::string>());
  EXPECT_EQ(s.init_noise().scalar_type(), torch::kBFloat16);
  EXPECT_EQ(s.alpha_prod_t_sqrt().scalar_type(), torch::kBFloat16);
  double worst = 0;
  const auto& calls = c->at("result").at("calls");
  for (size_t i = 0; i < calls.size(); ++i) {
    if (calls[i].contains("set_control_image"))
      s.set_control_image(0, control_images->get(calls[i].at("set_control_image").get<std::string>()));
    const Tensor out = p.at("mode") == "txt2img" ? s.txt2img()
                                                 : s.img2img(input_batch(imgs, calls[i].at("input_image_ids")));
    EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
    const Tensor ref = f.get("call" + std::to_string(i) + ".output");
    EXPECT_TRUE(test::tensors_close(out.to(torch::kFloat32), ref, 0.1, 0.05, "bf16 call" + std::to_string(i)));
    worst = std::max(worst, (out.to(torch::kFloat32) - ref).abs().max().item<double>());
  }
  std::cout << "[ errors ] bf16 " << name << ": output max abs err " << worst << "\n";
  return worst;
}

// Measured 0.068 max abs on this case.
TEST(PipelineReducedPrecision, Bf16FollowsTheFloat32Reference) {
  const std::string name = "sd15_img2img_self_t2_fb1_batch_taesd";
  if (!test::fixture_exists("pipeline/" + name + ".safetensors")) GTEST_SKIP() << "case absent";
  RecordProperty("bf16_max_abs_err", std::to_string(bf16_follows_reference("pipeline", name)));
}

// The same with one and with two LoRAs fused (bf16 weights fused in float32 from the bf16 base): the same bound holds
// (measured 0.056 and 0.058 max abs).
TEST(PipelineReducedPrecision, Bf16WithLorasFollowsTheFloat32Reference) {
  for (const std::string name : {"sd15_lora_img2img_self_t2", "sd15_2lora_img2img_self_t2"}) {
    if (!test::fixture_exists(std::string(kLoraSet) + "/" + name + ".safetensors")) GTEST_SKIP() << "case absent";
    RecordProperty("bf16_max_abs_err_" + name, std::to_string(bf16_follows_reference(kLoraSet, name)));
  }
}

// StreamDiffusion + ControlNet in bf16 (the ControlNet cast to the model set's dtype, its residuals added in bf16):
// the same bound holds on every ControlNet case (measured 0.039, 0.055 and 0.040 max abs).
TEST(PipelineReducedPrecision, Bf16WithControlNetFollowsTheFloat32Reference) {
  for (const std::string name : {"sd15_cn_img2img_self_t2", "sd15_cn_txt2img_none_t2", "sd15_cn_img2img_initialize_t2"}) {
    if (!test::fixture_exists(std::string(kControlNetSet) + "/" + name + ".safetensors")) GTEST_SKIP() << "case absent";
    RecordProperty("bf16_max_abs_err_" + name, std::to_string(bf16_follows_reference(kControlNetSet, name)));
  }
}

}  // namespace
}  // namespace sd
