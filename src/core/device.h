#pragma once
// Device, dtype and thread selection shared by every layer.
#include <optional>
#include <string>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

namespace sd {

// The one place dtype names are read: "fp32" | "float32" | "bf16" | "bfloat16" | "fp16" | "float16" -> dtype, and
// "auto" (auto_dtype for that device) where the caller gives the device it runs on; anything else throws
// InvalidArgument listing what is accepted.
c10::ScalarType parse_dtype(const std::string& name, std::optional<c10::Device> device = std::nullopt);
std::string dtype_name(c10::ScalarType t);  // "fp32", "bf16", "fp16", or c10's name for others

// What "auto" runs in: fp16 on CUDA; on a CPU bf16 where it computes bf16 natively (avx512_bf16 or amx_bf16 among
// `cpu_flags`, the "flags" line of /proc/cpuinfo), else fp32 - emulated bf16 is many times slower than fp32 (27x
// seen on an AVX2 CPU), and fp32 is also the choice when the flags are unknown (empty).
c10::ScalarType auto_dtype(const c10::Device& device, const std::string& cpu_flags);
c10::ScalarType auto_dtype(const c10::Device& device);  // with this machine's flags

// "cpu" | "cuda" | "cuda:N"; cuda without a CUDA build/device is a clear error.
c10::Device parse_device(const std::string& name);

// cuDNN's autotuner (cudnn.benchmark) for a CUDA device: a stream runs the same shapes every frame, so timing cuDNN's
// convolution algorithms once per shape - at the first call of each, which runs eagerly before any CUDA graph capture
// - beats its heuristic pick at no cost per frame. PyTorch leaves it off. On for CUDA devices unless
// SD_CUDNN_BENCHMARK=0 (to compare); called by every model load. Returns whether it is on (false off CUDA, where it
// changes nothing).
bool configure_cuda_backend(const c10::Device& device);
// The project's comparison switches (SD_CUDNN_BENCHMARK, SD_CUDA_CHANNELS_LAST, SD_ONE_CONV_COPY): on unless the
// variable `name` is exactly "0".
bool env_switch_on(const char* name);

// Sets libtorch's intra-op thread count (0 = number of cores) and returns what is in force. libtorch as packaged
// here defaults to 1 thread, so every entry point calls this explicitly.
// OpenBLAS (fp32 matrix products in Debian's libtorch) is pinned to one thread as well, see pin_blas_threads().
int set_threads(int n);
int hardware_threads();

// Pins OpenBLAS to one thread (where libtorch calls it). OpenBLAS's own workers spin-wait next to libtorch's OpenMP
// team: on 2 cores under a competing CPU load, fp32 streams ran at a third of the frame rate with 7x more frames over
// 10x the median and 1.6 s frames (src/runtime/README.md, "The stall"). Done by set_threads() and by every model load,
// whatever its thread setting. Returns OpenBLAS's thread count afterwards (0 where there is no OpenBLAS). The fp32
// linear layers then split their products across libtorch's own threads (models/cpu_parallel.h).
int pin_blas_threads();
// Whether libtorch's fp32 products run on one thread: OpenBLAS pinned (pin_blas_threads()). False without OpenBLAS.
bool blas_single_threaded();
// Warns once when the environment makes libgomp's workers spin without end (OMP_WAIT_POLICY=ACTIVE or an infinite
// GOMP_SPINCOUNT): under a competing CPU load that made frames 3x slower, with 2 s stalls (measured, same README).
// Returns the warning ("" = none).
std::string openmp_wait_policy_warning();

// Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16). Without it oneDNN emulates bf16 and it is
// slower than fp32 (seen: an AVX2-only EPYC). Read from /proc/cpuinfo; true where that cannot be read (unknown).
bool cpu_has_native_bf16();
// Whether oneDNN has bf16 kernels on this CPU (AVX-512 BW/VL/DQ, or AMX); elsewhere bf16 convolutions and matrix
// products fall back to slow generic code. True where /proc/cpuinfo cannot be read (unknown).
bool cpu_has_onednn_bf16();
// `--dtype int8` runs the UNet's convolutions and linear layers in int8 (LoadOptions::int8) and everything else in
// this float dtype: bf16 where the CPU computes it natively, else fp32. dtype_name(c10::kQInt8) is "int8", the mode's
// label in bench rows.
c10::ScalarType int8_float_dtype();
// Whether this CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8), which oneDNN's int8
// kernels need to beat the float path. True where /proc/cpuinfo cannot be read (unknown).
bool cpu_has_int8_dot();
// The CPU's SIMD level for logs and bench output: "amx_bf16", "avx512_bf16", "avx512", "avx2", "sse" or "unknown".
std::string cpu_simd_level();
// Whether oneDNN runs its AMX kernels here: the CPU has AMX-BF16 and ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA (read by
// oneDNN once, at its first use) do not cap it below AMX. On a 2-core Xeon with AMX, Debian's oneDNN 2.6.3 measured
// 240-320 GFLOP/s for a 2048^3 bf16 matmul with AMX and 54 capped at AVX512_CORE_BF16.
bool onednn_amx_active();

}  // namespace sd
