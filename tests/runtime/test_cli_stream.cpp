// The built `streamdiffusion stream` command on the tiny fixture model: file -> folder, txt2img ticks, raw pipes,
// live control on stdin, SIGINT, and the errors a user sees for a bad output or a truncated input.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <sys/wait.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>

#include "common/fixtures.h"
#include "core/device.h"
#include "io/json_config.h"
#include "runtime/runtime_test_util.h"

namespace sd {
namespace {

namespace fs = std::filesystem;

#ifdef SD_CLI_PATH

struct RunResult {
  int status = -1;
  std::string output;  // stdout + stderr unless the command redirects
};

RunResult sh(const std::string& cmd) {
  RunResult r;
  FILE* p = popen(("(" + cmd + ") 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) r.output.append(buf, n);
  const int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

std::string q(const std::string& s) { return "'" + s + "'"; }

class CliStream : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::fixture_exists("models/tiny-sd15")) GTEST_SKIP() << "fixture model tiny-sd15 not present";
    tmp_ = test::make_temp_dir("cli_stream");
    base_ = std::string(SD_CLI_PATH) + " stream --model " + q(test::fixture_path("models/tiny-sd15")) +
            " --size 64x64 --threads 1 --prompt 'a cat' --status-interval 0 ";
  }
  void TearDown() override {
    if (!tmp_.empty()) fs::remove_all(tmp_);
  }
  size_t count_files(const std::string& dir) {
    size_t n = 0;
    for (const auto& e : fs::directory_iterator(dir)) n += e.is_regular_file();
    return n;
  }
  std::string tmp_, base_;
};

TEST_F(CliStream, VideoToImageFolderWithStats) {
  const std::string video = test::write_index_video(tmp_ + "/in.avi", 20);
  const auto r = sh(base_ + "--input " + q(video) + " --output " + q(tmp_ + "/out") + " --control none --stats-json " +
                    q(tmp_ + "/s.json"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(count_files(tmp_ + "/out"), 20u);
  const auto j = read_json_file(tmp_ + "/s.json");
  EXPECT_EQ(j["frames_in"], 20);
  EXPECT_EQ(j["frames_out"], 20);
  EXPECT_EQ(j["mode"], "lossless");
  EXPECT_EQ(j["pipeline"]["processed"], 21) << "20 frames + 1 flush call (n = 2)";
  EXPECT_GT(j["latency_ms"]["p50"].get<double>(), 0.0);
  EXPECT_NE(r.output.find("20 in, 20 out, 0 dropped"), std::string::npos) << r.output;
}

// --dtype auto, the default, runs in what this CPU computes natively and reports that (stats JSON, load log), never
// "auto"; an explicit bf16 stays bf16, with the warning where the CPU only emulates it.
TEST_F(CliStream, DtypeAutoIsTheDefaultAndReportsTheConcreteDtype) {
  const std::string expected = dtype_name(auto_dtype(c10::Device(c10::kCPU)));
  const std::string run = "--input none --frames 2 --output none --control none --stats-json " + q(tmp_ + "/s.json");
  for (const std::string flag : {"--dtype auto ", ""}) {
    SCOPED_TRACE(flag.empty() ? "default" : flag);
    const auto r = sh(base_ + flag + run);
    ASSERT_EQ(r.status, 0) << r.output;
    EXPECT_EQ(read_json_file(tmp_ + "/s.json")["config"]["dtype"], expected);
    EXPECT_NE(r.output.find(", " + expected + ", cpu)"), std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("is emulated"), std::string::npos) << r.output;
  }
  const auto bf16 = sh(base_ + "--dtype bf16 " + run);
  ASSERT_EQ(bf16.status, 0) << bf16.output;
  EXPECT_EQ(read_json_file(tmp_ + "/s.json")["config"]["dtype"], "bf16");
  EXPECT_EQ(bf16.output.find("is emulated and slower than fp32") != std::string::npos, !cpu_has_native_bf16())
      << bf16.output;
  const auto bad = sh(base_ + "--dtype fp64 " + run);
  EXPECT_EQ(bad.status, 1) << bad.output;
  EXPECT_NE(bad.output.find("unknown dtype 'fp64' (expected auto, fp32, bf16 or fp16)"), std::string::npos)
      << bad.output;
}

TEST_F(CliStream, Txt2ImgTicksWithScheduledPromptChange) {
  const auto r = sh(base_ + "--input none --frames 8 --output " + q(tmp_ + "/gen/%03d.png") +
                    " --t-index-list 0,16,32,45 --control none --at '4:prompt a dog' --stats-json " + q(tmp_ + "/s.json"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(count_files(tmp_ + "/gen"), 8u);
  EXPECT_TRUE(fs::exists(tmp_ + "/gen/007.png"));
  const auto j = read_json_file(tmp_ + "/s.json");
  ASSERT_EQ(j["controls"].size(), 1u);
  EXPECT_EQ(j["controls"][0]["frame"], 4);
  EXPECT_EQ(j["config"]["txt2img"], true);
}

// Review finding: with --prompt-list of one prompt, a live 'negative' command went back to --prompt (here none: the
// empty prompt), which the stream had never used. Both ways of giving one prompt must give the same frames.
TEST_F(CliStream, ANegativeCommandKeepsThePromptListsPrompt) {
  const std::string common = std::string(SD_CLI_PATH) + " stream --model " + q(test::fixture_path("models/tiny-sd15")) +
                             " --size 64x64 --threads 1 --status-interval 0 --input none --frames 4 --control none "
                             "--t-index-list 0,16,32,45 --at '1:negative blurry' ";
  const auto a = sh(common + "--prompt rocket --output " + q(tmp_ + "/a"));
  ASSERT_EQ(a.status, 0) << a.output;
  const auto b = sh(common + "--prompt-list 'rocket:1' --output " + q(tmp_ + "/b"));
  ASSERT_EQ(b.status, 0) << b.output;
  for (const char* f : {"/frame_000001.png", "/frame_000003.png"}) {
    const cv::Mat fa = cv::imread(tmp_ + "/a" + f), fb = cv::imread(tmp_ + "/b" + f);
    ASSERT_FALSE(fa.empty() || fb.empty()) << f;
    EXPECT_EQ(cv::norm(fa, fb, cv::NORM_INF), 0) << f;
  }
}

// The strip of docs/emoji-live-stream.png (scripts/stream-strip.sh): stream frames side by side, each tile the frame
// scaled by an integer factor with nearest neighbour, captions below; and the errors for a bad label count or file.
TEST_F(CliStream, MontageOfStreamFrames) {
  const auto r = sh(base_ + "--input none --frames 3 --output " + q(tmp_ + "/gen/%03d.png") +
                    " --t-index-list 0,45 --control none --at '2:prompt a dog'");
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string cli = SD_CLI_PATH;
  const std::string files = q(tmp_ + "/gen/000.png") + " " + q(tmp_ + "/gen/001.png") + " " + q(tmp_ + "/gen/002.png");
  const auto m = sh(cli + " montage " + files + " --tile 128 --labels '0: a cat;1: a cat;2: a dog' --out " +
                    q(tmp_ + "/strip.png"));
  ASSERT_EQ(m.status, 0) << m.output;
  const cv::Mat strip = cv::imread(tmp_ + "/strip.png", cv::IMREAD_COLOR);
  ASSERT_FALSE(strip.empty());
  EXPECT_EQ(strip.cols, 3 * (128 + 4));
  EXPECT_EQ(strip.rows, 128 + 22 + 4);
  for (int k = 0; k < 3; ++k) {
    const cv::Mat frame = cv::imread(tmp_ + "/gen/00" + std::to_string(k) + ".png", cv::IMREAD_COLOR);
    ASSERT_EQ(frame.cols, 64);
    for (int y = 0; y < 64; y += 7)
      for (int x = 0; x < 64; x += 5)
        ASSERT_EQ(strip.at<cv::Vec3b>(2 * y + 1, k * 132 + 2 * x + 1), frame.at<cv::Vec3b>(y, x))
            << "tile " << k << " pixel " << x << "," << y;
  }
  // Caption text is drawn below each tile: dark pixels there, none in the gap between tiles.
  const cv::Mat caption = strip(cv::Rect(0, 128, 128, 22)).clone();  // contiguous: datastart..dataend is the box
  EXPECT_LT(*std::min_element(caption.datastart, caption.dataend), 128);
  const cv::Mat gap = strip(cv::Rect(128, 0, 4, 128)).clone();
  EXPECT_EQ(*std::min_element(gap.datastart, gap.dataend), 255);

  const auto bad_labels = sh(cli + " montage " + files + " --labels 'a;b' --out " + q(tmp_ + "/x.png"));
  EXPECT_NE(bad_labels.status, 0);
  EXPECT_NE(bad_labels.output.find("--labels has 2 captions for 3 images"), std::string::npos) << bad_labels.output;
  const auto missing = sh(cli + " montage " + q(tmp_ + "/gen/999.png") + " --out " + q(tmp_ + "/x.png"));
  EXPECT_NE(missing.status, 0);
  EXPECT_NE(missing.output.find("999.png"), std::string::npos) << missing.output;
  EXPECT_NE(missing.output.find("cannot read this image"), std::string::npos) << missing.output;
  for (const auto& [flags, message] : std::vector<std::pair<std::string, std::string>>{
           {"--tile 7", "--tile must be in [8, 4096], got 7"},
           {"--tile 4097", "--tile must be in [8, 4096], got 4097"},
           {"--columns -1", "--columns must be >= 0"}}) {
    const auto r = sh(cli + " montage " + files + " " + flags + " --out " + q(tmp_ + "/x.png"));
    EXPECT_NE(r.status, 0) << flags;
    EXPECT_NE(r.output.find(message), std::string::npos) << flags << ": " << r.output;
  }
  EXPECT_FALSE(fs::exists(tmp_ + "/x.png"));
}

TEST_F(CliStream, RawFramesThroughStdinAndStdout) {
  // 6 raw rgb24 64x64 frames in, 6 out.
  const std::string raw = tmp_ + "/in.rgb";
  {
    std::ofstream f(raw, std::ios::binary);
    for (int i = 0; i < 6 * 64 * 64 * 3; ++i) f.put(static_cast<char>((i * 7) & 0xff));
  }
  const auto r = sh("cat " + q(raw) + " | " + base_ + "--input - --input-size 64x64 --output - > " + q(tmp_ + "/out.rgb"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(fs::file_size(tmp_ + "/out.rgb"), 6u * 64 * 64 * 3) << "stdout carries frames only, logs go to stderr";
  EXPECT_NE(r.output.find("rawvideo -pix_fmt rgb24 -s 64x64"), std::string::npos) << r.output;
}

// Review finding: --input-size took the model's multiple-of-8 rule, refusing common camera and raw sizes (854x480,
// 100x100) that the stream fits to its own size anyway.
TEST_F(CliStream, InputSizeNeedNotBeAModelSize) {
  const std::string raw = tmp_ + "/in100.rgb";
  {
    std::ofstream f(raw, std::ios::binary);
    for (int i = 0; i < 2 * 100 * 100 * 3; ++i) f.put(static_cast<char>((i * 5) & 0xff));
  }
  auto r = sh("cat " + q(raw) + " | " + base_ + "--input - --input-size 100x100 --output " + q(tmp_ + "/o100"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(count_files(tmp_ + "/o100"), 2u);
  r = sh(base_ + "--input - --input-size 0x100 --output none < /dev/null");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--input-size '0x100': expected 1 to 16384 px per side"), std::string::npos) << r.output;
}

TEST_F(CliStream, LiveControlOnStdin) {
  const std::string video = test::write_index_video(tmp_ + "/in.avi", 30);
  const auto r = sh("printf 'guidance abc\\nprompt a dog\\nbogus 1\\nt_index_list 20,30,40\\n' | " + base_ + "--input " +
                    q(video) + " --output none --stats-json " + q(tmp_ + "/s.json"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("control: error: 'guidance' expects a number, got 'abc'"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("control: error: unknown command 'bogus'"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("control: ok: 'prompt a dog' applied before frame"), std::string::npos) << r.output;
  const auto j = read_json_file(tmp_ + "/s.json");
  EXPECT_EQ(j["controls"].size(), 2u);
  EXPECT_EQ(j["frames_out"], 30) << "a t_index_list length change mid-stream loses no frame";
  EXPECT_EQ(j["config"]["t_index_list"], nlohmann::json::array({20, 30, 40}));
}

// `lora NAME SCALE` scheduled before frame 3 of a one-step stream without guidance (no latent buffer, fixed noise):
// from frame 3 on, every output file equals the one of a fresh stream loaded with the LoRA at the new scale; the
// frames before differ (scale 1 vs 0.7). The LoRA patches the text encoder too, so the prompt is re-encoded.
TEST_F(CliStream, LiveLoraScaleChangeEqualsFreshStream) {
  const std::string lora = test::fixture_path("lora/files/sd15_kohya_unet_te.safetensors");
  if (!fs::exists(lora)) GTEST_SKIP() << "LoRA fixture absent";
  const std::string video = test::write_index_video(tmp_ + "/in.avi", 6);
  const std::string common = base_ + "--input " + q(video) + " --control none --t-index-list 45 --cfg-type none ";
  const auto a = sh(common + "--lora " + q(lora) + " --at '3:lora sd15_kohya_unet_te 0.7' --output " + q(tmp_ + "/a"));
  ASSERT_EQ(a.status, 0) << a.output;
  EXPECT_NE(a.output.find("LoRA sd15_kohya_unet_te re-fused at scale 0.7"), std::string::npos) << a.output;
  const auto b = sh(common + "--lora " + q(lora + ":0.7") + " --output " + q(tmp_ + "/b"));
  ASSERT_EQ(b.status, 0) << b.output;
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(tmp_ + "/a")) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  ASSERT_EQ(names.size(), 6u);
  auto bytes = [](const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(f)), {});
  };
  for (size_t i = 0; i < names.size(); ++i) {
    const bool same = bytes(tmp_ + "/a/" + names[i]) == bytes(tmp_ + "/b/" + names[i]);
    if (i < 3)
      EXPECT_FALSE(same) << names[i] << ": before the change (scale 1 vs 0.7)";
    else
      EXPECT_TRUE(same) << names[i] << ": after the change it must equal the fresh stream at 0.7";
  }
  // An unknown name is refused without stopping the stream.
  const auto c = sh(common + "--lora " + q(lora) + " --at '2:lora nope 0.5' --output none");
  EXPECT_EQ(c.status, 0) << c.output;
  EXPECT_NE(c.output.find("no LoRA named 'nope' (loaded: sd15_kohya_unet_te)"), std::string::npos) << c.output;
}

// IP-Adapter on the CLI: --ip-adapter DIR --image-prompt FILE --ip-adapter-scale 0.6, then `ip_adapter_scale 0`
// scheduled before frame 3 of a one-step stream without guidance (no latent buffer): from frame 3 on every output
// equals the stream without IP-Adapter (scale 0 is the plain UNet), before it they differ. `image_prompt` with a
// missing file is refused without stopping the stream; --image-prompt without --ip-adapter is an error.
TEST_F(CliStream, IpAdapterScaleAndImagePromptLive) {
  const std::string adapter = test::fixture_path("ipadapter/models/tiny-ip-adapter-sd15");
  if (!fs::exists(adapter + "/image_encoder")) GTEST_SKIP() << "IP-Adapter fixture absent";
  const std::string video = test::write_index_video(tmp_ + "/in.avi", 6);
  {
    // A 56x40 RGB image prompt (resized and centre-cropped to the encoder's 32x32).
    std::ofstream f(tmp_ + "/style_in.ppm", std::ios::binary);
    f << "P6\n56 40\n255\n";
    for (int y = 0; y < 40; ++y)
      for (int x = 0; x < 56; ++x) f << char(x * 4) << char(y * 6) << char((x * y) % 256);
  }
  const std::string common = base_ + "--input " + q(video) + " --control none --t-index-list 45 --cfg-type none ";
  const auto a = sh(common + "--ip-adapter " + q(adapter) + " --image-prompt " + q(tmp_ + "/style_in.ppm") +
                    " --ip-adapter-scale 0.6 --at '3:ip_adapter_scale 0' --at '1:image_prompt " + tmp_ +
                    "/missing.png' --output " + q(tmp_ + "/a"));
  ASSERT_EQ(a.status, 0) << a.output;
  EXPECT_NE(a.output.find("missing.png: cannot read as an image"), std::string::npos) << a.output;
  const auto b = sh(common + "--output " + q(tmp_ + "/b"));
  ASSERT_EQ(b.status, 0) << b.output;
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(tmp_ + "/a")) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  ASSERT_EQ(names.size(), 6u);
  auto bytes = [](const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(f)), {});
  };
  for (size_t i = 0; i < names.size(); ++i) {
    const bool same = bytes(tmp_ + "/a/" + names[i]) == bytes(tmp_ + "/b/" + names[i]);
    if (i < 3)
      EXPECT_FALSE(same) << names[i] << ": before the change (scale 0.6 with an image prompt)";
    else
      EXPECT_TRUE(same) << names[i] << ": at scale 0 the stream must equal the one without IP-Adapter";
  }
  const auto c = sh(base_ + "--input none --frames 1 --output none --image-prompt " + q(tmp_ + "/style_in.ppm"));
  EXPECT_NE(c.status, 0) << c.output;
  EXPECT_NE(c.output.find("--image-prompt needs an IP-Adapter"), std::string::npos) << c.output;
}

// --image-prompt-input: a folder of image prompts (A, A again, B) read every 2 input frames of a 7-frame video; the
// repeated A is not encoded again, B is, the folder ends before the video and the stream goes on with B. The stats
// say so. Without --ip-adapter, or with --image-prompt-every 0, the command refuses.
TEST_F(CliStream, ImagePromptFromASecondSource) {
  const std::string adapter = test::fixture_path("ipadapter/models/tiny-ip-adapter-sd15");
  if (!fs::exists(adapter + "/image_encoder")) GTEST_SKIP() << "IP-Adapter fixture absent";
  const std::string video = test::write_index_video(tmp_ + "/in.avi", 7);
  fs::create_directories(tmp_ + "/prompts");
  cv::Mat a(40, 56, CV_8UC3), b;
  cv::randu(a, 0, 256);
  cv::bitwise_not(a, b);
  ASSERT_TRUE(cv::imwrite(tmp_ + "/prompts/0.png", a) && cv::imwrite(tmp_ + "/prompts/1.png", a) &&
              cv::imwrite(tmp_ + "/prompts/2.png", b));
  const std::string common = base_ + "--input " + q(video) + " --control none --output none --ip-adapter " + q(adapter);
  const auto r = sh(common + " --image-prompt-input " + q(tmp_ + "/prompts") + " --image-prompt-every 2 --stats-json " +
                    q(tmp_ + "/s.json"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("ended after 3 images: the last one stays"), std::string::npos) << r.output;
  const nlohmann::json s = read_json_file(tmp_ + "/s.json");
  EXPECT_EQ(s["frames_out"], 7) << s.dump();
  EXPECT_EQ(s["stop_reason"], "end of input");
  EXPECT_EQ(s["image_prompt_source"]["read"], 3) << s.dump();
  EXPECT_EQ(s["image_prompt_source"]["ended"], true);
  EXPECT_EQ(s["pipeline"]["image_prompt_encodes"], 2) << s.dump();
  EXPECT_EQ(s["pipeline"]["image_prompts_unchanged"], 1);
  EXPECT_GT(s["pipeline"]["image_prompt_ms_per_encode"].get<double>(), 0.0);

  const auto no_adapter = sh(base_ + "--input " + q(video) + " --output none --control none --image-prompt-input " +
                             q(tmp_ + "/prompts"));
  EXPECT_NE(no_adapter.status, 0);
  EXPECT_NE(no_adapter.output.find("--image-prompt-input needs an IP-Adapter"), std::string::npos) << no_adapter.output;
  const auto zero = sh(common + " --image-prompt-input " + q(tmp_ + "/prompts") + " --image-prompt-every 0");
  EXPECT_NE(zero.status, 0);
  EXPECT_NE(zero.output.find("--image-prompt-every: expected >= 1, got 0"), std::string::npos) << zero.output;
}

// --deep-cache-every 2 on an 8-frame video, switched off live before frame 4 ('deep_cache 1'): calls 1 and 3 reuse
// the deep features, none after; the stats JSON counts them (similarity -1: the index frames' cuts force nothing).
// --deep-cache-every 0 is refused.
TEST_F(CliStream, DeepCacheEveryAndLiveSwitch) {
  const std::string video = test::write_index_video(tmp_ + "/in.avi", 8);
  const auto r = sh(base_ + "--input " + q(video) + " --output none --control none --t-index-list 45 --cfg-type none "
                    "--deep-cache-every 2 --deep-cache-similarity -1 --at '4:deep_cache 1' --stats-json " + q(tmp_ + "/s.json"));
  ASSERT_EQ(r.status, 0) << r.output;
  const nlohmann::json s = read_json_file(tmp_ + "/s.json");
  EXPECT_EQ(s["frames_out"], 8) << s.dump();
  EXPECT_EQ(s["pipeline"]["unet_shallow_calls"], 2) << s.dump();
  EXPECT_EQ(s["pipeline"]["deep_cache_forced"], 0);
  EXPECT_EQ(s["controls"].size(), 1u);
  const auto bad = sh(base_ + "--input " + q(video) + " --output none --control none --deep-cache-every 0");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.output.find("--deep-cache-every must be >= 1"), std::string::npos) << bad.output;
}

TEST_F(CliStream, SigintStopsTheCommandCleanly) {
  // Endless txt2img; SIGINT once the stream runs. Exit status 130, the stop reason printed, stats written.
  const std::string log = tmp_ + "/log.txt";
  const std::string script =
      base_ + "--input none --output none --control none --stats-json " + q(tmp_ + "/s.json") + " > " + q(log) +
      " 2>&1 & pid=$!; for i in $(seq 1 300); do grep -q 'stream: ' " + q(log) +
      " && break; sleep 0.1; done; sleep 0.3; t0=$(date +%s%N); kill -INT $pid; wait $pid; rc=$?; t1=$(date +%s%N); "
      "echo rc=$rc ms=$(( (t1 - t0) / 1000000 ))";
  const auto r = sh(script);
  std::string text;
  {
    std::ifstream f(log);
    text.assign(std::istreambuf_iterator<char>(f), {});
  }
  std::cout << "  " << r.output;
  EXPECT_NE(r.output.find("rc=130"), std::string::npos) << r.output << text;
  const auto ms_pos = r.output.find("ms=");
  ASSERT_NE(ms_pos, std::string::npos);
  EXPECT_LT(std::stoi(r.output.substr(ms_pos + 3)), 1000 * test::time_scale()) << "stops within a second";
  EXPECT_NE(text.find("interrupted by SIGINT"), std::string::npos) << text;
  EXPECT_TRUE(fs::exists(tmp_ + "/s.json"));
}

TEST_F(CliStream, ClearErrorsForBadOutputAndTruncatedInput) {
  const std::string video = test::write_index_video(tmp_ + "/in.avi", 20);
  auto r = sh(base_ + "--input " + q(video) + " --output /nonexistent_dir/out.mp4 --control none");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("error: /nonexistent_dir/out.mp4: cannot write the video: folder '/nonexistent_dir' does "
                          "not exist"),
            std::string::npos)
      << r.output;
  EXPECT_EQ(r.output.find("loaded"), std::string::npos) << "refused before loading the model";
  // An unwritable --stats-json is refused before the model loads (it was found after the whole stream, losing the
  // summary).
  r = sh(base_ + "--input " + q(video) + " --output none --control none --stats-json /nonexistent_dir/s.json");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("--stats-json /nonexistent_dir/s.json: the folder '/nonexistent_dir' does not exist"),
            std::string::npos)
      << r.output;
  EXPECT_EQ(r.output.find("loaded"), std::string::npos) << "refused before loading the model";

  std::string bytes;
  {
    std::ifstream in(video, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  {
    std::ofstream out(tmp_ + "/cut.avi", std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size() * 3 / 4));
  }
  r = sh(base_ + "--input " + q(tmp_ + "/cut.avi") + " --output " + q(tmp_ + "/out") + " --control none");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("error: capture: " + tmp_ + "/cut.avi: decoding stopped after"), std::string::npos)
      << r.output;
  EXPECT_GT(count_files(tmp_ + "/out"), 0u) << "the frames before the damage were written";

  r = sh(base_ + "--input none --output window --control none");
  if (!std::getenv("DISPLAY")) {
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.output.find("needs a display"), std::string::npos) << r.output;
  }
}

// `--at N:quit` stops the stream before input frame N: a stop (exit status 0), not a refused command, with every frame
// read accounted for. A --status-interval or --input-fps that is not a number or would overflow the clock is refused
// before the model loads, naming the option.
TEST_F(CliStream, ScheduledQuitAndRatesOutOfRange) {
  const auto r = sh(base_ + "--input none --frames 50 --output none --control none --at 3:quit --stats-json " +
                    q(tmp_ + "/s.json"));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = read_json_file(tmp_ + "/s.json");
  EXPECT_EQ(j["stop_reason"], "quit command (--at)");
  EXPECT_LT(j["frames_in"].get<int64_t>(), 50);
  EXPECT_EQ(j["control_counts"]["refused"], 0);
  EXPECT_EQ(j["frames_in"].get<int64_t>(), j["frames_out"].get<int64_t>() + j["dropped"].get<int64_t>() +
                                                 j["discarded_at_stop"].get<int64_t>() +
                                                 j["in_flight_at_stop"].get<int64_t>())
      << j.dump();

  std::string base = base_;
  base.replace(base.find("--status-interval 0 "), 20, "");
  for (const std::string bad : {"--status-interval 1e12", "--status-interval nan", "--status-interval inf",
                                "--input-fps 1e-12", "--input-fps nan"}) {
    const auto e = sh(base + "--input none --frames 2 --output none --control none " + bad);
    EXPECT_NE(e.status, 0) << bad;
    EXPECT_NE(e.output.find(bad.substr(0, bad.find(' '))), std::string::npos) << e.output;
    EXPECT_EQ(e.output.find("loaded"), std::string::npos) << bad << ": refused before loading the model";
  }
}

// Values that silently meant the default (a negative fps or threshold) or wrapped around (-1 for an unsigned seed),
// octal integers and a watchdog factor the runtime refuses only after loading are all refused while parsing, exit
// status 2 (a usage error, not CLI11's 105).
TEST_F(CliStream, BadNumbersAreUsageErrorsBeforeTheModelLoads) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--output-fps -5", "--output-fps: expected >= 0, got -5"},
      {"--input-fps -1", "--input-fps: expected >= 0, got -1"},
      {"--similarity-filter -0.5", "--similarity-filter: Value -0.5 not in range"},
      {"--similarity-filter 2", "--similarity-filter: Value 2 not in range"},
      {"--max-skip-frame -1", "--max-skip-frame: expected >= 0, got -1"},
      {"--steps 0", "--steps: expected >= 1, got 0"},
      {"--steps -2", "--steps: expected >= 1, got -2"},
      {"--watchdog 0.5", "--watchdog: expected 0 (off) or a factor >= 1, got 0.5"},
      {"--image-prompt-change -1", "--image-prompt-change: expected >= 0, got -1"},
      {"--image-prompt-every 0", "--image-prompt-every: expected >= 1, got 0"},
      {"--seed -1", "--seed: expected a decimal integer >= 0, got '-1'"},
      {"--seed 0042", "--seed: expected a decimal integer >= 0, got '0042'"},
      {"--guidance nan", "--guidance: expected a finite number, got 'nan'"},
      {"--queue 08", "--queue: expected a decimal integer, got '08'"},
      {"--log-level loud", "--log-level: loud not in {trace,debug,info,warn,warning,error,critical,off}"},
  };
  for (const auto& [bad, expected] : cases) {
    const auto r = sh(base_ + "--input none --frames 2 --output none --control none " + bad);
    EXPECT_EQ(r.status, 2) << bad << ": " << r.output;
    EXPECT_NE(r.output.find(expected), std::string::npos) << bad << ": " << r.output;
    EXPECT_EQ(r.output.find("loaded"), std::string::npos) << bad << ": refused before loading the model";
  }
  EXPECT_EQ(sh(base_ + "--input none --output none --no-such-option").status, 2);
  EXPECT_EQ(sh(std::string(SD_CLI_PATH) + " stream --help").status, 0);
}

// log_level is a key of settings files (it was an option of the top level only, which settings files cannot set).
TEST_F(CliStream, LogLevelFromASettingsFile) {
  const std::string quiet = tmp_ + "/quiet.yaml";
  std::ofstream(quiet) << "log_level: warn\nframes: 2\n";
  auto r = sh(base_ + "--input none --output none --control none --config " + q(quiet));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output.find("loaded"), std::string::npos) << "info lines are below warn: " << r.output;
  r = sh(base_ + "--input none --output none --control none --frames 2");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("loaded"), std::string::npos) << r.output;
  // After the command name too, and the top level's option still works.
  r = sh(base_ + "--input none --output none --control none --frames 2 --log-level error");
  EXPECT_EQ(r.output.find("loaded"), std::string::npos) << r.output;
  r = sh(std::string(SD_CLI_PATH) + " --log-level error " + base_.substr(std::string(SD_CLI_PATH).size() + 1) +
         "--input none --output none --control none --frames 2");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output.find("loaded"), std::string::npos) << r.output;
}

