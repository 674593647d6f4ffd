// Server components without a model: image probing and decoding limits, base64, static file resolution and
// traversal protection, MIME types, the Origin rule, the settings JSON and the model worker's round robin.
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>
#include <thread>

#include <map>

#include <gtest/gtest.h>

#include "common/fixtures.h"
#include "core/error.h"
#include "pipeline/stream_test_stubs.h"
#include "server/api_handlers.h"
#include "server/image_codec.h"
#include "server/model_worker.h"
#include "server/static_files.h"
#include "server/stream_settings.h"
#include "server/websocket_session.h"
#include "server_test_util.h"

namespace fs = std::filesystem;
using namespace sd::server;

// Both places that drop a request (a pending input replaced, a queued output pushed out) answer with this message; the
// page counts it by "type" and shows "where".
TEST(ServerMessages, DroppedReplyJson) {
  EXPECT_EQ(dropped_message(DropPoint::Input),
            nlohmann::json::parse(R"({"type":"dropped","where":"input","reason":"replaced by a newer request"})"));
  EXPECT_EQ(dropped_message(DropPoint::Output),
            nlohmann::json::parse(R"({"type":"dropped","where":"output","reason":"the send queue is full"})"));
}

TEST(ImageCodec, ProbesAndDecodesJpegAndPng) {
  const std::string jpg = sd::test::test_jpeg(40, 24);
  const ImageHeader h = probe_image(jpg, "frame");
  EXPECT_EQ(h.format, ImageFormat::Jpeg);
  EXPECT_EQ(h.width, 40);
  EXPECT_EQ(h.height, 24);
  const cv::Mat rgb = decode_image(jpg, false, "frame");
  EXPECT_EQ(rgb.cols, 40);
  EXPECT_EQ(rgb.rows, 24);
  const std::string png = encode_png(rgb);
  const ImageHeader hp = probe_image(png, "image");
  EXPECT_EQ(hp.format, ImageFormat::Png);
  EXPECT_EQ(hp.width, 40);
  EXPECT_THROW(decode_image(png, false, "frame"), sd::InvalidArgument);  // frames are JPEG only
  EXPECT_EQ(decode_image(png, true, "image").cols, 40);
}

TEST(ImageCodec, RejectsGarbageTruncatedAndAbsurdSizes) {
  EXPECT_THROW(probe_image("hello world", "frame"), sd::InvalidArgument);
  EXPECT_THROW(probe_image("", "frame"), sd::InvalidArgument);
  std::string jpg = sd::test::test_jpeg(64, 64);
  // Truncated right after the header: probe passes, the decoder must refuse (or OpenCV pads: then still 64x64).
  EXPECT_THROW(decode_image(jpg.substr(0, 20), false, "frame"), sd::InvalidArgument);
  // Garbage with a JPEG signature.
  std::string junk = "\xFF\xD8\xFF\xE0";
  junk += std::string(200, '\x5A');
  EXPECT_THROW(decode_image(junk, false, "frame"), sd::InvalidArgument);
  // A header that claims 60000 x 60000 pixels is refused before decoding.
  for (size_t i = 2; i + 9 < jpg.size(); ++i) {
    if (static_cast<unsigned char>(jpg[i]) == 0xFF && static_cast<unsigned char>(jpg[i + 1]) == 0xC0) {
      jpg[i + 5] = static_cast<char>(0xEA);
      jpg[i + 6] = static_cast<char>(0x60);
      jpg[i + 7] = static_cast<char>(0xEA);
      jpg[i + 8] = static_cast<char>(0x60);
      break;
    }
  }
  try {
    probe_image(jpg, "frame");
    FAIL() << "expected an out-of-range size error";
  } catch (const sd::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("60000x60000"), std::string::npos) << e.what();
  }
  EXPECT_THROW(probe_image(sd::test::test_jpeg(4, 4), "frame"), sd::InvalidArgument);  // below 8 px
}

