// ControlNets and the IP-Adapter in the server: validation of the settings fields (errors name the field and the
// index), a WebSocket stream with the tiny ControlNet (canny frames, the control images sent back, counters), scale 0
// equal to a server without ControlNets, a static control_image for txt2img (set, used, cleared), `feedback` (the
// previous output as the control image), the API fields, per-client guidance ranges (live and per request), and
// per-client IP-Adapter image prompts with the server-wide ip_adapter_scale.
#include <gtest/gtest.h>
#include <opencv2/imgproc.hpp>

#include "common/fixtures.h"
#include "core/error.h"
#include "models/ip_adapter.h"
#include "pipeline/controlnet.h"
#include "pipeline/diffusion_models.h"
#include "runtime/control_preprocessor.h"
#include "server/http_server.h"
#include "server/image_codec.h"
#include "server/stream_settings.h"
#include "server_test_util.h"

using namespace sd::server;
using sd::test::http_request;
using sd::test::WsClient;
namespace http = boost::beast::http;

namespace {

constexpr int kSize = 64;
const char* kModel = "models/tiny-sd15";
const std::string kCn = "controlnet/models/tiny-controlnet-sd15";
const std::string kIpAdapter = "ipadapter/models/tiny-ip-adapter-sd15";

StreamDefaults base_defaults() { return sd::test::tiny_stream_defaults(kSize); }

// What apply_settings_json must refuse, with the words the message must contain.
void expect_refused(const nlohmann::json& j, const StreamDefaults& d, const std::vector<std::string>& words) {
  const StreamSettings s = StreamSettings::defaults(d, false);
  try {
    apply_settings_json(j, s, d, {"type"});
    ADD_FAILURE() << "accepted " << j.dump();
  } catch (const sd::InvalidArgument& e) {
    for (const auto& w : words)
      EXPECT_NE(std::string(e.what()).find(w), std::string::npos) << e.what() << " lacks " << w;
  }
}

std::string b64_jpeg(int w, int h, int k) {
  return "data:image/jpeg;base64," + base64_encode(sd::test::test_jpeg(w, h, k));
}

// Share of the pixels that are (nearly) black or white, and share of white ones: a canny edge map is ~all of the
// former with a few percent of the latter.
std::pair<double, double> black_white(const cv::Mat& rgb) {
  int bw = 0, white = 0;
  for (int y = 0; y < rgb.rows; ++y)
    for (int x = 0; x < rgb.cols; ++x) {
      const cv::Vec3b p = rgb.at<cv::Vec3b>(y, x);
      const int m = (p[0] + p[1] + p[2]) / 3;
      if (m < 40 || m > 215) ++bw;
      if (m > 215) ++white;
    }
  const double n = static_cast<double>(rgb.rows) * rgb.cols;
  return {bw / n, white / n};
}

}  // namespace

