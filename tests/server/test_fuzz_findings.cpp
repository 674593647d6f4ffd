// Regression tests of what the fuzz targets (tests/fuzz, docs/FUZZING.md) found in serve's parsers, and the two
// parsing functions the WebSocket session and the HTTP API share with their fuzz targets.
#include <functional>

#include <gtest/gtest.h>

#include "common/error_of.h"
#include "core/error.h"
#include "server/api_request.h"
#include "server/client_message.h"
#include "server/stream_settings.h"

using sd::server::ApiBody;
using sd::server::StreamDefaults;

namespace {

std::string invalid_argument_of(const std::function<void()>& f) { return sd::test::error_of<sd::InvalidArgument>(f); }

StreamDefaults small_defaults() {
  StreamDefaults d;
  for (auto* c : {&d.img2img, &d.txt2img}) c->width = c->height = 64;
  d.txt2img.t_index_list = {0};
  d.max_width = d.max_height = 128;
  return d;
}

TEST(ClientMessage, TypesAndFields) {
  EXPECT_EQ(sd::server::parse_client_message(R"({"type": "ping"})").type, "ping");
  const auto c = sd::server::parse_client_message(R"({"type": "config", "prompt": "a dog"})");
  EXPECT_EQ(c.type, "config");
  EXPECT_EQ(c.body.at("prompt"), "a dog");
  EXPECT_NE(invalid_argument_of([] { sd::server::parse_client_message(R"({"type": "stats", "x": 1})"); })
                .find("unknown field 'x' in a 'stats' message"),
            std::string::npos);
  EXPECT_NE(invalid_argument_of([] { sd::server::parse_client_message(R"({"type": "dance"})"); })
                .find("unknown message type 'dance'"),
            std::string::npos);
  EXPECT_NE(invalid_argument_of([] { sd::server::parse_client_message("[1]"); }).find("string field 'type'"),
            std::string::npos);
  EXPECT_NE(invalid_argument_of([] { sd::server::parse_client_message("{"); }).find("bad JSON"), std::string::npos);
}

TEST(ApiBody, SizeSettingsAndImage) {
  const StreamDefaults d = small_defaults();
  const ApiBody b = sd::server::parse_api_body(true, R"({"prompt": "x", "width": 128, "height": 32})", d, 8);
  EXPECT_EQ(b.width, 128);
  EXPECT_EQ(b.height, 32);
  EXPECT_EQ(b.defaults.txt2img.width, 128);
  EXPECT_EQ(b.settings.prompt, "x");
  EXPECT_TRUE(b.control.empty());
  EXPECT_NE(invalid_argument_of([&] { sd::server::parse_api_body(true, R"({"width": 136})", d, 8); })
                .find("field 'width': expected an integer multiple of 8 in [8, 128]"),
            std::string::npos);
  EXPECT_NE(invalid_argument_of([&] { sd::server::parse_api_body(false, R"({"prompt": "x"})", d, 8); })
                .find("field 'image': expected a base64 JPEG or PNG string"),
            std::string::npos);
  EXPECT_NE(invalid_argument_of([&] { sd::server::parse_api_body(true, R"({"mode": "txt2img"})", d, 8); })
                .find("unknown field 'mode'"),
            std::string::npos);
}

// fuzz_ws_message / fuzz_api_body: a number too large for a double (1e999) made nlohmann::json throw out_of_range,
// which the parsers' parse_error handlers let through as a raw library exception instead of a "bad JSON" answer.
TEST(FuzzFindings, JsonNumberOverflowIsBadJson) {
  const std::string ws =
      invalid_argument_of([] { sd::server::parse_client_message(R"({"type": "config", "guidance": 1e999})"); });
  EXPECT_EQ(ws.rfind("bad JSON: ", 0), 0u) << ws;
  EXPECT_NE(ws.find("number overflow"), std::string::npos) << ws;
  const std::string api =
      invalid_argument_of([] { sd::server::parse_api_body(true, R"({"seed": 3e308, "width": 1e400})", small_defaults(), 8); });
  EXPECT_EQ(api.rfind("bad JSON: ", 0), 0u) << api;
}

// Review finding: nlohmann's parser is iterative, but dump() (quoted by the settings' error messages), copies and
// comparisons recurse once per level, so 200 KB of '[' in a config message or an API body overflowed the server's
// stack (SIGSEGV). Text nested deeper than 64 levels is refused before it is parsed.
TEST(FuzzFindings, DeeplyNestedJsonIsRefusedBeforeItIsParsed) {
  const auto nested = [](const std::string& head, int depth, const std::string& tail) {
    return head + std::string(depth, '[') + std::string(depth, ']') + tail;
  };
  const std::string deep = nested(R"({"type": "config", "guidance": )", 100000, "}");
  const std::string ws = invalid_argument_of([&] { sd::server::parse_client_message(deep); });
  EXPECT_EQ(ws, "bad JSON: arrays / objects nested more than 64 levels deep");
  const std::string api = invalid_argument_of(
      [&] { sd::server::parse_api_body(true, nested(R"({"width": )", 200000, "}"), small_defaults(), 8); });
  EXPECT_EQ(api, "bad JSON: arrays / objects nested more than 64 levels deep");
  // 63 levels under the message object are fine (the settings refuse the value, quoting an excerpt of it).
  const auto ok = sd::server::parse_client_message(nested(R"({"type": "config", "guidance": )", 63, "}"));
  const std::string settings = invalid_argument_of(
      [&] { sd::server::apply_settings_json(ok.body, sd::server::StreamSettings{}, small_defaults(), {"type"}); });
  EXPECT_EQ(settings.rfind("field 'guidance': expected a number, got [[[[", 0), 0u) << settings;
  EXPECT_LE(settings.size(), 200u) << "an excerpt, not the whole value";
  // Brackets inside strings are text, not nesting.
  EXPECT_EQ(sd::server::parse_client_message(R"({"type": "config", "prompt": ")" + std::string(1000, '[') + R"("})")
                .body.at("prompt")
                .get<std::string>()
                .size(),
            1000u);
}

}  // namespace
