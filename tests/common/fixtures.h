#pragma once
// Shared helpers for the golden tests: where the fixtures are, discovery of models and cases, tensor comparison.
#include <iostream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "io/safetensors.h"

namespace sd::test {

// $SD_FIXTURES, else the repo's ../shared/fixtures (absolute, fixed at configure time).
std::string fixtures_root();
// Joins fixtures_root() with a relative path.
std::string fixture_path(const std::string& rel);
bool fixture_exists(const std::string& rel);
// Skips the current test when fixtures_root() lacks `rel` (a clone without ../shared beside it), as the data-driven
// golden tests do by finding no cases.
#define SD_SKIP_WITHOUT_FIXTURE(rel)                                                                     \
  do {                                                                                                   \
    if (!::sd::test::fixture_exists(rel)) GTEST_SKIP() << (rel) << " not in " << ::sd::test::fixtures_root(); \
  } while (0)
// Model folder names under models/ (sorted), empty when the fixture root has no models/.
std::vector<std::string> fixture_models();

// One golden case of a model component: a fixture model folder and a case prefix of the keys of
// modules/<model>/<component>.safetensors ("encode", "decode", ...). `error` is set when the file exists but cannot
// be read, so the malformed part fails as its own test.
struct ComponentGoldenCase {
  std::string model, name, error;
};
// gtest prints the parameter with the test (ctest, --gtest_list_tests); without this it is a byte dump.
void PrintTo(const ComponentGoldenCase& c, std::ostream* os);
// The cases of every fixture model that has models/<model>/<component> and modules/<model>/<component>.safetensors.
std::vector<ComponentGoldenCase> component_golden_cases(const std::string& component);

// max|a - ref| <= atol + rtol * max|ref|, computed in float64. Returns a gtest assertion result that names `what`,
// the max error, the bound and where the largest error is.
::testing::AssertionResult tensors_close(const torch::Tensor& actual, const torch::Tensor& ref, double atol,
                                         double rtol, const std::string& what);

// EXPECT that also prints the measured error on success, so test logs carry the numbers.
#define SD_EXPECT_CLOSE(actual, ref, atol, rtol, what)                                   \
  do {                                                                                   \
    auto sd_close_result_ = ::sd::test::tensors_close(actual, ref, atol, rtol, what);   \
    EXPECT_TRUE(sd_close_result_);                                                       \
    if (sd_close_result_) std::cout << "  [close] " << sd_close_result_.message() << "\n"; \
  } while (0)

// Replaces characters gtest does not allow in test names.
std::string test_name(std::string s);

// Device and dtype of the device golden tests (tests/models/test_device_golden.cpp): $SD_TEST_DEVICE ("cpu" |
// "cuda" | "cuda:N", default cpu) and $SD_TEST_DTYPE ("fp32" | "bf16" | "fp16", default fp32). A bad value throws
// sd::InvalidArgument naming the variable. scripts/gpu-check.sh sets them to cuda / fp16.
c10::Device test_device();
c10::ScalarType test_dtype();

// Multiplier for the tests' wall-clock bounds (a stop within a second, a frame every few seconds): $SD_TEST_TIME_SCALE
// (>= 1, default 1). SD_SANITIZE builds set it on every test (the instrumented code runs several times slower); the
// numeric tolerances of results never scale.
double time_scale();

// A unique scratch directory under the build tree's temp space (removed by the caller if wanted).
std::string make_temp_dir(const std::string& prefix);

}  // namespace sd::test