TEST(ServerControlSettings, FieldsAreValidatedNamingFieldAndIndex) {
  StreamDefaults d = base_defaults();
  // Without ControlNets / IP-Adapter the fields are refused with the option to start serve with.
  expect_refused({{"controlnets", nlohmann::json::array({{{"scale", 1}}})}}, d, {"controlnets", "--controlnet"});
  expect_refused({{"control_image", nullptr}}, d, {"control_image", "--controlnet"});
  expect_refused({{"image_prompt", nullptr}}, d, {"image_prompt", "--ip-adapter"});
  expect_refused({{"ip_adapter_scale", 0.5}}, d, {"ip_adapter_scale", "--ip-adapter"});

  d.controlnets = {{nullptr, 1.0}, {nullptr, 0.5}};  // validation needs only their number
  d.control_preprocessors = {"canny:100:200", "gray"};
  d.ip_adapter = true;
  const StreamSettings s0 = StreamSettings::defaults(d, false);
  ASSERT_EQ(s0.controlnets.size(), 2u);
  EXPECT_EQ(s0.controlnets[1].scale, 0.5);
  EXPECT_EQ(s0.controlnets[1].preprocessor, "gray");

  expect_refused({{"controlnets", nlohmann::json::array({{{"scale", 1}}})}}, d, {"'controlnets'", "2 object"});
  expect_refused({{"controlnets", {{"scale", 1}}}}, d, {"'controlnets'", "array"});
  expect_refused({{"controlnets", nlohmann::json::array({{{"scale", 1}}, {{"scale", 2.5}}})}}, d,
                 {"controlnets[1].scale", "out of range"});
  expect_refused({{"controlnets", nlohmann::json::array({{{"scale", 1}}, {{"scale", "x"}}})}}, d,
                 {"controlnets[1].scale", "number"});
  expect_refused({{"controlnets", nlohmann::json::array({{{"preprocessor", "depth"}}, nlohmann::json::object()})}}, d,
                 {"controlnets[0].preprocessor", "depth", "canny"});
  expect_refused({{"controlnets", nlohmann::json::array({nlohmann::json::object(), {{"strength", 1}}})}}, d,
                 {"controlnets[1].strength"});
  expect_refused({{"controlnets", nlohmann::json::array({1, 2})}}, d, {"controlnets[0]", "object"});
  expect_refused({{"controlnets", nlohmann::json::array({{{"guidance_start", 1.5}}, nlohmann::json::object()})}}, d,
                 {"controlnets[0].guidance_start", "out of range"});
  expect_refused({{"controlnets", nlohmann::json::array({nlohmann::json::object(), {{"guidance_end", "half"}}})}}, d,
                 {"controlnets[1].guidance_end", "number"});
  // The pair: a start at the end (the default 1), or past an end sent with it, names the rule.
  expect_refused({{"controlnets", nlohmann::json::array({{{"guidance_start", 1}}, nlohmann::json::object()})}}, d,
                 {"controlnets[0]", "guidance_start 1.0 and guidance_end 1.0", "0 <= start < end <= 1"});
  expect_refused({{"controlnets", nlohmann::json::array({nlohmann::json::object(),
                                                         {{"guidance_start", 0.6}, {"guidance_end", 0.25}}})}},
                 d, {"controlnets[1]", "guidance_start 0.6 and guidance_end 0.25", "0 <= start < end <= 1"});
  expect_refused({{"controlnets", nlohmann::json::array({nlohmann::json::object(), {{"guidance_start", 1}}})}}, d,
                 {"controlnets[1]", "guidance_start 1.0 and guidance_end 1.0", "send both"});
  // Two equal steps a range tells apart: the stream could not condition one and not the other.
  EXPECT_NO_THROW(apply_settings_json({{"t_index_list", {20, 20}}}, s0, d, {}));
  expect_refused({{"t_index_list", {20, 20}},
                  {"controlnets", nlohmann::json::array({nlohmann::json::object(), {{"guidance_end", 0.5}}})}},
                 d, {"'t_index_list': entries 0 and 1 are both 20", "controlnets[1]", "distinct entries"});
  expect_refused({{"control_image", "!!not base64!!"}}, d, {"control_image"});
  expect_refused({{"control_image", base64_encode("GIF89a not an image")}}, d, {"control_image"});
  expect_refused({{"control_image", 42}}, d, {"control_image", "base64"});
  expect_refused({{"image_prompt", true}}, d, {"image_prompt", "base64"});
  expect_refused({{"ip_adapter_scale", 3}}, d, {"ip_adapter_scale", "out of range"});
  expect_refused({{"controlnet", 1}}, d, {"unknown field 'controlnet'", "controlnets, control_image", "image_prompt"});

  // Accepted: partial entries keep the other key, specs are normalised, images decode (control_image fitted to the
  // stream size), null clears.
  StreamSettings s = apply_settings_json(
      {{"controlnets", nlohmann::json::array({{{"preprocessor", "canny"}}, {{"scale", 0}}})},
       {"control_image", b64_jpeg(96, 72, 1)},
       {"image_prompt", b64_jpeg(40, 30, 2)},
       {"ip_adapter_scale", 0.25}},
      s0, d, {"type"});
  EXPECT_EQ(s.controlnets[0].scale, 1.0);
  EXPECT_EQ(s.controlnets[0].preprocessor, "canny:100:200");
  EXPECT_EQ(s.controlnets[1].scale, 0.0);
  EXPECT_EQ(s.controlnets[1].preprocessor, "gray");
  EXPECT_EQ(s.controlnets[0].guidance_start, 0.0) << "the default range";
  EXPECT_EQ(s.controlnets[0].guidance_end, 1.0);
  EXPECT_EQ(s.control_image.cols, kSize);
  EXPECT_EQ(s.control_image.rows, kSize);
  EXPECT_EQ(s.image_prompt.cols, 40);
  EXPECT_EQ(s.ip_adapter_scale.value_or(-1), 0.25);
  EXPECT_NE(s, s0);
  const nlohmann::json j = s.to_json();
  EXPECT_EQ(j["controlnets"][1]["scale"], 0.0);
  EXPECT_EQ(j["controlnets"][0]["preprocessor"], "canny:100:200");
  EXPECT_EQ(j["has_control_image"], true);
  EXPECT_EQ(j["has_image_prompt"], true);
  EXPECT_FALSE(j.contains("ip_adapter_scale"));
  const StreamSettings cleared = apply_settings_json({{"control_image", nullptr}, {"image_prompt", nullptr}}, s, d, {});
  EXPECT_TRUE(cleared.control_image.empty());
  EXPECT_TRUE(cleared.image_prompt.empty());
  // A range: either end alone moves (the other kept), and the server's units get it with the scale.
  StreamDefaults dr = d;
  dr.controlnets[1].guidance_start = 0.2;  // serve --control-guidance-start 0 0.2
  const StreamSettings r0 = StreamSettings::defaults(dr, false);
  EXPECT_EQ(r0.controlnets[1].guidance_start, 0.2) << "a new client's range is the server's";
  const StreamSettings r1 = apply_settings_json(
      {{"controlnets", nlohmann::json::array({{{"guidance_end", 0.5}}, {{"scale", 1.5}, {"guidance_start", 0.75}}})}},
      r0, dr, {});
  EXPECT_NE(r1, r0);
  const std::vector<sd::ControlNetUnit> units = r1.control_units(dr);
  ASSERT_EQ(units.size(), 2u);
  EXPECT_EQ(units[0].guidance_start, 0.0);
  EXPECT_EQ(units[0].guidance_end, 0.5);
  EXPECT_EQ(units[0].scale, 1.0);
  EXPECT_EQ(units[1].guidance_start, 0.75);
  EXPECT_EQ(units[1].guidance_end, 1.0);
  EXPECT_EQ(units[1].scale, 1.5);
  EXPECT_EQ(r1.to_json()["controlnets"][0]["guidance_end"], 0.5);
  EXPECT_EQ(r1.to_json()["controlnets"][1]["guidance_start"], 0.75);
  // The API takes the same fields (no mode).
  EXPECT_NO_THROW(apply_settings_json({{"controlnets", nlohmann::json::array({{{"scale", 2}}, {{"scale", 0}}})}}, s0, d,
                                      {"image"}, false));
}

