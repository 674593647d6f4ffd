// TorchRng reproduces torch.manual_seed + torch.randn (fixture rng/rng_check.safetensors); ReplayRng errors.
#include "common/fixtures.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "pipeline/rng.h"

namespace sd {
namespace {

// README: bit-identical with the AVX2 kernel; the scalar kernel differs by up to 1.4e-6.
constexpr double kRngAtol = 1.4e-6;

TEST(Rng, TorchRngReproducesTorchManualSeedDraws) {
  if (!test::fixture_exists("rng/rng_check.safetensors")) GTEST_SKIP() << "no rng fixture";
  const auto f = SafeTensorsFile::open(test::fixture_path("rng/rng_check.safetensors"));
  TorchRng rng(2);
  const auto a = rng.randn({2, 4, 8, 8}, "a");
  const auto b = rng.randn({1, 4, 8, 8}, "b");
  const auto c = rng.randn({5}, "c");
  TorchRng other(123);
  const auto d = other.randn({3, 4, 8, 12}, "d");
  double worst = 0;
  for (const auto& [name, got] : std::vector<std::pair<std::string, torch::Tensor>>{{"a", a}, {"b", b}, {"c", c}, {"d", d}}) {
    EXPECT_TRUE(test::tensors_close(got, f.get(name), kRngAtol, 0.0, name));
    worst = std::max(worst, (got - f.get(name)).abs().max().item<double>());
  }
  RecordProperty("max_abs_err", std::to_string(worst));
  EXPECT_NEAR(a.reshape(-1)[0].item<double>(), -1.0408012, 1e-6);
}

TEST(Rng, ManualSeedRestartsTheSequence) {
  TorchRng rng(7);
  const auto x = rng.randn({3, 5}, "x");
  rng.randn({100}, "more");
  rng.manual_seed(7);
  EXPECT_TRUE(torch::equal(x, rng.randn({3, 5}, "x again")));
  EXPECT_EQ(x.scalar_type(), torch::kFloat32);
}

TEST(Rng, ReplayHandsOutInOrderAndErrorsClearly) {
  ReplayRng rng({torch::ones({2, 3}), torch::zeros({4})}, "case X");
  EXPECT_TRUE(torch::equal(rng.randn({2, 3}, "first"), torch::ones({2, 3})));
  try {
    rng.randn({5}, "second site");
    FAIL() << "shape mismatch accepted";
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("case X"), std::string::npos) << m;
    EXPECT_NE(m.find("#1"), std::string::npos) << m;
    EXPECT_NE(m.find("second site"), std::string::npos) << m;
    EXPECT_NE(m.find("[4]"), std::string::npos) << m;
  }
  EXPECT_TRUE(torch::equal(rng.randn({4}, "second"), torch::zeros({4})));
  EXPECT_EQ(rng.remaining(), 0u);
  EXPECT_THROW(rng.randn({4}, "third"), InvalidArgument);
}

TEST(Rng, UniformSources) {
  Mt19937UniformSource a(5), b(5);
  for (int i = 0; i < 100; ++i) {
    const double u = a.uniform();
    EXPECT_GE(u, 0.0);
    EXPECT_LT(u, 1.0);
    EXPECT_EQ(u, b.uniform());
  }
  ReplayUniformSource r({0.25, 0.5});
  EXPECT_EQ(r.uniform(), 0.25);
  EXPECT_EQ(r.uniform(), 0.5);
  EXPECT_THROW(r.uniform(), InvalidArgument);
}

}  // namespace
}  // namespace sd
