// The stall under CPU contention (issue 20, src/runtime/README.md "The stall"): OpenBLAS's own spinning workers next
// to libtorch's OpenMP team made fp32 streams 3x slower with 1.6 s frames. Every model load pins OpenBLAS to one
// thread, whatever its libtorch thread setting; spin-forever OpenMP settings are warned about.
#include <cstdlib>

#include <gtest/gtest.h>

#include "common/fixtures.h"
#include "core/device.h"
#include "pipeline/diffusion_models.h"

extern "C" void openblas_set_num_threads(int) __attribute__((weak));
extern "C" int openblas_get_num_threads() __attribute__((weak));

namespace sd {
namespace {

TEST(BlasThreads, EveryModelLoadPinsOpenBlasEvenWhenTorchThreadsAreLeftAlone) {
  if (!openblas_set_num_threads || !openblas_get_num_threads) GTEST_SKIP() << "libtorch does not use OpenBLAS here";
  if (!test::fixture_exists("models/tiny-sd15")) GTEST_SKIP() << "no tiny-sd15 fixture";
  openblas_set_num_threads(2);  // OpenBLAS's own default on a 2-core machine (or what another library set)
  ASSERT_EQ(openblas_get_num_threads(), 2);
  LoadOptions lo;
  lo.threads = -1;  // "leave libtorch's setting alone" (the Python API's threads=-1, the tests)
  const auto models = load_pipeline(test::fixture_path("models/tiny-sd15"), lo);
  EXPECT_EQ(openblas_get_num_threads(), 1);
  openblas_set_num_threads(2);
  set_threads(0);
  EXPECT_EQ(openblas_get_num_threads(), 1);
  EXPECT_EQ(pin_blas_threads(), 1);
}

struct EnvGuard {
  const char* name;
  explicit EnvGuard(const char* n, const char* value) : name(n) {
    if (value)
      setenv(name, value, 1);
    else
      unsetenv(name);
  }
  ~EnvGuard() { unsetenv(name); }
};

TEST(BlasThreads, SpinForeverOpenMpSettingsAreWarnedAbout) {
  {
    EnvGuard p("OMP_WAIT_POLICY", nullptr), s("GOMP_SPINCOUNT", nullptr);
    EXPECT_EQ(openmp_wait_policy_warning(), "");
  }
  {
    EnvGuard p("OMP_WAIT_POLICY", "active");
    const std::string w = openmp_wait_policy_warning();
    EXPECT_NE(w.find("OMP_WAIT_POLICY=ACTIVE"), std::string::npos) << w;
  }
  {
    EnvGuard s("GOMP_SPINCOUNT", "INFINITE");
    EXPECT_NE(openmp_wait_policy_warning().find("GOMP_SPINCOUNT=INFINITE"), std::string::npos);
  }
  {
    EnvGuard p("OMP_WAIT_POLICY", "PASSIVE"), s("GOMP_SPINCOUNT", "10000");
    EXPECT_EQ(openmp_wait_policy_warning(), "");
  }
}

}  // namespace
}  // namespace sd