class ServerControlNet : public ::testing::Test {
 protected:
  static std::shared_ptr<const sd::DiffusionModels> model() {
    static auto m = [] {
      sd::LoadOptions lo;
      lo.threads = -1;
      return sd::load_pipeline(sd::test::fixture_path(kModel), lo);
    }();
    return m;
  }
  static std::shared_ptr<const sd::ControlNet> controlnet() {
    static auto c = sd::ControlNet::load(sd::test::fixture_path(kCn), *model());
    return c;
  }

  void SetUp() override {
    if (!sd::test::fixture_exists(kModel) || !sd::test::fixture_exists(kCn + "/config.json"))
      GTEST_SKIP() << "no " << kModel << " / " << kCn << " under " << sd::test::fixtures_root();
  }
  void TearDown() override {
    for (auto& s : servers_) s->stop();
  }

  // A server with the tiny ControlNet at `scale` (preprocessor `pre`, a new client's guidance range from
  // `guidance_start`), or without ControlNets.
  uint16_t start(bool with_controlnet, double scale = 1.0, const std::string& pre = "canny",
                 double guidance_start = 0.0) {
    StreamDefaults d = base_defaults();
    if (with_controlnet) {
      d.controlnets = {{controlnet(), scale}};
      d.controlnets[0].guidance_start = guidance_start;
      d.control_preprocessors = {sd::make_control_preprocessor(pre)->name()};  // normalised, as serve does
    }
    ServerOptions o;
    o.host = "127.0.0.1";
    o.port = 0;
    o.web_root.clear();
    o.control_interval_s = 0;  // every control image: the tests look at them
    servers_.push_back(std::make_unique<Server>(model(), d, o));
    servers_.back()->start();
    return servers_.back()->port();
  }

  static nlohmann::json hello(WsClient& c, uint16_t port) {
    EXPECT_EQ(c.connect(port), 101u);
    auto h = c.read_type("hello", std::chrono::seconds(10));
    EXPECT_TRUE(h) << "no hello";
    return h.value_or(nlohmann::json::object());
  }

  // Sends a config and waits for the model thread's reply.
  static nlohmann::json configure(WsClient& c, nlohmann::json j) {
    j["type"] = "config";
    EXPECT_TRUE(c.send_json(j));
    auto cfg = c.read_type("config", std::chrono::seconds(60));
    EXPECT_TRUE(cfg) << "no config reply to " << j.dump().substr(0, 200);
    return cfg.value_or(nlohmann::json::object());
  }

  // Streams frames k = 0..n-1 (96x72 test pictures) and returns the decoded results; text messages go to `texts`.
  static std::vector<cv::Mat> stream(WsClient& c, int n, std::vector<nlohmann::json>* texts = nullptr) {
    std::vector<cv::Mat> out;
    for (int k = 0; k < n; ++k) {
      EXPECT_TRUE(c.send_binary(sd::test::test_jpeg(96, 72, k)));
      auto f = c.read_frame(texts);
      EXPECT_TRUE(f) << "no result for frame " << k;
      if (!f) break;
      out.push_back(sd::test::decode_rgb(*f));
    }
    return out;
  }

