#include "apps/cli/bench_util.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <numeric>

#include <torch/cuda.h>
#include <torch/torch.h>
#if SD_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "core/device.h"
#include "models/int8.h"
#include "models/layers.h"
#include "core/error.h"
#include "io/model_folder.h"
#include "io/safetensors.h"

namespace sd::bench {

Timing summarize(std::vector<double> samples) {
  Timing t;
  t.samples = samples;
  if (samples.empty()) return t;
  std::sort(samples.begin(), samples.end());
  const size_t n = samples.size();
  t.median = n % 2 ? samples[n / 2] : 0.5 * (samples[n / 2 - 1] + samples[n / 2]);
  t.min = samples.front();
  t.max = samples.back();
  t.mean = std::accumulate(samples.begin(), samples.end(), 0.0) / static_cast<double>(n);
  return t;
}

void sync(const c10::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize();
}

Timing time_runs(const c10::Device& device, int warmup, int iters, const std::function<void()>& fn) {
  using Clock = std::chrono::steady_clock;
  for (int i = 0; i < warmup; ++i) fn();
  sync(device);
  std::vector<double> s;
  for (int i = 0; i < std::max(1, iters); ++i) {
    const auto t0 = Clock::now();
    fn();
    sync(device);
    s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return summarize(std::move(s));
}

double rss_mib() {
  std::ifstream in("/proc/self/statm");
  long pages_total = 0, pages_rss = 0;
  in >> pages_total >> pages_rss;
  return static_cast<double>(pages_rss) * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
}

double peak_rss_mib() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;
}

double device_allocated_mib(const c10::Device& device, bool peak) {
#if SD_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.has_index() ? device.index() : 0);
    const auto& all = stats.allocated_bytes[0];  // StatType::AGGREGATE
    return static_cast<double>(peak ? all.peak : all.current) / (1024.0 * 1024.0);
  }
#endif
  (void)device;
  (void)peak;
  return -1.0;
}

namespace {

// Sum of numel over the tensors of a safetensors file whose name starts with `prefix`.
int64_t count_file_params(const std::string& path, const std::string& prefix = "") {
  const SafeTensorsFile f = SafeTensorsFile::open(path);
  int64_t n = 0;
  for (const auto& t : f.tensors())
    if (t.name.rfind(prefix, 0) == 0) n += static_cast<int64_t>(t.numel());
  return n;
}

}  // namespace

ArchInfo inspect_architecture(const std::string& model_dir, const std::string& variant) {
  ArchInfo a;
  if (is_file(model_dir)) {
    // A single-file (LDM layout) checkpoint: components by prefix (SD 2.x files hold one more OpenCLIP layer than
    // the model uses, so their text-encoder count is not a folder's). SDXL (conditioner.embedders.*): the text count
    // is text_encoder's (CLIP ViT-L, embedders.0), as a folder's text_encoder/ is.
    a.unet_params = count_file_params(model_dir, "model.diffusion_model.");
    a.text_params = count_file_params(model_dir, "cond_stage_model.");
    if (a.text_params == 0) a.text_params = count_file_params(model_dir, "conditioner.embedders.0.");
    a.vae_params = count_file_params(model_dir, "first_stage_model.");
  } else {
    const ModelFolder folder = ModelFolder::open(model_dir);
    a.unet_params = count_file_params(folder.weights_path("unet", variant));
    a.text_params = count_file_params(folder.weights_path("text_encoder", variant));
    try {
      a.vae_params = count_file_params(folder.weights_path("vae", variant));
    } catch (const FormatError&) {
      a.vae_params = 0;  // a TAESD-only model (models/emoji-tiny): vae/ holds only a config
    }
    if (auto taesd = folder.taesd_dir()) {
      const std::string w = find_weights(*taesd, variant);
      a.taesd_encoder_params = count_file_params(w, "encoder.");
      a.taesd_decoder_params = count_file_params(w, "decoder.");
    }
  }
  if (a.unet_params == 865910724)
    a.name = "sd-turbo / SD2.1";
  else if (a.unet_params == 859520964)
    a.name = "SD1.5";
  else if (a.unet_params == 323384964)
    a.name = "BK-SDM-Tiny";
  else if (a.unet_params == 328177284)
    a.name = "SDXS-512-0.9";
  else if (a.unet_params == 2567463684)
    a.name = "SDXL / SDXL-Turbo";
  else
    a.name = "unknown (" + std::to_string(a.unet_params) + " UNet parameters)";
  return a;
}