TEST(ImageCodec, FitCropsToTheAspectAndResizes) {
  cv::Mat wide(40, 120, CV_8UC3, cv::Scalar(0, 0, 0));
  wide(cv::Rect(40, 0, 40, 40)).setTo(cv::Scalar(255, 255, 255));  // the centre third is white
  const cv::Mat out = fit_image(wide, 16, 16);
  EXPECT_EQ(out.cols, 16);
  EXPECT_EQ(out.rows, 16);
  EXPECT_GT(cv::mean(out)[0], 250.0);  // only the centre square is kept
}

TEST(ImageCodec, Base64RoundTripAndErrors) {
  for (const std::string& s : std::vector<std::string>{"", "a", "ab", "abc", "abcd", std::string("\x00\xff\x10", 3)})
    EXPECT_EQ(base64_decode(base64_encode(s), "b64"), s);
  EXPECT_EQ(base64_decode("data:image/png;base64,aGVsbG8=", "b64"), "hello");
  EXPECT_EQ(base64_decode("aGVs\nbG8", "b64"), "hello");
  EXPECT_THROW(base64_decode("aGV*sbG8=", "b64"), sd::InvalidArgument);
  EXPECT_THROW(base64_decode("data:text/plain,hello", "b64"), sd::InvalidArgument);
}

TEST(StaticFiles, ServesFilesAndRefusesTraversal) {
  const fs::path tmp = sd::test::make_temp_dir("static");
  fs::create_directories(tmp / "root" / "sub");
  std::ofstream(tmp / "root" / "index.html") << "<h1>hi</h1>";
  std::ofstream(tmp / "root" / "app.js") << "export {}";
  std::ofstream(tmp / "root" / "sub" / "index.html") << "sub";
  std::ofstream(tmp / "root" / ".env") << "SECRET=1";
  std::ofstream(tmp / "secret.txt") << "secret";
  fs::create_symlink(tmp / "secret.txt", tmp / "root" / "link.txt");
  const StaticFiles files((tmp / "root").string());

  auto ok = files.resolve("/");
  ASSERT_EQ(ok.status, StaticFiles::Status::Ok);
  EXPECT_EQ(ok.mime, "text/html; charset=utf-8");
  EXPECT_EQ(files.resolve("/app.js?v=3").mime, "text/javascript; charset=utf-8");
  EXPECT_EQ(files.resolve("/sub/").status, StaticFiles::Status::Ok);
  EXPECT_EQ(files.resolve("/missing.css").status, StaticFiles::Status::NotFound);
  for (const std::string bad : {"/../secret.txt", "/sub/../../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E%2fsecret.txt",
                                "/..%5csecret.txt", "/sub%2f..%2f..%2fsecret.txt", "/.env", "/link.txt",
                                "/app.js%00.png", "/%zz", "relative.txt", "/a\\..\\secret.txt"}) {
    const auto r = files.resolve(bad);
    EXPECT_NE(r.status, StaticFiles::Status::Ok) << bad << " resolved to " << r.path;
  }
  EXPECT_EQ(files.resolve("/link.txt").status, StaticFiles::Status::Forbidden);
  EXPECT_THROW(StaticFiles((tmp / "nope").string()), sd::InvalidArgument);
  fs::remove_all(tmp);
}

TEST(StaticFiles, MimeTypes) {
  EXPECT_EQ(mime_type("a/b.CSS"), "text/css; charset=utf-8");
  EXPECT_EQ(mime_type("x.png"), "image/png");
  EXPECT_EQ(mime_type("x.mjs"), "text/javascript; charset=utf-8");
  EXPECT_EQ(mime_type("dir.v2/README"), "application/octet-stream");
}

