#include "core/device.h"

#include <cctype>
#include <cstdlib>

#include <fstream>
#include <mutex>
#include <thread>

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/cuda.h>

#include "core/error.h"
#include "core/log.h"

// Debian's libtorch calls OpenBLAS for fp32 matrix products; OpenBLAS then runs its own worker threads next to
// libtorch's intra-op threads (oversubscription: measured 1.4x slower on sd-turbo, far worse under load). Weak, so
// builds against a libtorch without OpenBLAS (MKL, CUDA wheels) link and simply skip it.
extern "C" void openblas_set_num_threads(int) __attribute__((weak));
extern "C" int openblas_get_num_threads() __attribute__((weak));

namespace sd {

c10::ScalarType parse_dtype(const std::string& name, std::optional<c10::Device> device) {
  if (name == "auto" && device) return auto_dtype(*device);
  if (name == "fp32" || name == "float32" || name == "float") return c10::kFloat;
  if (name == "bf16" || name == "bfloat16") return c10::kBFloat16;
  if (name == "fp16" || name == "float16" || name == "half") return c10::kHalf;
  throw InvalidArgument("unknown dtype '" + name + "' (expected " + (device ? "auto, " : "") + "fp32, bf16 or fp16)");
}

std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "fp32";
    case c10::kBFloat16: return "bf16";
    case c10::kHalf: return "fp16";
    case c10::kDouble: return "fp64";
    case c10::kQInt8: return "int8";  // the int8 mode's label (int8_float_dtype)
    default: return c10::toString(t);
  }
}

c10::Device parse_device(const std::string& name) {
  if (name == "cpu") return c10::Device(c10::kCPU);
  if (name.rfind("cuda", 0) == 0) {
    if (!torch::cuda::is_available())
      throw InvalidArgument("device '" + name + "' requested but this build of libtorch has no usable CUDA device");
    try {
      return c10::Device(name);
    } catch (const std::exception&) {
      throw InvalidArgument("bad device '" + name + "' (expected cpu, cuda or cuda:N)");
    }
  }
  throw InvalidArgument("unknown device '" + name + "' (expected cpu, cuda or cuda:N)");
}

bool env_switch_on(const char* name) {
  const char* v = std::getenv(name);
  return !(v && std::string(v) == "0");
}

bool configure_cuda_backend(const c10::Device& device) {
  if (!device.is_cuda()) return false;
  const bool on = env_switch_on("SD_CUDNN_BENCHMARK");
  if (at::globalContext().benchmarkCuDNN() != on) {
    at::globalContext().setBenchmarkCuDNN(on);
    log::info("cuDNN autotuner {} (SD_CUDNN_BENCHMARK{})", on ? "on" : "off", on ? "=0 turns it off" : "=0");
  }
  return on;
}

int hardware_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

namespace {

// The "flags" line of the first processor in /proc/cpuinfo, as " flag1 flag2 ... " (empty when unreadable).
const std::string& cpu_flags() {
  static const std::string flags = [] {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line))
      if (line.rfind("flags", 0) == 0) {
        const auto colon = line.find(':');
        if (colon != std::string::npos) return " " + line.substr(colon + 1) + " ";
      }
    return std::string();
  }();
  return flags;
}

// Whether `flags` (a "flags" line, space-separated) holds the flag `f` as a whole word.
bool flags_have(const std::string& flags, const char* f) {
  const std::string padded = " " + flags + " ";
  return padded.find(" " + std::string(f) + " ") != std::string::npos;
}

bool has_flag(const char* f) { return flags_have(cpu_flags(), f); }

}  // namespace

c10::ScalarType auto_dtype(const c10::Device& device, const std::string& cpu_flags) {
  if (device.is_cuda()) return c10::kHalf;
  if (flags_have(cpu_flags, "avx512_bf16") || flags_have(cpu_flags, "amx_bf16")) return c10::kBFloat16;
  return c10::kFloat;
}

c10::ScalarType auto_dtype(const c10::Device& device) { return auto_dtype(device, cpu_flags()); }

bool cpu_has_native_bf16() {
  if (cpu_flags().empty()) return true;
  return has_flag("avx512_bf16") || has_flag("amx_bf16");
}

bool cpu_has_onednn_bf16() {
  if (cpu_flags().empty()) return true;
  return (has_flag("avx512bw") && has_flag("avx512vl") && has_flag("avx512dq")) || has_flag("amx_bf16");
}

c10::ScalarType int8_float_dtype() { return cpu_has_native_bf16() ? c10::kBFloat16 : c10::kFloat; }

bool cpu_has_int8_dot() {
  if (cpu_flags().empty()) return true;
  return has_flag("avx512_vnni") || has_flag("avx_vnni") || has_flag("amx_int8");
}

std::string cpu_simd_level() {
  if (cpu_flags().empty()) return "unknown";
  if (has_flag("amx_bf16")) return "amx_bf16";
  if (has_flag("avx512_bf16")) return "avx512_bf16";
  if (has_flag("avx512f")) return "avx512";
  if (has_flag("avx2")) return "avx2";
  return "sse";
}

bool onednn_amx_active() {
  if (!has_flag("amx_bf16")) return false;
  for (const char* var : {"ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"}) {
    const char* v = std::getenv(var);
    if (!v || !*v) continue;
    std::string isa(v);
    for (auto& ch : isa) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    return isa == "ALL" || isa.find("AMX") != std::string::npos;
  }
  return true;
}

int pin_blas_threads() {
  if (!openblas_set_num_threads) return 0;
  openblas_set_num_threads(1);
  return openblas_get_num_threads ? openblas_get_num_threads() : 1;
}

bool blas_single_threaded() { return openblas_get_num_threads && openblas_get_num_threads() == 1; }

std::string openmp_wait_policy_warning() {
  std::string what;
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  const char* spin = std::getenv("GOMP_SPINCOUNT");
  std::string p = policy ? policy : "", s = spin ? spin : "";
  for (auto& ch : p) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (p == "ACTIVE")
    what = "OMP_WAIT_POLICY=ACTIVE";
  else if (s == "infinite" || s == "infinity")
    what = "GOMP_SPINCOUNT=" + std::string(spin);
  if (what.empty()) return "";
  static std::once_flag once;
  const std::string warning = what + " makes the OpenMP workers spin without end: under a competing CPU load frames "
                                     "ran 3x slower with 2 s stalls (measured); unset it for live streams";
  std::call_once(once, [&] { log::warn("{}", warning); });
  return warning;
}

int set_threads(int n) {
  if (n <= 0) n = hardware_threads();
  at::set_num_threads(n);
  pin_blas_threads();
  openmp_wait_policy_warning();
  return at::get_num_threads();
}

}  // namespace sd
