// LCMScheduler vs scheduler/lcm_tables.json (every table in the file) and lcm_alphas_cumprod.safetensors.
#include <nlohmann/json.hpp>

#include "common/fixtures.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "pipeline/lcm_scheduler.h"

namespace sd {
namespace {

constexpr double kAtol = 1e-7, kRtol = 1e-6;  // README: scheduler scalars (float32 math)

struct TableCase {
  int index;
  std::string name;
};
// gtest prints the parameter with the test (ctest, --gtest_list_tests); without this it is a byte dump.
void PrintTo(const TableCase& c, std::ostream* os) { *os << c.name; }

std::vector<TableCase> table_cases() {
  std::vector<TableCase> out;
  if (!test::fixture_exists("scheduler/lcm_tables.json")) return out;
  const auto j = read_json_file(test::fixture_path("scheduler/lcm_tables.json"));
  int i = 0;
  for (const auto& t : j.at("tables")) {
    out.push_back({i++, "steps" + std::to_string(t.at("num_inference_steps").get<int>()) + "_orig" +
                            std::to_string(t.at("original_inference_steps").get<int>())});
  }
  return out;
}

class LcmTable : public ::testing::TestWithParam<TableCase> {};

TEST_P(LcmTable, TimestepsAndCoefficients) {
  const auto j = read_json_file(test::fixture_path("scheduler/lcm_tables.json"));
  const auto& table = j.at("tables").at(GetParam().index);
  auto cfg = LCMSchedulerConfig::from_json(j.at("scheduler_config"), "lcm_tables.json:scheduler_config");
  cfg.original_inference_steps = table.at("original_inference_steps").get<int64_t>();
  LCMScheduler sched(cfg);

  const auto ts = sched.timesteps(table.at("num_inference_steps").get<int64_t>());
  EXPECT_EQ(ts, table.at("timesteps").get<std::vector<int64_t>>());

  const auto& rows = table.at("rows");
  ASSERT_EQ(rows.size(), ts.size());
  double max_err = 0;
  for (const auto& row : rows) {
    const int64_t t = row.at("t").get<int64_t>();
    const LCMCoefficients c = sched.coefficients(t);
    const auto check = [&](const char* key, float got) {
      const double ref = static_cast<float>(row.at(key).get<double>());
      const double err = std::abs(static_cast<double>(got) - ref);
      max_err = std::max(max_err, err);
      EXPECT_LE(err, kAtol + kRtol * std::abs(ref)) << key << " at t=" << t << ": got " << got << ", ref " << ref;
    };
    check("alphas_cumprod", c.alphas_cumprod);
    check("alpha_prod_t_sqrt", c.alpha_prod_t_sqrt);
    check("beta_prod_t_sqrt", c.beta_prod_t_sqrt);
    check("c_skip", c.c_skip);
    check("c_out", c.c_out);
  }
  RecordProperty("max_abs_err", std::to_string(max_err));
}

INSTANTIATE_TEST_SUITE_P(Fixture, LcmTable, ::testing::ValuesIn(table_cases()),
                         [](const auto& info) { return test::test_name(info.param.name); });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(LcmTable);

TEST(LcmScheduler, AlphasCumprodAndBetasMatchFixture) {
  if (!test::fixture_exists("scheduler/lcm_alphas_cumprod.safetensors")) GTEST_SKIP() << "no scheduler fixture";
  const auto f = SafeTensorsFile::open(test::fixture_path("scheduler/lcm_alphas_cumprod.safetensors"));
  LCMScheduler sched;  // the SD-1.x/2.x schedule is the default config
  EXPECT_TRUE(test::tensors_close(sched.betas(), f.get("betas"), kAtol, kRtol, "betas"));
  EXPECT_TRUE(test::tensors_close(sched.alphas_cumprod(), f.get("alphas_cumprod"), kAtol, kRtol, "alphas_cumprod"));
  // Bit-identical in practice (same libtorch kernels); report it.
  RecordProperty("alphas_cumprod_max_abs_err",
                 std::to_string((sched.alphas_cumprod() - f.get("alphas_cumprod")).abs().max().item<double>()));
  // Spec §2.1 sanity values.
  EXPECT_NEAR(sched.alphas_cumprod()[0].item<double>(), 0.99915, 1e-5);
  EXPECT_NEAR(sched.alphas_cumprod()[999].item<double>(), 0.0046601, 1e-7);
}

TEST(LcmScheduler, TimestepFormulaForEveryStepCount) {
  LCMScheduler sched;
  for (int64_t N = 1; N <= 50; ++N) {
    const auto ts = sched.timesteps(N);
    ASSERT_EQ(static_cast<int64_t>(ts.size()), N);
    for (int64_t i = 0; i < N; ++i) EXPECT_EQ(ts[i], 999 - 20 * ((50 * i) / N)) << "N=" << N << " i=" << i;
  }
}

TEST(LcmScheduler, StepCountErrors) {
  LCMScheduler sched;
  EXPECT_THROW(sched.timesteps(0), InvalidArgument);
  EXPECT_THROW(sched.timesteps(51), InvalidArgument);  // > original_inference_steps
  LCMSchedulerConfig c;
  c.original_inference_steps = 2000;
  LCMScheduler bad(c);
  EXPECT_THROW(bad.timesteps(10), InvalidArgument);  // original > num_train_timesteps
  EXPECT_THROW(sched.coefficients(1000), InvalidArgument);
}

TEST(LcmScheduler, ConfigParsing) {
  // Model configs: defaults for absent LCM keys, unknown keys accepted.
  auto j = nlohmann::json::parse(R"({"_class_name":"PNDMScheduler","beta_start":0.00085,"beta_end":0.012,
      "beta_schedule":"scaled_linear","num_train_timesteps":1000,"skip_prk_steps":true,"some_new_key":1})");
  const auto c = LCMSchedulerConfig::from_json(j, "sched.json");
  EXPECT_EQ(c.original_inference_steps, 50);
  EXPECT_DOUBLE_EQ(c.timestep_scaling, 10.0);

