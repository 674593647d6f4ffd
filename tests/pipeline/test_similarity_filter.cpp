// SimilarityFilter vs similarity_filter/ (pairs and sequences, discovered from the file).
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/fixtures.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "pipeline/similarity_filter.h"

namespace sd {
namespace {

constexpr double kCosAtol = 1e-7;  // float32 cosine similarity

const char* kJson = "similarity_filter/similarity_filter.json";
const char* kFrames = "similarity_filter/similarity_filter_frames.safetensors";

struct FilterCase {
  std::string kind;  // "pair" | "sequence"
  int index;
  std::string name;
};
// gtest prints the parameter with the test (ctest, --gtest_list_tests); without this it is a byte dump.
void PrintTo(const FilterCase& c, std::ostream* os) { *os << c.name; }

std::vector<FilterCase> filter_cases() {
  std::vector<FilterCase> out;
  if (!test::fixture_exists(kJson)) return out;
  const auto j = read_json_file(test::fixture_path(kJson));
  int i = 0;
  for (const auto& p : j.at("pairs")) {
    out.push_back({"pair", i, "pair" + std::to_string(i) + "_" + p.at("prev").get<std::string>() + "_" +
                                  p.at("cur").get<std::string>()});
    ++i;
  }
  i = 0;
  for (const auto& s : j.at("sequences")) {
    std::ostringstream name;
    name << "sequence" << i << "_threshold" << s.at("threshold").get<double>() << "_max"
         << s.at("max_skip_frame").get<int>();
    out.push_back({"sequence", i++, name.str()});
  }
  return out;
}

class FilterFixture : public ::testing::TestWithParam<FilterCase> {};

TEST_P(FilterFixture, Matches) {
  const auto j = read_json_file(test::fixture_path(kJson));
  const auto frames = SafeTensorsFile::open(test::fixture_path(kFrames));
  const auto& c = GetParam();
  if (c.kind == "pair") {
    const auto& p = j.at("pairs").at(c.index);
    const double cos = SimilarityFilter::cosine_similarity(frames.get(p.at("prev").get<std::string>()),
                                                           frames.get(p.at("cur").get<std::string>()));
    const double ref_cos = p.at("cos_sim").get<double>();
    EXPECT_NEAR(cos, ref_cos, kCosAtol);
    int checked = 0;
    for (const auto& [key, value] : p.items()) {
      const std::string prefix = "skip_prob_threshold_";
      if (key.rfind(prefix, 0) != 0) continue;
      const double threshold = std::stod(key.substr(prefix.size()));
      // The probability formula on the reference cosine is exact double math.
      EXPECT_NEAR(SimilarityFilter::skip_probability(ref_cos, threshold), value.get<double>(), 1e-12) << key;
      EXPECT_NEAR(SimilarityFilter::skip_probability(cos, threshold), value.get<double>(), kCosAtol / (1 - threshold))
          << key;
      ++checked;
    }
    EXPECT_GT(checked, 0);
    return;
  }
  const auto& s = j.at("sequences").at(c.index);
  std::vector<double> uniforms;
  for (const auto& st : s.at("steps"))
    if (!st.at("uniform_sample").is_null()) uniforms.push_back(st.at("uniform_sample").get<double>());
  auto replay = std::make_shared<ReplayUniformSource>(uniforms);
  SimilarityFilter filter(s.at("threshold").get<double>(), s.at("max_skip_frame").get<int>(), replay);
  int step_no = 0, skips = 0, processed = 0;
  for (const auto& st : s.at("steps")) {
    SCOPED_TRACE("step " + std::to_string(step_no++) + " frame " + st.at("frame").get<std::string>());
    const auto d = filter.check(frames.get(st.at("frame").get<std::string>()));
    const bool ref_process = st.at("returned").get<std::string>() == "frame";
    EXPECT_EQ(d.process, ref_process);
    EXPECT_EQ(d.skip_count, st.at("skip_count_after").get<int64_t>());
    if (!st.at("cos_sim").is_null()) {
      EXPECT_NEAR(d.cos_sim, st.at("cos_sim").get<double>(), kCosAtol);
      EXPECT_NEAR(d.skip_prob, st.at("skip_prob").get<double>(), 1e-5);
      EXPECT_EQ(d.uniform, st.at("uniform_sample").get<double>());
    } else {
      EXPECT_TRUE(d.first);
    }
    (ref_process ? processed : skips)++;
  }
  EXPECT_EQ(filter.skipped(), skips);
  EXPECT_EQ(filter.processed(), processed);
  EXPECT_EQ(replay->consumed(), uniforms.size());
}

INSTANTIATE_TEST_SUITE_P(Fixture, FilterFixture, ::testing::ValuesIn(filter_cases()),
                         [](const auto& info) { return test::test_name(info.param.name); });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(FilterFixture);

// Spec §5 written independently: forced pass after max_skip_frame+1 skips in total (counter not reset on a normal
// pass), comparison against the last processed frame.
TEST(SimilarityFilter, ForcedPassAndNonResettingCounter) {
  const auto a = torch::ones({1, 3, 8, 8});
  const auto b = -a;  // cos = -1 -> never skipped
  // uniform 0.5 each time; identical frames have skip_prob 1 -> would skip
  auto u = std::make_shared<ReplayUniformSource>(std::vector<double>(20, 0.5));
  SimilarityFilter f(0.9, 2, u);
  EXPECT_TRUE(f.check(a).first);
  EXPECT_FALSE(f.check(a).process);  // count 1
  EXPECT_FALSE(f.check(a).process);  // count 2
  EXPECT_TRUE(f.check(b).process);   // processed normally: count stays 2
  EXPECT_EQ(f.skip_count(), 2);
  EXPECT_FALSE(f.check(b).process);  // count 3 (3 > 2 not yet checked before increment: 2 > 2 false)
  EXPECT_EQ(f.skip_count(), 3);
  const auto d = f.check(b);  // 3 > 2 -> forced
  EXPECT_TRUE(d.process);
  EXPECT_TRUE(d.forced);
  EXPECT_EQ(f.skip_count(), 0);
  EXPECT_EQ(f.forced(), 1);
  EXPECT_EQ(f.skipped(), 3);
  EXPECT_EQ(f.processed(), 3);
}

TEST(SimilarityFilter, ThresholdOneNeverSkipsButStillDraws) {
  auto u = std::make_shared<ReplayUniformSource>(std::vector<double>{0.3, 0.7});
  SimilarityFilter f(1.0, 10, u);
  const auto a = torch::ones({1, 3, 8, 8});
  f.check(a);
  const auto d1 = f.check(a);
  EXPECT_TRUE(d1.process);
  EXPECT_EQ(d1.skip_prob, 0.0);
  EXPECT_TRUE(f.check(a).process);
  EXPECT_EQ(u->consumed(), 2u);  // one uniform per call after the first, as the original
}

TEST(SimilarityFilter, Errors) {
  EXPECT_THROW(SimilarityFilter(1.5, 1, nullptr), InvalidArgument);
  EXPECT_THROW(SimilarityFilter(0.9, -1, nullptr), InvalidArgument);
  SimilarityFilter f(0.9, 1, nullptr);
  f.check(torch::ones({1, 3, 8, 8}));
  EXPECT_THROW(f.check(torch::ones({1, 3, 16, 16})), InvalidArgument);
}

}  // namespace
}  // namespace sd