  // The PNG the API answers an img2img request with ("" after a failed expectation when it is not 200).
  static std::string img2img_png(uint16_t port, const nlohmann::json& body) {
    const auto r = http_request(port, http::verb::post, "/api/img2img", body.dump());
    EXPECT_EQ(r.status, 200u) << r.body;
    return r.status == 200u ? r.body : std::string();
  }

  // This client's ControlNet calls so far (the stats message).
  static int64_t controlnet_calls(WsClient& c) {
    EXPECT_TRUE(c.send_json({{"type", "stats"}}));
    auto st = c.read_type("stats", std::chrono::seconds(30));
    EXPECT_TRUE(st) << "no stats";
    return st ? (*st)["controlnet_calls"].get<int64_t>() : -1;
  }

  std::vector<std::unique_ptr<Server>> servers_;
};

TEST_F(ServerControlNet, CannyStreamSendsControlImagesAndCounts) {
  const uint16_t port = start(true);
  WsClient c;
  const nlohmann::json h = hello(c, port);
  ASSERT_EQ(h["controlnets"].size(), 1u) << h.dump();
  EXPECT_EQ(h["controlnets"][0]["name"], "tiny-controlnet-sd15");
  EXPECT_EQ(h["controlnets"][0]["scale"], 1.0);
  EXPECT_EQ(h["controlnets"][0]["preprocessor"], "canny:100:200");
  const auto names = h["control_preprocessors"].get<std::vector<std::string>>();
  EXPECT_NE(std::find(names.begin(), names.end(), "canny"), names.end());
  EXPECT_NE(std::find(names.begin(), names.end(), "feedback"), names.end());
  EXPECT_TRUE(h["ip_adapter"].is_null());
  EXPECT_EQ(h["settings"]["controlnets"][0]["preprocessor"], "canny:100:200");

  std::vector<nlohmann::json> texts;
  const auto frames = stream(c, 4, &texts);
  ASSERT_EQ(frames.size(), 4u);
  EXPECT_EQ(frames.back().cols, kSize);
  // The control images: JSON messages with a JPEG data URL of the canny edges of the frame.
  ASSERT_TRUE(c.send_json({{"type", "stats"}}));
  std::optional<nlohmann::json> stats;
  for (int i = 0; i < 20 && !stats; ++i) {
    auto m = c.read(std::chrono::seconds(30));
    ASSERT_TRUE(m.ok);
    if (m.binary) continue;
    auto j = m.json();
    if (j["type"] == "stats") stats = j;
    else texts.push_back(j);
  }
  int controls = 0;
  cv::Mat last;
  for (const auto& t : texts) {
    if (t.value("type", "") != "control") continue;
    ++controls;
    EXPECT_EQ(t["index"], 0);
    const std::string url = t["image"];
    ASSERT_EQ(url.rfind("data:image/jpeg;base64,", 0), 0u);
    last = decode_image(base64_decode(url, "control"), false, "control");
  }
  EXPECT_GE(controls, 3) << "a control image per frame with control_interval_s 0";
  ASSERT_FALSE(last.empty());
  EXPECT_EQ(last.cols, kSize);
  const auto [bw, white] = black_white(last);
  EXPECT_GT(bw, 0.9) << "a canny edge map is black and white";
  EXPECT_GT(white, 0.01) << "the test picture has edges";
  EXPECT_LT(white, 0.5);
  ASSERT_TRUE(stats);
  EXPECT_GE((*stats)["controlnet_calls"].get<int64_t>(), 4) << stats->dump();
  EXPECT_GT((*stats)["controlnet_s"].get<double>(), 0.0);

  // Another preprocessor: gray control images (not black and white).
  configure(c, {{"controlnets", nlohmann::json::array({{{"preprocessor", "gray"}}})}});
  texts.clear();
  stream(c, 2, &texts);
  cv::Mat gray;
  for (const auto& t : texts)
    if (t.value("type", "") == "control")
      gray = decode_image(base64_decode(t["image"].get<std::string>(), "control"), false, "control");
  ASSERT_FALSE(gray.empty()) << "a control image after the first frame";
  EXPECT_LT(black_white(gray).first, 0.8) << "gray levels, not edges";
  cv::Mat ch[3];
  cv::split(gray, ch);
  EXPECT_LT(cv::norm(ch[0], ch[2], cv::NORM_L1) / static_cast<double>(gray.total()), 3.0) << "gray: equal channels";
  c.close();
}