  auto bad_schedule = j;
  bad_schedule["beta_schedule"] = "squaredcos_cap_v2";
  EXPECT_THROW(LCMSchedulerConfig::from_json(bad_schedule, "sched.json"), FormatError);
  EXPECT_EQ(c.prediction_type, "epsilon");
  auto vpred = j;
  vpred["prediction_type"] = "v_prediction";  // SD 2.x 768-v: the stream converts v to epsilon per row
  EXPECT_EQ(LCMSchedulerConfig::from_json(vpred, "sched.json").prediction_type, "v_prediction");
  auto sample = j;
  sample["prediction_type"] = "sample";
  try {
    LCMSchedulerConfig::from_json(sample, "sched.json");
    FAIL() << "prediction_type sample accepted";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("prediction_type"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("sched.json"), std::string::npos) << e.what();
  }
  auto wrong_type = j;
  wrong_type["num_train_timesteps"] = "many";
  EXPECT_THROW(LCMSchedulerConfig::from_json(wrong_type, "sched.json"), FormatError);
  auto trained = j;
  trained["trained_betas"] = nlohmann::json::array({0.1, 0.2});
  EXPECT_THROW(LCMSchedulerConfig::from_json(trained, "sched.json"), FormatError);

  // linear schedule: betas exactly linspace
  auto lin = j;
  lin["beta_schedule"] = "linear";
  LCMScheduler ls(LCMSchedulerConfig::from_json(lin, "sched.json"));
  EXPECT_NEAR(ls.betas()[0].item<double>(), 0.00085, 1e-9);
  EXPECT_NEAR(ls.betas()[999].item<double>(), 0.012, 1e-9);
}

TEST(LcmScheduler, ModelSchedulerConfigsLoad) {
  for (const auto& m : test::fixture_models()) {
    const auto c = LCMSchedulerConfig::from_file(test::fixture_path("models/" + m + "/scheduler/scheduler_config.json"));
    LCMScheduler s(c);
    EXPECT_EQ(s.timesteps(4).size(), 4u) << m;
  }
}

}  // namespace
}  // namespace sd
