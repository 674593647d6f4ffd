// Regression tests of what the fuzz targets (tests/fuzz, docs/FUZZING.md) found in the pipeline's config readers.
#include <functional>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/error_of.h"
#include "core/error.h"
#include "pipeline/lcm_scheduler.h"
#include "pipeline/prompt_blend.h"

namespace {

std::string format_error_of(const std::function<void()>& f) { return sd::test::error_of<sd::FormatError>(f); }

// fuzz_config: scheduler_config.json with num_train_timesteps = 1e11 was accepted and building the scheduler tried to
// allocate its schedule tensors (~400 GB: ASan "allocator is out of memory"); original_inference_steps above
// num_train_timesteps was only refused later, at timesteps().
TEST(FuzzFindings, LcmSchedulerConfigIsBounded) {
  const std::string m = format_error_of([] {
    sd::LCMSchedulerConfig::from_json(nlohmann::json::parse(R"({"num_train_timesteps": 100000000000})"),
                                      "scheduler/scheduler_config.json");
  });
  EXPECT_EQ(m, "scheduler/scheduler_config.json: field 'num_train_timesteps': expected an integer in [2, 100000], "
               "found 100000000000");
  const std::string o = format_error_of([] {
    sd::LCMSchedulerConfig::from_json(
        nlohmann::json::parse(R"({"num_train_timesteps": 1000, "original_inference_steps": 5000})"),
        "scheduler/scheduler_config.json");
  });
  EXPECT_NE(o.find("field 'original_inference_steps': expected an integer in [1, num_train_timesteps = 1000]"),
            std::string::npos)
      << o;
}

// fuzz_control_command: a prompt or seed list in JSON with a number too large for a double (1e9995) made
// nlohmann::json throw out_of_range (not parse_error), which escaped as an uncaught exception. Both lists now refuse
// any JSON error as a bad list.
TEST(FuzzFindings, ListNumbersTooLargeForADoubleAreBadLists) {
  const std::string p =
      sd::test::error_of<sd::InvalidArgument>([] { sd::parse_prompt_list(R"([["a cat", 1e9995]])"); });
  EXPECT_EQ(p.rfind("prompt_list: bad JSON: ", 0), 0u) << p;
  const std::string s = sd::test::error_of<sd::InvalidArgument>([] { sd::parse_seed_list("[[1, 1e9995]]"); });
  EXPECT_EQ(s.rfind("seed_list: bad JSON: ", 0), 0u) << s;
  // A number that fits still parses.
  EXPECT_EQ(sd::parse_prompt_list(R"([["a cat", 1e3]])").size(), 1u);
}

}  // namespace