TEST_F(ServerControlNet, ScaleZeroEqualsNoControlNetAndScaleOneDiffers) {
  const uint16_t plain = start(false), cn = start(true);
  WsClient a, b, z;
  hello(a, plain);
  hello(b, cn);
  hello(z, cn);
  const nlohmann::json cfg = configure(z, {{"controlnets", nlohmann::json::array({{{"scale", 0}}})}});
  EXPECT_EQ(cfg["settings"]["controlnets"][0]["scale"], 0.0) << cfg.dump();
  const auto pa = stream(a, 4), pb = stream(b, 4), pz = stream(z, 4);
  ASSERT_EQ(pa.size(), 4u);
  ASSERT_EQ(pb.size(), 4u);
  ASSERT_EQ(pz.size(), 4u);
  for (int k = 0; k < 4; ++k) EXPECT_EQ(sd::test::mean_abs_diff(pa[k], pz[k]), 0.0) << "frame " << k;
  const double d = sd::test::mean_abs_diff(pa[3], pb[3]);
  std::printf("mean |diff| ControlNet scale 1 vs none: %.3f\n", d);
  EXPECT_GT(d, 0.05) << "the ControlNet changes the output";

  // The same through the API (img2img: the input image is preprocessed).
  const nlohmann::json body = {{"prompt", "a cat"}, {"seed", 4}, {"image", b64_jpeg(96, 72, 3)}};
  nlohmann::json zero = body;
  zero["controlnets"] = nlohmann::json::array({{{"scale", 0}}});
  const std::string r0 = img2img_png(plain, body), rz = img2img_png(cn, zero), r1 = img2img_png(cn, body);
  ASSERT_FALSE(r0.empty() || rz.empty() || r1.empty());
  EXPECT_EQ(r0, rz) << "scale 0 = no ControlNet";
  EXPECT_NE(r0, r1);
}

// img2img's t_index_list is {32, 45}: steps 0 and 1 of 2. A range from 0.6 keeps neither, 0..0.5 keeps step 0.
TEST_F(ServerControlNet, GuidanceRangePerClientLiveAndInTheApi) {
  const uint16_t plain = start(false), full = start(true), late = start(true, 1.0, "canny", 0.6);
  WsClient a, f, z, h;
  hello(a, plain);
  hello(f, full);
  const nlohmann::json hz = hello(z, late);
  EXPECT_EQ(hz["controlnets"][0]["guidance_start"], 0.6) << "the server's default range, told to the page";
  EXPECT_EQ(hz["controlnets"][0]["guidance_end"], 1.0);
  EXPECT_EQ(hz["settings"]["controlnets"][0]["guidance_start"], 0.6);
  hello(h, full);
  const nlohmann::json cfg = configure(h, {{"controlnets", nlohmann::json::array({{{"guidance_end", 0.5}}})}});
  EXPECT_EQ(cfg["settings"]["controlnets"][0]["guidance_end"], 0.5) << cfg.dump();
  EXPECT_EQ(cfg["settings"]["controlnets"][0]["guidance_start"], 0.0);
  const auto pa = stream(a, 4), pf = stream(f, 4), pz = stream(z, 4), ph = stream(h, 4);
  ASSERT_EQ(pa.size(), 4u);
  ASSERT_EQ(pf.size(), 4u);
  ASSERT_EQ(pz.size(), 4u);
  ASSERT_EQ(ph.size(), 4u);
  for (int k = 0; k < 4; ++k) EXPECT_EQ(sd::test::mean_abs_diff(pa[k], pz[k]), 0.0) << "no step kept, frame " << k;
  EXPECT_EQ(controlnet_calls(z), 0) << "a ControlNet no step keeps is not run";
  const double to_plain = sd::test::mean_abs_diff(ph[3], pa[3]), to_full = sd::test::mean_abs_diff(ph[3], pf[3]);
  std::printf("mean |diff| of the first half's range: to no ControlNet %.3f, to the full range %.3f\n", to_plain,
              to_full);
  EXPECT_GT(to_plain, 0.05) << "step 0 is conditioned";
  EXPECT_GT(to_full, 0.05) << "step 1 is not";
  EXPECT_GT(controlnet_calls(h), 0);

  // Live: the range moves on the client's running stream (its ControlNet runs again, then stops again).
  configure(z, {{"controlnets", nlohmann::json::array({{{"guidance_start", 0}}})}});
  ASSERT_EQ(stream(z, 2).size(), 2u);
  const int64_t on = controlnet_calls(z);
  EXPECT_GE(on, 2) << "the full range conditions every call";
  configure(z, {{"controlnets", nlohmann::json::array({{{"guidance_start", 0.6}}})}});
  ASSERT_EQ(stream(z, 2).size(), 2u);
  EXPECT_EQ(controlnet_calls(z), on) << "no step kept again";
  // A start past the end is refused naming the rule; nothing of the message applies.
  ASSERT_TRUE(z.send_json({{"type", "config"}, {"controlnets", nlohmann::json::array({{{"guidance_end", 0.5}}})}}));
  auto e = z.read_type("error", std::chrono::seconds(30));
  ASSERT_TRUE(e);
  EXPECT_NE((*e)["message"].get<std::string>().find("0 <= start < end <= 1"), std::string::npos) << e->dump();

  // The API: a range is per request; one that keeps no step equals no ControlNet.
  const nlohmann::json body = {{"prompt", "a cat"}, {"seed", 4}, {"image", b64_jpeg(96, 72, 3)}};
  nlohmann::json none = body, half = body;
  none["controlnets"] = nlohmann::json::array({{{"guidance_start", 0.6}}});
  half["controlnets"] = nlohmann::json::array({{{"guidance_end", 0.5}}});
  const std::string r0 = img2img_png(plain, body), rn = img2img_png(full, none), rh = img2img_png(full, half),
                    r1 = img2img_png(full, body);
  ASSERT_FALSE(r0.empty() || rn.empty() || rh.empty() || r1.empty());
  EXPECT_EQ(r0, rn) << "no step kept = no ControlNet";
  EXPECT_NE(rh, r0) << "step 0 is conditioned";
  EXPECT_NE(rh, r1) << "step 1 is not, and the range did not stay on the server's kept stream";

  // A range that keeps no step needs no control image: txt2img ({0, 16, 32, 45}, from 0.9: none) has no frames to
  // preprocess and runs without one, over the WebSocket and through the API.
  WsClient t;
  hello(t, full);
  configure(t, {{"mode", "txt2img"}, {"controlnets", nlohmann::json::array({{{"guidance_start", 0.9}}})}});
  ASSERT_TRUE(t.send_json({{"type", "generate"}}));
  EXPECT_TRUE(t.read_frame()) << "a txt2img frame without a control image";
  const auto t2i = http_request(full, http::verb::post, "/api/txt2img",
                                R"({"prompt":"a cat","controlnets":[{"guidance_start":0.9}]})");
  EXPECT_EQ(t2i.status, 200u) << t2i.body;
}