TEST(OriginCheck, SameHostLiteralsAndTheAllowList) {
  const std::vector<std::string> none;
  EXPECT_TRUE(origin_allowed("", "127.0.0.1:8000", none));  // not a browser
  EXPECT_TRUE(origin_allowed("http://127.0.0.1:8000", "127.0.0.1:8000", none));
  EXPECT_TRUE(origin_allowed("http://localhost:8000", "localhost:8000", none));
  EXPECT_TRUE(origin_allowed("http://[::1]:8000", "[::1]:8000", none));
  EXPECT_FALSE(origin_allowed("http://localhost:9000", "localhost:8000", none));  // another port
  EXPECT_FALSE(origin_allowed("http://evil.example", "127.0.0.1:8000", none));
  // DNS rebinding: the attacker's name points at 127.0.0.1, so Host matches — refused unless listed.
  EXPECT_FALSE(origin_allowed("http://evil.example:8000", "evil.example:8000", none));
  EXPECT_FALSE(origin_allowed("null", "127.0.0.1:8000", none));
  EXPECT_TRUE(origin_allowed("https://studio.example", "127.0.0.1:8000", {"https://studio.example/"}));
  EXPECT_TRUE(origin_allowed("http://anything", "127.0.0.1:8000", {"*"}));
}

namespace {
StreamDefaults test_defaults() {
  StreamDefaults d;
  d.img2img.t_index_list = {32, 45};
  d.txt2img.t_index_list = {0, 16, 32, 45};
  d.txt2img.cfg_type = sd::CfgType::None;
  d.prompt = "a cat";
  return d;
}
}  // namespace

TEST(StreamSettingsJson, AppliesValidatesAndNamesUnknownFields) {
  const StreamDefaults d = test_defaults();
  const StreamSettings s0 = StreamSettings::defaults(d, false);
  EXPECT_EQ(s0.prompt, "a cat");
  const StreamSettings s1 = apply_settings_json(
      {{"type", "config"}, {"prompt", "a dog"}, {"guidance", 1.5}, {"t_index_list", {20, 40}}, {"seed", 7}}, s0, d,
      {"type"});
  EXPECT_EQ(s1.prompt, "a dog");
  EXPECT_DOUBLE_EQ(s1.guidance, 1.5);
  EXPECT_EQ(s1.t_index_list, (std::vector<int64_t>{20, 40}));
  EXPECT_EQ(s1.seed, 7u);
  const StreamSettings s2 = apply_settings_json({{"mode", "txt2img"}}, s1, d, {});
  EXPECT_TRUE(s2.txt2img);
  EXPECT_EQ(s2.t_index_list, d.txt2img.t_index_list);  // the mode's default
  EXPECT_EQ(apply_settings_json({{"steps", 3}}, s0, d, {}).t_index_list, (std::vector<int64_t>{32, 38, 45}));
  try {
    apply_settings_json({{"prompt", "x"}, {"colour", "red"}}, s0, d, {});
    FAIL();
  } catch (const sd::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("unknown field 'colour'"), std::string::npos) << e.what();
  }
  EXPECT_THROW(apply_settings_json({{"guidance", "high"}}, s0, d, {}), sd::InvalidArgument);
  EXPECT_THROW(apply_settings_json({{"guidance", 1e9}}, s0, d, {}), sd::InvalidArgument);
  EXPECT_THROW(apply_settings_json({{"t_index_list", {50}}}, s0, d, {}), sd::InvalidArgument);
  EXPECT_THROW(apply_settings_json({{"t_index_list", nlohmann::json::array()}}, s0, d, {}), sd::InvalidArgument);
  EXPECT_THROW(apply_settings_json({{"seed", -1}}, s0, d, {}), sd::InvalidArgument);
  EXPECT_THROW(apply_settings_json({{"mode", "video"}}, s0, d, {}), sd::InvalidArgument);
  EXPECT_THROW(apply_settings_json({{"mode", "txt2img"}}, s0, d, {}, false), sd::InvalidArgument);
  EXPECT_THROW(apply_settings_json({{"steps", 2}, {"t_index_list", {1}}}, s0, d, {}), sd::InvalidArgument);
  EXPECT_THROW(apply_settings_json({{"prompt", std::string(3000, 'a')}}, s0, d, {}), sd::InvalidArgument);
  EXPECT_THROW(apply_settings_json(nlohmann::json::array(), s0, d, {}), sd::InvalidArgument);
}