// ControlNet from the command line (issue 15): canny on the input, a second source that ends first, errors for flags
// that cannot work, and the one-shot commands with a control image file.
TEST_F(CliStream, ControlNetFlagsSecondSourceAndErrors) {
  if (!test::fixture_exists("controlnet/models/tiny-controlnet-sd15")) GTEST_SKIP() << "no tiny ControlNet fixture";
  const std::string cn = q(test::fixture_path("controlnet/models/tiny-controlnet-sd15"));
  const std::string video = test::write_index_video(tmp_ + "/in.avi", 8);
  const std::string control = test::write_index_video(tmp_ + "/control.avi", 5);
  auto r = sh(base_ + "--input " + q(video) + " --output " + q(tmp_ + "/out") + " --control none --controlnet " + cn +
              ":0.8 --control-input " + q(control) + " --control-preprocessor canny:50:150 --controlnet-every 2 " +
              "--stats-json " + q(tmp_ + "/s.json"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(count_files(tmp_ + "/out"), 5u) << "the input ends with the control input";
  EXPECT_NE(r.output.find("ended after 5 frames"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("scale 0.8 preprocessor canny:50:150"), std::string::npos) << r.output;
  auto j = read_json_file(tmp_ + "/s.json");
  EXPECT_EQ(j["stop_reason"], "control input ended");
  EXPECT_EQ(j["pipeline"]["controlnets"], 1);
  // every 2: 6 calls (5 frames + 1 flush), the residuals computed on every other call.
  EXPECT_EQ(j["pipeline"]["controlnet_calls"].get<int64_t>() + j["pipeline"]["controlnet_reused"].get<int64_t>(),
            j["pipeline"]["processed"].get<int64_t>());
  EXPECT_GT(j["pipeline"]["controlnet_reused"].get<int64_t>(), 0);

  // txt2img with feedback, live scale change on the control channel schedule.
  r = sh(base_ + "--input none --frames 4 --output " + q(tmp_ + "/gen") + " --control none --t-index-list 0,16 " +
         "--cfg-type none --controlnet " + cn + " --control-preprocessor feedback --at '2:controlnet_scale 0 0.5'");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(count_files(tmp_ + "/gen"), 4u);
  EXPECT_NE(r.output.find("'controlnet_scale 0 0.5' applied before frame 2"), std::string::npos) << r.output;

  // What cannot work is refused before the model loads, saying what to give instead.
  r = sh(base_ + "--input none --frames 2 --output none --control none --controlnet " + cn);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("txt2img has no input frames to preprocess; give --control-input"), std::string::npos)
      << r.output;
  r = sh(base_ + "--input " + q(video) + " --output none --control none --control-preprocessor canny");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("--control-preprocessor needs --controlnet"), std::string::npos) << r.output;
  r = sh(base_ + "--input " + q(video) + " --output none --control none --controlnet " + cn +
         " --control-preprocessor depth");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("unknown control preprocessor 'depth'"), std::string::npos) << r.output;
  r = sh(base_ + "--input " + q(video) + " --output none --control none --controlnet " + cn + " --controlnet " + cn +
         " --control-preprocessor canny --control-preprocessor gray --control-preprocessor gray");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("given 3 times for 2 --controlnet"), std::string::npos) << r.output;
  r = sh(base_ + "--input " + q(video) + " --output none --control none --control-input " + q(control));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("--control-input needs --controlnet"), std::string::npos) << r.output;
  r = sh(base_ + "--input " + q(video) + " --output none --control none --controlnet " + cn + " --controlnet-every 0");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("--controlnet-every must be >= 1"), std::string::npos) << r.output;
  r = sh(base_ + "--input " + q(video) + " --output none --control none --controlnet " + cn + " --control-input none");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("--control-input none gives no images"), std::string::npos) << r.output;
  r = sh(base_ + "--input " + q(video) + " --output none --control none --controlnet " + cn + " --control-input -");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("--control-input cannot read stdin"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("--input-size"), std::string::npos) << "no advice that cannot help: " << r.output;
  r = sh(base_ + "--input " + q(video) + " --output none --control none --controlnet " + q(tmp_ + "/nothing"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find(tmp_ + "/nothing"), std::string::npos) << r.output;

  // One-shot commands: a control image file for txt2img; canny of each input frame for img2img.
  const std::string png = tmp_ + "/control.png";
  ASSERT_TRUE(cv::imwrite(png, test::index_frame(5, 64, 64)));
  const std::string gen = std::string(SD_CLI_PATH) + " txt2img --model " +
                          q(test::fixture_path("models/tiny-sd15")) + " --size 64x64 --threads 1 --prompt 'a cat' " +
                          "--t-index-list 0 --cfg-type none ";
  r = sh(gen + "--controlnet " + cn + " --control-input " + q(png) + " -o " + q(tmp_ + "/t2i.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  r = sh(gen + "-o " + q(tmp_ + "/t2i-plain.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  const cv::Mat a = cv::imread(tmp_ + "/t2i.png"), b = cv::imread(tmp_ + "/t2i-plain.png");
  ASSERT_FALSE(a.empty());
  ASSERT_FALSE(b.empty());
  EXPECT_GT(cv::norm(a, b, cv::NORM_INF), 0) << "the ControlNet changed nothing";
  // --control-guidance-start 0.5 with one step (0/1 < 0.5): the step is not conditioned, the plain image exactly;
  // with two steps and --control-guidance-end 0.5 the first is.
  r = sh(gen + "--controlnet " + cn + " --control-input " + q(png) + " --control-guidance-start 0.5 -o " +
         q(tmp_ + "/t2i-late.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(cv::norm(cv::imread(tmp_ + "/t2i-late.png"), b, cv::NORM_INF), 0) << "no step in range: no ControlNet";
  const std::string two = std::string(SD_CLI_PATH) + " txt2img --model " + q(test::fixture_path("models/tiny-sd15")) +
                          " --size 64x64 --threads 1 --prompt 'a cat' --t-index-list 0,16 --cfg-type none ";
  r = sh(two + "--controlnet " + cn + " --control-input " + q(png) + " --control-guidance-end 0.5 -o " +
         q(tmp_ + "/t2i-early.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  r = sh(two + "-o " + q(tmp_ + "/t2i-two-plain.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  r = sh(two + "--controlnet " + cn + " --control-input " + q(png) + " -o " + q(tmp_ + "/t2i-two-full.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  const cv::Mat early = cv::imread(tmp_ + "/t2i-early.png");
  EXPECT_GT(cv::norm(early, cv::imread(tmp_ + "/t2i-two-plain.png"), cv::NORM_INF), 0)
      << "the first of two steps is conditioned";
  EXPECT_GT(cv::norm(early, cv::imread(tmp_ + "/t2i-two-full.png"), cv::NORM_INF), 0)
      << "the second of two steps is not";
  r = sh(gen + "--controlnet " + cn + " --control-input " + q(png) + " --control-guidance-start 0.6 " +
         "--control-guidance-end 0.4 -o " + q(tmp_ + "/x.png"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("--control-guidance-start 0.600000 and --control-guidance-end 0.400000 must satisfy 0 <= "
                          "start < end <= 1"),
            std::string::npos)
      << r.output;
  r = sh(gen + "--control-guidance-end 0.5 -o " + q(tmp_ + "/x.png"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("--control-guidance-end needs --controlnet"), std::string::npos) << r.output;
  r = sh(gen + "--controlnet " + cn + " --control-input " + q(png) + " --control-guidance-start 0 " +
         "--control-guidance-start 0.5 -o " + q(tmp_ + "/x.png"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("--control-guidance-start given 2 times for 1 --controlnet"), std::string::npos) << r.output;
  // serve refuses to start with a default range that tells two equal steps apart (every frame would fail).
  r = sh("timeout 120 " + std::string(SD_CLI_PATH) + " serve --model " + q(test::fixture_path("models/tiny-sd15")) +
         " --size 64x64 --threads 1 --port 0 --t-index-list 20,20 --controlnet " + cn + " --control-guidance-end 0.5");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("img2img t_index_list entries 0 and 1 are both 20 and the guidance range of --controlnet 0"),
            std::string::npos)
      << r.output;
  r = sh(gen + "--controlnet " + cn + " --control-preprocessor feedback -o " + q(tmp_ + "/x.png"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("feedback needs a stream"), std::string::npos) << r.output;
  r = sh(gen + "--controlnet " + cn + " -o " + q(tmp_ + "/x.png"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("give --control-input"), std::string::npos) << r.output;
  r = sh(std::string(SD_CLI_PATH) + " img2img --model " + q(test::fixture_path("models/tiny-sd15")) +
         " --size 64x64 --threads 1 --prompt 'a cat' --controlnet " + cn + " -i " + q(png) + " -o " +
         q(tmp_ + "/i2i.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(tmp_ + "/i2i.png"));
}

#endif  // SD_CLI_PATH

}  // namespace
}  // namespace sd