TEST_F(ServerControlNet, StaticControlImageForTxt2ImgSetUsedAndCleared) {
  const uint16_t port = start(true);
  WsClient c;
  hello(c, port);
  configure(c, {{"mode", "txt2img"}});
  // txt2img has no frames for canny: a clear error per request.
  ASSERT_TRUE(c.send_json({{"type", "generate"}}));
  auto e = c.read_type("error", std::chrono::seconds(60));
  ASSERT_TRUE(e);
  const std::string msg = (*e)["message"];
  EXPECT_NE(msg.find("controlnets[0]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("control_image"), std::string::npos) << msg;

  // A static control image: used for every request (sent back as the control image), until cleared.
  const std::string jpeg = sd::test::test_jpeg(96, 72, 5);
  const cv::Mat want = fit_image(decode_image(jpeg, false, "t"), kSize, kSize);
  const nlohmann::json cfg =
      configure(c, {{"control_image", "data:image/jpeg;base64," + base64_encode(jpeg)}});
  EXPECT_EQ(cfg["settings"]["has_control_image"], true) << cfg.dump();
  std::vector<nlohmann::json> texts;
  std::vector<cv::Mat> outs;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(c.send_json({{"type", "generate"}}));
    auto f = c.read_frame(&texts);
    ASSERT_TRUE(f) << "no txt2img frame with a control image";
    outs.push_back(sd::test::decode_rgb(*f));
  }
  auto ctl = c.read_type("control", std::chrono::seconds(10));
  ASSERT_TRUE(ctl);
  const cv::Mat got = decode_image(base64_decode((*ctl)["image"].get<std::string>(), "control"), false, "control");
  EXPECT_LT(sd::test::mean_abs_diff(got, want), 6.0) << "the control image sent back is the static one";

  // A different static image changes the txt2img output (same seed, same prompt).
  WsClient c2;
  hello(c2, port);
  configure(c2, {{"mode", "txt2img"},
                 {"control_image", b64_jpeg(96, 72, 9)},
                 {"controlnets", nlohmann::json::array({{{"scale", 2}}})}});
  std::vector<cv::Mat> outs2;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(c2.send_json({{"type", "generate"}}));
    auto f = c2.read_frame();
    ASSERT_TRUE(f);
    outs2.push_back(sd::test::decode_rgb(*f));
  }
  EXPECT_GT(sd::test::mean_abs_diff(outs[2], outs2[2]), 0.05);
  c2.close();

  const nlohmann::json cleared = configure(c, {{"control_image", nullptr}});
  EXPECT_EQ(cleared["settings"]["has_control_image"], false);
  ASSERT_TRUE(c.send_json({{"type", "generate"}}));
  e = c.read_type("error", std::chrono::seconds(60));
  ASSERT_TRUE(e);
  EXPECT_NE((*e)["message"].get<std::string>().find("control_image"), std::string::npos);

  // feedback needs no image: the previous output (black before the first one).
  configure(c, {{"controlnets", nlohmann::json::array({{{"preprocessor", "feedback"}}})}});
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(c.send_json({{"type", "generate"}}));
    ASSERT_TRUE(c.read_frame()) << "feedback in txt2img streams";
  }
  c.close();
}

