// CPU feature detection used to warn about emulated bf16 and reported by the bench.
#include <fstream>
#include <set>
#include <sstream>

#include <gtest/gtest.h>

#include "core/device.h"

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

}  // namespace
