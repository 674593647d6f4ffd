#pragma once
// Shared pieces of `streamdiffusion bench`: timing with device synchronisation (medians after warm-up), memory
// figures, the known FLOP counts of the real Stable Diffusion architectures, the machine's GFLOP/s ceilings, and the
// result records that the table, the JSON and the chart are made from.
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <nlohmann/json.hpp>

namespace sd::bench {

// Seconds of each timed run plus its summary. fps is 1 / median (0 when the median is 0).
struct Timing {
  std::vector<double> samples;
  double median = 0, min = 0, max = 0, mean = 0;
  double fps() const { return median > 0 ? 1.0 / median : 0.0; }
};
Timing summarize(std::vector<double> samples);

// Runs fn `warmup` times untimed, then `iters` times timed; each run ends with a device synchronisation so CUDA
// kernels are inside the measured interval.
Timing time_runs(const c10::Device& device, int warmup, int iters, const std::function<void()>& fn);
void sync(const c10::Device& device);

double rss_mib();
double peak_rss_mib();
// Device memory held by libtorch's CUDA caching allocator on `device` (tensors allocated, MiB), now or its peak since
// the start; -1 off CUDA.
double device_allocated_mib(const c10::Device& device, bool peak = false);

// Parameter counts of the model folder's weight files (from the safetensors headers, nothing loaded), used to
// recognise the real architectures whose FLOP counts are known.
struct ArchInfo {
  int64_t unet_params = 0;
  int64_t text_params = 0;
  int64_t vae_params = 0;
  int64_t taesd_encoder_params = 0;
  int64_t taesd_decoder_params = 0;
  std::string name;  // "sd-turbo / SD2.1", "SD1.5" or "unknown"
};
// `variant` (--variant): the files a folder's components load with it (find_weights'), so that counting parameters
// reads the weights the run loads, and a folder holding only variants is counted as it loads.
ArchInfo inspect_architecture(const std::string& model_dir, const std::string& variant = "");

// GFLOP (multiply-add = 2) of one image through `component` at `size` px (square) for the real SD architectures,
// measured for the issue at 256 and 512 px (0 = unknown: other sizes or architectures). Components: text_encode,
// unet, taesd_encode, taesd_decode, vae_decode.
double known_gflop(const ArchInfo& arch, const std::string& component, int64_t size);

// The GFLOP/s ceilings of this kind of machine (2 cores, oneDNN): bf16 conv/matmul ~750-800, fp32 ~370-400. The
// upper bound is used for "% of ceiling". 0 on CUDA (no stated ceiling).
double ceiling_gflops(c10::ScalarType dtype, const c10::Device& device);

// The ceiling measured in this run: GFLOP/s of the best of `iters` n x n x n matrix products (at::mm, after one
// warm-up) in `dtype` on `device` - what libtorch's GEMM reaches on this machine and build.
double measure_matmul_gflops(c10::ScalarType dtype, const c10::Device& device, int64_t n = 2048, int iters = 3);

// One measured quantity. `name` identifies it inside its section (e.g. "unet", "txt2img", "naive"); `variant`
// says which configuration (e.g. "b2", "cfg=self", "vae=taesd").
struct Result {
  std::string section;
  std::string name;
  std::string variant;
  std::string dtype;
  int64_t size = 0;
  int64_t batch = 1;
  int64_t steps = 0;  // denoising steps (0 = not a denoising measurement)
  Timing timing;
  double gflop = 0;          // per timed run, 0 = unknown
  double gflops = 0;         // gflop / median
  double pct_ceiling = 0;    // 100 * gflops / ceiling, 0 = unknown
  double pct_measured = 0;   // 100 * gflops / the matmul ceiling measured in this run, 0 = unknown
  double rss_mib = 0;
  nlohmann::json extra = nlohmann::json::object();  // section-specific figures (component breakdowns, counts)
};

nlohmann::json to_json(const Result& r);

}  // namespace sd::bench