TEST_F(ServerControlNet, FeedbackUsesThePreviousOutput) {
  const uint16_t port = start(true, 1.0, "feedback");
  WsClient c;
  hello(c, port);
  std::vector<nlohmann::json> texts;
  const auto outs = stream(c, 3, &texts);
  ASSERT_EQ(outs.size(), 3u);
  auto last = c.read_type("control", std::chrono::seconds(10));  // the third frame's control image follows it
  ASSERT_TRUE(last);
  texts.push_back(*last);
  std::vector<cv::Mat> controls;
  for (const auto& t : texts)
    if (t.value("type", "") == "control")
      controls.push_back(decode_image(base64_decode(t["image"].get<std::string>(), "control"), false, "control"));
  ASSERT_EQ(controls.size(), 3u);
  // Frame k's control image is output k-1 (JPEG twice: a small difference); the first one is the input frame.
  EXPECT_LT(sd::test::mean_abs_diff(controls[1], outs[0]), 4.0);
  EXPECT_LT(sd::test::mean_abs_diff(controls[2], outs[1]), 4.0);
  const cv::Mat first = fit_image(decode_image(sd::test::test_jpeg(96, 72, 0), false, "t"), kSize, kSize);
  EXPECT_LT(sd::test::mean_abs_diff(controls[0], first), 6.0) << "before any output: the input frame";
  c.close();
}

TEST_F(ServerControlNet, ApiFieldsAndWebSocketErrors) {
  const uint16_t port = start(true);
  const auto no_image = http_request(port, http::verb::post, "/api/txt2img", R"({"prompt":"a cat"})");
  EXPECT_EQ(no_image.status, 400u);
  EXPECT_NE(no_image.body.find("control_image"), std::string::npos) << no_image.body;
  const nlohmann::json with_image = {{"prompt", "a cat"}, {"control_image", b64_jpeg(64, 64, 2)}};
  const auto ok = http_request(port, http::verb::post, "/api/txt2img", with_image.dump());
  ASSERT_EQ(ok.status, 200u) << ok.body;
  EXPECT_EQ(ok.content_type, "image/png");
  const auto zero = http_request(port, http::verb::post, "/api/txt2img",
                                 R"({"prompt":"a cat","controlnets":[{"scale":0}]})");
  EXPECT_EQ(zero.status, 200u) << "scale 0 needs no control image: " << zero.body;
  const auto bad = http_request(port, http::verb::post, "/api/txt2img",
                                R"({"prompt":"a cat","controlnets":[{"scale":1},{"scale":1}]})");
  EXPECT_EQ(bad.status, 400u);
  EXPECT_NE(bad.body.find("'controlnets'"), std::string::npos) << bad.body;
  const auto ip = http_request(port, http::verb::post, "/api/txt2img", R"({"prompt":"a cat","image_prompt":null})");
  EXPECT_EQ(ip.status, 400u);
  EXPECT_NE(ip.body.find("image_prompt"), std::string::npos) << ip.body;

  // Over the WebSocket: refused (naming the field), nothing applied, the stream goes on.
  WsClient c;
  hello(c, port);
  ASSERT_TRUE(c.send_json({{"type", "config"}, {"prompt", "a dog"},
                           {"controlnets", nlohmann::json::array({{{"scale", -1}}})}}));
  auto e = c.read_type("error", std::chrono::seconds(30));
  ASSERT_TRUE(e);
  EXPECT_NE((*e)["message"].get<std::string>().find("controlnets[0].scale"), std::string::npos) << e->dump();
  ASSERT_TRUE(c.send_json({{"type", "config"}, {"controlnets", nlohmann::json::array({{{"preprocessor", "pose"}}})}}));
  e = c.read_type("error", std::chrono::seconds(30));
  ASSERT_TRUE(e);
  EXPECT_NE((*e)["message"].get<std::string>().find("controlnets[0].preprocessor"), std::string::npos) << e->dump();
  ASSERT_TRUE(c.send_json({{"type", "config"}, {"control_image", "data:image/png;base64,AAAA"}}));
  e = c.read_type("error", std::chrono::seconds(30));
  ASSERT_TRUE(e);
  EXPECT_NE((*e)["message"].get<std::string>().find("control_image"), std::string::npos) << e->dump();
  const auto frames = stream(c, 2);
  EXPECT_EQ(frames.size(), 2u);
  ASSERT_TRUE(c.send_json({{"type", "stats"}}));
  auto st = c.read_type("stats", std::chrono::seconds(30));
  ASSERT_TRUE(st);
  EXPECT_EQ((*st)["errors"].get<int64_t>(), 3) << st->dump();
  c.close();
}

