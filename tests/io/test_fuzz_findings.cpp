// Regression tests of what the fuzz targets (tests/fuzz, docs/FUZZING.md) found in the io layer's parsers.
#include <filesystem>
#include <fstream>
#include <functional>

#include <gtest/gtest.h>

#include "common/error_of.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "core/json_limits.h"
#include "io/json_config.h"
#include "io/safetensors_header.h"

#include <nlohmann/json.hpp>

namespace fs = std::filesystem;

namespace {

std::string format_error_of(const std::function<void()>& f) { return sd::test::error_of<sd::FormatError>(f); }

// fuzz_config: a number too large for a double (1e999) made nlohmann::json throw out_of_range (not parse_error),
// which escaped read_json_file as a raw library exception that names no file.
TEST(FuzzFindings, JsonNumberOverflowIsAFormatErrorNamingTheFile) {
  const std::string m = format_error_of([] { sd::parse_json_text(R"({"in_channels": 1e999})", "unet/config.json"); });
  EXPECT_EQ(m.rfind("unet/config.json: not valid JSON", 0), 0u) << m;
  EXPECT_NE(m.find("number overflow"), std::string::npos) << m;
  const fs::path d = sd::test::make_temp_dir("sd-fuzz-json");
  std::ofstream(d / "config.json") << R"({"beta_start": -3e400})";
  const std::string f = format_error_of([&] { sd::read_json_file((d / "config.json").string()); });
  EXPECT_EQ(f.rfind((d / "config.json").string() + ": not valid JSON", 0), 0u) << f;
}

// Review finding: a config file nested 100000 levels deep parsed (nlohmann's parser is iterative) and then overflowed
// the stack in the first dump() or copy of the value. Refused before parsing, naming the file.
TEST(FuzzFindings, DeeplyNestedJsonIsAFormatErrorNamingTheFile) {
  const std::string deep = R"({"block_out_channels": )" + std::string(100000, '[') + std::string(100000, ']') + "}";
  EXPECT_EQ(format_error_of([&] { sd::parse_json_text(deep, "unet/config.json"); }),
            "unet/config.json: not valid JSON: arrays / objects nested more than 64 levels deep");
  EXPECT_EQ(sd::json_nesting_depth(R"({"a": [1, {"b": "]]]"}], "c": "\"[["})"), 3);
  EXPECT_EQ(sd::json_nesting_depth(std::string(10, '{')), 10);
  EXPECT_EQ(sd::json_nesting_depth(std::string(1000, '['), 64), 65) << "counting stops past the limit";
}

// Review finding: the safetensors header had no such check. A 600 KB file whose "shape" nested 300,000 levels deep
// (as a model's weights, --lora, --vae, ...) parsed and then overflowed the stack where the error message quoted the
// shape (SIGSEGV). A long shape is quoted as an excerpt.
TEST(FuzzFindings, ADeeplyNestedSafetensorsHeaderIsAFormatErrorNotACrash) {
  auto file_of = [](const std::string& header) {
    std::string bytes(8, '\0');
    uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    return bytes + header;
  };
  auto error_of_header = [&](const std::string& header) {
    const std::string bytes = file_of(header);
    return format_error_of([&] {
      sd::safetensors::parse_header(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "deep.safetensors");
    });
  };
  const std::string deep = R"({"a": {"dtype": "F32", "shape": )" + std::string(300000, '[') +
                           std::string(300000, ']') + R"(, "data_offsets": [0, 0]}})";
  EXPECT_EQ(error_of_header(deep),
            "deep.safetensors: header is not a safetensors header: arrays / objects nested more than 64 levels deep");
  std::string flat = R"({"a": {"dtype": "F32", "shape": [)";
  for (int i = 0; i < 100000; ++i) flat += "1, ";
  flat += R"(-1], "data_offsets": [0, 4]}})";
  const std::string m = error_of_header(flat);
  EXPECT_NE(m.find("deep.safetensors: tensor 'a': shape entries must be non-negative integers, found [1,1,1,"),
            std::string::npos)
      << m.substr(0, 300);
  EXPECT_LT(m.size(), 300u);
}

// fuzz_config: an integer field given as a float too large for int64 (1e300) was converted with static_cast, which
// is undefined behaviour (UBSan: "1e+300 is outside the range of representable values of type 'long'"); integers
// beyond int32 in int fields and lists were silently truncated, and 2^64 - 1 in an int64 field wrapped to -1.
TEST(FuzzFindings, ConfigIntegersOutOfRangeAreNamedErrors) {
  const auto j = nlohmann::json::parse(R"({"big": 1e300, "neg": -1e19, "u": 18446744073709551615, "wide": 4294967297,
                                           "list": [1, 4294967297], "either": 2147483648, "ok": 9.0e15})");
  sd::ConfigReader r(j, "unet/config.json");
  auto expect = [&](const std::function<void()>& f, const std::string& frag) {
    const std::string m = format_error_of(f);
    EXPECT_EQ(m.rfind("unet/config.json: ", 0), 0u) << m;
    EXPECT_NE(m.find(frag), std::string::npos) << m;
  };
  expect([&] { r.get_int64("big", 0); }, "field 'big': expected an integer in the 64-bit range, found 1e+300");
  expect([&] { r.get_int64("neg", 0); }, "field 'neg': expected an integer in the 64-bit range");
  expect([&] { r.get_int64("u", 0); }, "field 'u': expected an integer in the 64-bit range, found 18446744073709551615");
  expect([&] { r.get_int("wide", 0); }, "field 'wide': expected an integer in [-2147483648, 2147483647], found 4294967297");
  expect([&] { r.get_int("big", 0); }, "field 'big': expected an integer in [-2147483648, 2147483647]");
  expect([&] { r.get_int_list("list", {}); }, "field 'list': expected a list of integers in [-2147483648, 2147483647]");
  expect([&] { r.get_int_or_list("either", 0, 2); }, "field 'either': expected an integer in [-2147483648, 2147483647]");
  EXPECT_EQ(r.get_int64("ok", 0), 9000000000000000);
}

}  // namespace
