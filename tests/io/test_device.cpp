// CPU feature detection used to warn about emulated bf16 and reported by the bench; the dtype "auto" picks from it.
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>

#include <gtest/gtest.h>

#include <ATen/Context.h>

#include "core/device.h"
#include "core/error.h"

namespace {

TEST(Device, SimdLevelAgreesWithNativeBf16AndCpuinfo) {
  const std::string level = sd::cpu_simd_level();
  const std::set<std::string> known = {"amx_bf16", "avx512_bf16", "avx512", "avx2", "sse", "unknown"};
  ASSERT_EQ(known.count(level), 1u) << level;
  const bool native = sd::cpu_has_native_bf16();
  if (level == "amx_bf16" || level == "avx512_bf16" || level == "unknown") {
    EXPECT_TRUE(native) << level;
  } else {
    EXPECT_FALSE(native) << level;
  }
  std::ifstream in("/proc/cpuinfo");
  if (!in) GTEST_SKIP() << "no /proc/cpuinfo";
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string info = ss.str();
  const auto flags_at = info.find("\nflags");
  if (flags_at == std::string::npos) GTEST_SKIP() << "no flags line in /proc/cpuinfo";
  const std::string flags = info.substr(flags_at, info.find('\n', flags_at + 1) - flags_at) + " ";
  EXPECT_EQ(native, flags.find(" avx512_bf16 ") != std::string::npos || flags.find(" amx_bf16 ") != std::string::npos);
  EXPECT_EQ(level == "avx2", flags.find(" avx2 ") != std::string::npos && flags.find(" avx512f ") == std::string::npos);
  std::cout << "  [cpu] SIMD " << level << ", native bf16 " << (native ? "yes" : "no") << "\n";
}

// "auto" from injected flags: bf16 only where the CPU has it natively, fp16 on CUDA whatever the CPU, else fp32.
TEST(Device, AutoDtypeFromCpuFlags) {
  const c10::Device cpu(c10::kCPU), cuda(c10::kCUDA, 0);
  const std::string avx2 = "fpu sse sse2 avx avx2 fma";
  const std::string avx512 = avx2 + " avx512f avx512dq avx512bw avx512vl";
  EXPECT_EQ(sd::auto_dtype(cpu, avx2), c10::kFloat);
  EXPECT_EQ(sd::auto_dtype(cpu, avx512), c10::kFloat) << "AVX-512 without BF16: emulated, slower than fp32";
  EXPECT_EQ(sd::auto_dtype(cpu, avx512 + " avx512_bf16"), c10::kBFloat16);
  EXPECT_EQ(sd::auto_dtype(cpu, "amx_bf16 " + avx512 + " amx_tile"), c10::kBFloat16);
  EXPECT_EQ(sd::auto_dtype(cpu, avx512 + " avx512_bf16x amx_bf16_foo"), c10::kFloat) << "whole flags only";
  EXPECT_EQ(sd::auto_dtype(cpu, ""), c10::kFloat) << "unknown flags: the safe choice";
  EXPECT_EQ(sd::auto_dtype(cuda, avx2), c10::kHalf);
  EXPECT_EQ(sd::auto_dtype(cuda, avx512 + " amx_bf16"), c10::kHalf);
  // This machine: what the bf16 warning's check says.
  EXPECT_EQ(sd::auto_dtype(cpu) == c10::kBFloat16, sd::cpu_simd_level() == "amx_bf16" || sd::cpu_simd_level() == "avx512_bf16");
}

TEST(Device, ParseDtypeTakesAutoOnlyWithADevice) {
  const c10::Device cpu(c10::kCPU);
  EXPECT_EQ(sd::parse_dtype("auto", cpu), sd::auto_dtype(cpu));
  EXPECT_EQ(sd::parse_dtype("fp32", cpu), c10::kFloat);
  EXPECT_EQ(sd::parse_dtype("bfloat16", cpu), c10::kBFloat16);
  EXPECT_EQ(sd::parse_dtype("fp16"), c10::kHalf);
  try {
    sd::parse_dtype("auto");
    ADD_FAILURE() << "auto without a device";
  } catch (const sd::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("expected fp32, bf16 or fp16"), std::string::npos) << e.what();
  }
  try {
    sd::parse_dtype("fp64", cpu);
    ADD_FAILURE() << "fp64";
  } catch (const sd::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("unknown dtype 'fp64' (expected auto, fp32, bf16 or fp16)"), std::string::npos)
        << e.what();
  }
}

TEST(Device, CudnnAutotunerIsOnForCudaUnlessTheEnvironmentSaysNo) {
  // The comparison switches: on unless exactly "0".
  const char* name = "SD_TEST_SWITCH_FOR_DEVICE_TEST";
  unsetenv(name);
  EXPECT_TRUE(sd::env_switch_on(name));
  for (const char* on : {"1", "", "off"}) {
    setenv(name, on, 1);
    EXPECT_TRUE(sd::env_switch_on(name)) << on;
  }
  setenv(name, "0", 1);
  EXPECT_FALSE(sd::env_switch_on(name));
  unsetenv(name);
  // Off CUDA it changes nothing and says so.
  const bool before = at::globalContext().benchmarkCuDNN();
  EXPECT_FALSE(sd::configure_cuda_backend(c10::Device(c10::kCPU)));
  EXPECT_EQ(at::globalContext().benchmarkCuDNN(), before);
}

}  // namespace