// "lora": {name: scale} names only LoRAs the server loaded, scales in [-10, 10]; without LoRAs the field is refused.
TEST(StreamSettingsJson, LoraField) {
  StreamDefaults d = test_defaults();
  const StreamSettings s0 = StreamSettings::defaults(d, false);
  auto error = [&](const nlohmann::json& j) {
    try {
      apply_settings_json(j, s0, d, {});
    } catch (const sd::InvalidArgument& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(error({{"lora", {{"style", 0.5}}}}).find("no LoRA is loaded"), std::string::npos);
  d.lora_names = {"lcm", "style"};
  const StreamSettings s1 = apply_settings_json({{"lora", {{"style", 0.5}, {"lcm", -1}}}}, s0, d, {});
  EXPECT_EQ(s1.lora, (std::map<std::string, double>{{"lcm", -1.0}, {"style", 0.5}}));
  EXPECT_TRUE(s1 == s0) << "LoRA requests are server-wide, not part of a stream's settings";
  EXPECT_FALSE(s1.to_json().contains("lora"));
  EXPECT_NE(error({{"lora", {{"other", 0.5}}}}).find("no LoRA named 'other' (loaded: lcm, style)"), std::string::npos);
  EXPECT_NE(error({{"lora", {{"style", 11}}}}).find("out of range"), std::string::npos);
  EXPECT_NE(error({{"lora", {{"style", "high"}}}}).find("expected a number"), std::string::npos);
  EXPECT_NE(error({{"lora", 0.5}}).find("expected an object"), std::string::npos);
  EXPECT_NE(error({{"colour", 1}}).find(", lora)"), std::string::npos) << "the field list names lora when loaded";
}

// The live performance controls: prompt_list, seed_list, transition, prompt_blend, latent_feedback, with bounds; a
// plain prompt / seed replaces the list.
TEST(StreamSettingsJson, BlendTransitionAndFeedbackFields) {
  const auto J = [](const char* text) { return nlohmann::json::parse(text); };
  const StreamDefaults d = test_defaults();
  const StreamSettings s0 = StreamSettings::defaults(d, false);
  EXPECT_TRUE(s0.prompt_list.empty());
  EXPECT_EQ(s0.prompts(), (std::vector<sd::WeightedPrompt>{{"a cat", 1.0}}));
  const StreamSettings s1 = apply_settings_json(J(R"J({"prompt_list": [["a cat", 1], ["a (dog:1.2)", 0.5]],
      "seed_list": [[1, 0.7], [2, 0.3]], "transition": "30f", "prompt_blend": "slerp", "latent_feedback": 0.25})J"),
                                                s0, d, {});
  EXPECT_EQ(s1.prompt_list, (std::vector<sd::WeightedPrompt>{{"a cat", 1.0}, {"a (dog:1.2)", 0.5}}));
  EXPECT_EQ(s1.prompts(), s1.prompt_list);
  EXPECT_EQ(s1.seed_list, (std::vector<sd::WeightedSeed>{{1, 0.7}, {2, 0.3}}));
  EXPECT_EQ(s1.transition.frames, 30);
  EXPECT_EQ(s1.prompt_blend, sd::BlendMethod::Slerp);
  EXPECT_EQ(s1.latent_feedback, 0.25);
  EXPECT_TRUE(s1 != s0);
  const sd::StreamConfig c = s1.config(d);
  EXPECT_EQ(c.seed_list, s1.seed_list);
  EXPECT_EQ(c.transition.frames, 30);
  EXPECT_EQ(c.prompt_blend, sd::BlendMethod::Slerp);
  EXPECT_EQ(c.latent_feedback, 0.25);
  const nlohmann::json j = s1.to_json();
  EXPECT_EQ(j["prompt_list"], J(R"J([["a cat", 1.0], ["a (dog:1.2)", 0.5]])J"));
  EXPECT_EQ(j["seed_list"], J("[[1, 0.7], [2, 0.3]]"));
  EXPECT_EQ(j["transition"], "30f");
  EXPECT_EQ(j["prompt_blend"], "slerp");
  // to_json() round-trips through apply_settings_json
  const StreamSettings back = apply_settings_json(j, s0, d, {"has_image_prompt"});
  EXPECT_TRUE(back == s1);
  // objects, seconds, and a plain prompt / seed clearing the lists
  const StreamSettings s2 =
      apply_settings_json(J(R"({"prompt_list": [{"text": "x", "weight": 2}, {"text": "y"}], "transition": 1.5})"), s0, d, {});
  EXPECT_EQ(s2.prompt_list, (std::vector<sd::WeightedPrompt>{{"x", 2.0}, {"y", 1.0}}));
  EXPECT_EQ(s2.transition.seconds, 1.5);
  const StreamSettings s3 = apply_settings_json(J(R"({"prompt": "a bird", "seed": 9})"), s1, d, {});
  EXPECT_TRUE(s3.prompt_list.empty());
  EXPECT_TRUE(s3.seed_list.empty());
  EXPECT_EQ(s3.prompts(), (std::vector<sd::WeightedPrompt>{{"a bird", 1.0}}));
  EXPECT_TRUE(apply_settings_json(J(R"({"prompt_list": null})"), s1, d, {}).prompt_list.empty());
  EXPECT_TRUE(apply_settings_json(J(R"({"seed_list": []})"), s1, d, {}).seed_list.empty());
  // txt2img streams take no latent feedback
  EXPECT_EQ(apply_settings_json(J(R"({"mode": "txt2img"})"), s1, d, {}).config(d).latent_feedback, 0.0);

  auto error = [&](const nlohmann::json& j) {
    try {
      apply_settings_json(j, s0, d, {});
    } catch (const sd::InvalidArgument& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  nlohmann::json many = nlohmann::json::array();
  for (int i = 0; i < 17; ++i) many.push_back(nlohmann::json::array({"p" + std::to_string(i), 1}));
  nlohmann::json too_many = nlohmann::json::object();
  too_many["prompt_list"] = many;
  EXPECT_NE(error(too_many).find("at most 16"), std::string::npos) << error(too_many);
  nlohmann::json long_text = nlohmann::json::object();
  long_text["prompt_list"] = nlohmann::json::array({nlohmann::json::array({std::string(3000, 'a'), 1})});
  EXPECT_NE(error(long_text).find("bytes, at most"), std::string::npos) << error(long_text);
  for (const auto& [text, words] : std::vector<std::pair<std::string, std::string>>{
           {R"({"prompt_list": "a cat"})", "field 'prompt_list': expected an array"},
           {R"({"prompt_list": [["a", -1]]})", "prompt_list[0][1]"},
           {R"({"prompt_list": [["a", 101]]})", "out of range"},
           {R"({"prompt_list": [["a", 0], ["b", 0]]})", "every weight is 0"},
           {R"({"prompt_list": [[1, 1]]})", "expected a string"},
           {R"({"prompt_list": [{"text": "a", "w": 1}]})", "expected [text, weight]"},
           {R"({"seed_list": [[-1, 1]]})", "seed_list[0][0]"},
           {R"({"seed_list": [[1.5, 1]]})", "expected an integer"},
           {R"({"seed_list": [[1, 1, 1]]})", "expected [seed, weight]"},
           {R"({"transition": 61})", "out of range"},
           {R"({"transition": "4000f"})", "out of range"},
           {R"({"transition": "soon"})", "field 'transition'"},
           {R"({"transition": true})", "expected seconds"},
           {R"({"prompt_blend": "cubic"})", "\"linear\" or \"slerp\""},
           {R"({"latent_feedback": 1.5})", "out of range"},
           {R"({"latent_feedback": "lots"})", "expected a number"},
       })
    EXPECT_NE(error(J(text.c_str())).find(words), std::string::npos) << text << " -> " << error(J(text.c_str()));
}

namespace {
class RecordingTask : public ModelTask {
 public:
  RecordingTask(int id, std::vector<int>& log, std::mutex& m) : id_(id), log_(log), m_(m) {}
  void run_model_step() override {
    std::lock_guard<std::mutex> lock(m_);
    log_.push_back(id_);
  }

 private:
  int id_;
  std::vector<int>& log_;
  std::mutex& m_;
};
}  // namespace

TEST(ModelWorker, SchedulesEachTaskOnceAndServesInOrder) {
  std::vector<int> log;
  std::mutex m;
  auto a = std::make_shared<RecordingTask>(1, log, m);
  auto b = std::make_shared<RecordingTask>(2, log, m);
  ModelWorker w;
  // Queued before the worker starts: a twice (deduplicated), then b.
  EXPECT_TRUE(w.schedule(a));
  EXPECT_TRUE(w.schedule(a));
  EXPECT_TRUE(w.schedule(b));
  w.start();
  for (int i = 0; i < 200 && w.steps() < 2; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  w.stop();
  EXPECT_EQ(log, (std::vector<int>{1, 2}));
  EXPECT_FALSE(w.schedule(a));  // stopped
}

// A task taken out of the queue before its turn never runs (an API request whose client has gone); one that is not
// waiting (never scheduled, or taken out already) is not found.
TEST(ModelWorker, UnscheduleTakesAWaitingTaskOutOfTheQueue) {
  std::vector<int> log;
  std::mutex m;
  auto a = std::make_shared<RecordingTask>(1, log, m);
  auto b = std::make_shared<RecordingTask>(2, log, m);
  auto c = std::make_shared<RecordingTask>(3, log, m);
  ModelWorker w;
  EXPECT_TRUE(w.schedule(a));
  EXPECT_TRUE(w.schedule(b));
  EXPECT_TRUE(w.schedule(c));
  EXPECT_TRUE(w.unschedule(b));
  EXPECT_FALSE(w.unschedule(b));
  EXPECT_EQ(w.stats()["queued"], 2);
  w.start();
  for (int i = 0; i < 200 && w.steps() < 2; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_FALSE(w.unschedule(a)) << "a has run";
  w.stop();
  EXPECT_EQ(log, (std::vector<int>{1, 3}));
  EXPECT_EQ(w.steps(), 2);
}

namespace {
// Stub models whose UNet fails: the server's own failure, not the request's.
class FailingModels : public sd::test::StubModels {
 public:
  torch::Tensor unet(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const sd::AddedConditioning&,
                     const sd::ControlResiduals&) const override {
    throw sd::Error("stub unet: out of memory");
  }
};

ApiResponse call_api(ApiHandlers& api, const std::string& target, const std::string& body) {
  std::promise<ApiResponse> p;
  auto f = p.get_future();
  api.handle({"POST", target, "application/json", body}, [&p](ApiResponse r) { p.set_value(std::move(r)); });
  EXPECT_EQ(f.wait_for(std::chrono::seconds(30)), std::future_status::ready);
  return f.get();
}
}  // namespace

// Review finding: every generation failure was a 400 ("your request is bad"), so clients and proxies did not retry a
// server fault and monitoring counted it as a client error.
TEST(ApiHandlersStatus, AServerFailureIs500AndABadRequest400) {
  ModelWorker w;
  w.start();
  StreamDefaults d = sd::test::tiny_stream_defaults(16);
  d.max_width = d.max_height = 64;
  ApiHandlers api(std::make_shared<FailingModels>(), d, w, 2, [] { return nlohmann::json::object(); });
  const ApiResponse failed = call_api(api, "/api/txt2img", R"({"prompt": "a cat"})");
  EXPECT_EQ(failed.status, 500u) << failed.body;
  EXPECT_EQ(nlohmann::json::parse(failed.body)["error"], "generation failed: stub unet: out of memory");
  const ApiResponse bad = call_api(api, "/api/txt2img", R"({"prompt": "a cat", "guidance": "high"})");
  EXPECT_EQ(bad.status, 400u) << bad.body;
  // A working model answers 200 with a PNG (the same handlers, so 500 is the UNet's failure, not the set-up's).
  ApiHandlers ok_api(std::make_shared<sd::test::StubModels>(), d, w, 2, [] { return nlohmann::json::object(); });
  const ApiResponse ok = call_api(ok_api, "/api/txt2img", R"({"prompt": "a cat"})");
  EXPECT_EQ(ok.status, 200u) << ok.body;
  EXPECT_EQ(ok.content_type, "image/png");
  w.stop();
}