double known_gflop(const ArchInfo& a, const std::string& component, int64_t size) {
  const bool s256 = size == 256, s512 = size == 512;
  const bool sd_unet = a.unet_params == 865910724 || a.unet_params == 859520964;
  // The distilled UNets (counted like the SD ones: 2 FLOP per multiply-add of convs, linears and attention
  // products): BK-SDM-Tiny 109 / 486 GFLOP at 256 / 512 px, SDXS-512-0.9 105 / 418.
  const bool bk_tiny = a.unet_params == 323384964, sdxs = a.unet_params == 328177284;
  if (component == "text_encode") return a.text_params == 340387840 ? 45 : 0;  // sd-turbo / SD2.1 OpenCLIP-H
  // SDXL's UNet (2 FLOP per multiply-add): 1,588.8 GFLOP at 512 px (sdxl-turbo), 6,761.2 at 1024 (SDXL base).
  if (component == "unet" && a.unet_params == 2567463684) return s512 ? 1588.8 : size == 1024 ? 6761.2 : 0;
  if (!s256 && !s512) return 0;
  if (component == "unet" && sd_unet) return s256 ? 181 : 804;
  if (component == "unet" && bk_tiny) return s256 ? 109 : 486;
  if (component == "unet" && sdxs) return s256 ? 105 : 418;
  if (component == "taesd_encode" && a.taesd_encoder_params == 1222532) return s256 ? 31 : 122;
  if (component == "taesd_decode" && a.taesd_decoder_params == 1222531) return s256 ? 35 : 141;
  const bool sdxl_unet = a.unet_params == 2567463684;  // SDXL's VAE is SD's architecture (its own weights)
  if (component == "vae_decode" && a.vae_params > 80000000 && (sd_unet || bk_tiny || sdxs || sdxl_unet))
    return s256 ? 622 : 2515;
  return 0;
}

double ceiling_gflops(c10::ScalarType dtype, const c10::Device& device) {
  if (!device.is_cpu()) return 0;
  if (dtype == c10::kBFloat16) return 800;
  if (dtype == c10::kFloat) return 400;
  return 0;
}

double measure_matmul_gflops(c10::ScalarType dtype, const c10::Device& device, int64_t n, int iters) {
  torch::NoGradGuard ng;
  if (dtype == c10::kQInt8) {  // the int8 mode: oneDNN's int8 product (activation quantization included)
    const auto a = torch::randn({n, n}).to(sd::int8_float_dtype());
    const auto w = sd::int8::pack_linear(torch::randn({n, n}), torch::Tensor());
    double best = 0;
    for (int i = 0; i <= iters; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      const auto c = sd::int8::linear(a, w);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (i > 0) best = std::max(best, 2.0 * static_cast<double>(n) * n * n / s / 1e9);
    }
    return best;
  }
  const auto opt = torch::TensorOptions().dtype(dtype).device(device);
  const auto a = torch::randn({n, n}, opt), b = torch::randn({n, n}, opt);
  // Where OpenBLAS is pinned to one thread, the engine's fp32 linear layers split their products across the intra-op
  // threads (models/cpu_parallel.h): the ceiling is that product, not one BLAS call on one core.
  double best = 0;
  for (int i = 0; i <= iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto c = sd::nn::float_linear(a, b, torch::Tensor());
    (void)c.sum().item<float>();  // waits for the device
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (i > 0) best = std::max(best, 2.0 * static_cast<double>(n) * n * n / s / 1e9);
  }
  return best;
}

nlohmann::json to_json(const Result& r) {
  nlohmann::json j = {{"section", r.section},
                      {"name", r.name},
                      {"variant", r.variant},
                      {"dtype", r.dtype},
                      {"size", r.size},
                      {"batch", r.batch},
                      {"steps", r.steps},
                      {"median_s", r.timing.median},
                      {"min_s", r.timing.min},
                      {"max_s", r.timing.max},
                      {"mean_s", r.timing.mean},
                      {"samples_s", r.timing.samples},
                      {"iters", r.timing.samples.size()},
                      {"fps", r.timing.fps()},
                      {"gflop", r.gflop},
                      {"gflops", r.gflops},
                      {"pct_ceiling", r.pct_ceiling},
                      {"pct_measured_ceiling", r.pct_measured},
                      {"rss_mib", r.rss_mib}};
  if (!r.extra.empty()) j["extra"] = r.extra;
  return j;
}

}  // namespace sd::bench