TEST(ServerIpAdapter, ImagePromptPerClientAndServerWideScale) {
  if (!sd::test::fixture_exists(kModel) || !sd::test::fixture_exists(kIpAdapter))
    GTEST_SKIP() << "no " << kModel << " / " << kIpAdapter;
  sd::LoadOptions lo;
  lo.threads = -1;
  lo.ip_adapter = sd::test::fixture_path(kIpAdapter);
  auto models = sd::load_pipeline(sd::test::fixture_path(kModel), lo);
  StreamDefaults d = base_defaults();
  d.ip_adapter = models->ip_adapter() != nullptr;
  ASSERT_TRUE(d.ip_adapter);
  ServerOptions o;
  o.host = "127.0.0.1";
  o.port = 0;
  o.web_root.clear();
  Server server(models, d, o);
  server.start();
  const uint16_t port = server.port();

  // The API: an image prompt changes the image; at ip_adapter_scale 0 it equals none (the plain UNet).
  const nlohmann::json plain = {{"prompt", "a cat"}, {"seed", 3}};
  nlohmann::json with = plain;
  with["image_prompt"] = b64_jpeg(48, 48, 4);
  const auto r0 = http_request(port, http::verb::post, "/api/txt2img", plain.dump());
  const auto r1 = http_request(port, http::verb::post, "/api/txt2img", with.dump());
  ASSERT_EQ(r0.status, 200u) << r0.body;
  ASSERT_EQ(r1.status, 200u) << r1.body;
  EXPECT_NE(r0.body, r1.body) << "the image prompt has an effect";
  nlohmann::json off = with;
  off["ip_adapter_scale"] = 0;
  const auto r2 = http_request(port, http::verb::post, "/api/txt2img", off.dump());
  ASSERT_EQ(r2.status, 200u) << r2.body;
  EXPECT_NEAR(models->ip_adapter()->adapter->scale(), 0.0, 0.0) << "server-wide";
  nlohmann::json plain_off = plain;
  const auto r3 = http_request(port, http::verb::post, "/api/txt2img", plain_off.dump());
  EXPECT_EQ(r2.body, r3.body) << "scale 0: the image prompt has no effect";

  // The WebSocket: hello says there is an IP-Adapter, the scale request comes back in the config reply, an image
  // prompt is per client (has_image_prompt), frames flow, null clears.
  WsClient c;
  ASSERT_EQ(c.connect(port), 101u);
  auto h = c.read_type("hello", std::chrono::seconds(10));
  ASSERT_TRUE(h);
  EXPECT_EQ((*h)["ip_adapter"]["scale"], 0.0);
  EXPECT_EQ((*h)["settings"]["has_image_prompt"], false);
  ASSERT_TRUE(c.send_json({{"type", "config"}, {"image_prompt", b64_jpeg(40, 40, 1)}, {"ip_adapter_scale", 0.8}}));
  auto cfg = c.read_type("config", std::chrono::seconds(60));
  ASSERT_TRUE(cfg);
  EXPECT_EQ((*cfg)["settings"]["has_image_prompt"], true) << cfg->dump();
  EXPECT_NEAR((*cfg)["settings"]["ip_adapter_scale"].get<double>(), 0.8, 1e-12);
  for (int k = 0; k < 2; ++k) {
    ASSERT_TRUE(c.send_binary(sd::test::test_jpeg(64, 64, k)));
    ASSERT_TRUE(c.read_frame()) << "frames with an image prompt";
  }
  WsClient other;
  ASSERT_EQ(other.connect(port), 101u);
  auto h2 = other.read_type("hello", std::chrono::seconds(10));
  ASSERT_TRUE(h2);
  EXPECT_EQ((*h2)["settings"]["has_image_prompt"], false) << "another client has its own (none)";
  EXPECT_NEAR((*h2)["ip_adapter"]["scale"].get<double>(), 0.8, 1e-12) << "the scale is server-wide";
  other.close();
  ASSERT_TRUE(c.send_json({{"type", "config"}, {"image_prompt", nullptr}}));
  cfg = c.read_type("config", std::chrono::seconds(60));
  ASSERT_TRUE(cfg);
  EXPECT_EQ((*cfg)["settings"]["has_image_prompt"], false);
  ASSERT_TRUE(c.send_binary(sd::test::test_jpeg(64, 64, 3)));
  EXPECT_TRUE(c.read_frame());
  c.close();
  server.stop();
}
