// End-to-end: the built `streamdiffusion txt2img` / `img2img` on the tiny-sd21 fixture model reproduce the
// reference pipeline outputs of cases.json (PNG vs the post-processed fixture output, +-1 per pixel).
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "common/cli_run.h"
#include "common/fixtures.h"
#include "core/device.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "models/compiled_unet.h"
#include "pipeline/image.h"

#ifdef SD_TEST_HAVE_OPENCV
#include "pipeline/cli_images.h"
#endif

namespace sd {
namespace {

namespace fs = std::filesystem;

#if defined(SD_CLI_PATH) && defined(SD_TEST_HAVE_OPENCV)

using test::RunResult;
RunResult run(const std::string& args) { return test::run_command(std::string(SD_CLI_PATH) + " " + args); }

using test::q;
using test::max_pixel_diff;
using test::read_png_rgb;
using test::write_png_rgb;



// The first ok case of cases.json matching the predicate.
const nlohmann::json* find_case(const nlohmann::json& all, const std::string& model, const std::string& mode) {
  for (const auto& c : all.at("cases")) {
    const auto& p = c.at("params");
    if (c.at("result").at("ok").get<bool>() && p.at("model") == model && p.at("mode") == mode &&
        p.at("frame_buffer_size") == 1 && p.at("use_denoising_batch") == true && p.at("vae") == "taesd" &&
        p.at("similar_image_filter").is_null() && p.at("do_add_noise") == true &&
        (mode == "txt2img" || p.at("t_index_list").size() > 1))
      return &c;
  }
  return nullptr;
}

std::string stream_args(const nlohmann::json& p, const std::string& root = "models/") {
  std::string tl;
  for (const auto& t : p.at("t_index_list")) tl += (tl.empty() ? "" : ",") + std::to_string(t.get<int>());
  std::ostringstream o;
  o << " --model " << q(test::fixture_path(root + p.at("model").get<std::string>()))
    << " --prompt " << q(p.at("prompt").get<std::string>())
    << " --negative-prompt " << q(p.at("negative_prompt").get<std::string>()) << " --t-index-list " << tl
    << " --num-inference-steps " << p.at("num_inference_steps").get<int>() << " --cfg-type "
    << p.at("cfg_type").get<std::string>() << " --guidance " << p.at("guidance_scale").get<double>() << " --delta "
    << p.at("delta").get<double>() << " --seed " << p.at("seed").get<int>() << " --size 64x64 --threads 1"
    << " --dtype fp32";  // the references are float32 (the default, auto, may pick bf16)
  return o.str();
}


class CliGenerate : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::fixture_exists("pipeline/cases.json") || !test::fixture_exists("models/tiny-sd21"))
      GTEST_SKIP() << "pipeline fixtures or tiny-sd21 absent";
    all_ = read_json_file(test::fixture_path("pipeline/cases.json"));
    tmp_ = test::make_temp_dir("sd-cli");
  }
  void TearDown() override {
    std::error_code ec;
    if (!tmp_.empty()) fs::remove_all(tmp_, ec);
  }
  nlohmann::json all_;
  std::string tmp_;
};

TEST_F(CliGenerate, Txt2ImgReproducesTheReferenceCase) {
  const auto* c = find_case(all_, "tiny-sd21", "txt2img");
  ASSERT_NE(c, nullptr) << "no plain txt2img case for tiny-sd21 in cases.json";
  const auto& p = c->at("params");
  const auto f = SafeTensorsFile::open(test::fixture_path("pipeline/" + c->at("file").get<std::string>()));
  const std::string out = tmp_ + "/out.png";
  const auto r = run("txt2img" + stream_args(p) + " -o " + q(out));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("timing: load"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("fps"), std::string::npos) << r.output;
  // Default warm-up: n-1 extra calls, so the saved image is call n-1's output.
  const int n = static_cast<int>(p.at("t_index_list").size());
  const auto ref = tensor_to_image(f.get("call" + std::to_string(n - 1) + ".output"))[0];
  const auto got = read_png_rgb(out);
  ASSERT_TRUE(got.defined()) << "no PNG written: " << r.output;
  ASSERT_EQ(got.sizes(), ref.sizes());
  const int64_t diff = max_pixel_diff(got, ref);
  RecordProperty("max_pixel_diff", std::to_string(diff));
  EXPECT_LE(diff, 1) << c->at("file");
  // --warmup picks another call of the same stream.
  const std::string out5 = tmp_ + "/out5.png";
  const auto r5 = run("txt2img" + stream_args(p) + " --warmup 5 -o " + q(out5));
  ASSERT_EQ(r5.status, 0) << r5.output;
  EXPECT_LE(max_pixel_diff(read_png_rgb(out5), tensor_to_image(f.get("call5.output"))[0]), 1);
}

TEST_F(CliGenerate, Img2ImgFolderIsOneStreamAlignedWithItsInputs) {
  const auto* c = find_case(all_, "tiny-sd21", "img2img");
  ASSERT_NE(c, nullptr) << "no plain img2img case for tiny-sd21 in cases.json";
  const auto& p = c->at("params");
  const auto f = SafeTensorsFile::open(test::fixture_path("pipeline/" + c->at("file").get<std::string>()));
  const auto imgs = SafeTensorsFile::open(test::fixture_path("pipeline/input_images.safetensors"));
  const auto& calls = c->at("result").at("calls");
  const std::string in_dir = tmp_ + "/in", out_dir = tmp_ + "/out";
  fs::create_directories(in_dir);
  for (size_t i = 0; i < calls.size(); ++i) {
    const int id = calls[i].at("input_image_ids")[0].get<int>();
    char name[32];
    std::snprintf(name, sizeof(name), "frame_%03zu.png", i);
    write_png_rgb(in_dir + "/" + name, imgs.get("image" + std::to_string(id)));
  }
  const auto r = run("img2img" + stream_args(p) + " --input " + q(in_dir) + " --output " + q(out_dir));
  ASSERT_EQ(r.status, 0) << r.output;
  // Output k belongs to input k: the reference returns it at call k + n - 1.
  const int n = static_cast<int>(p.at("t_index_list").size());
  int compared = 0;
  for (size_t k = 0; k < calls.size(); ++k) {
    char name[32];
    std::snprintf(name, sizeof(name), "frame_%03zu.png", k);
    const auto got = read_png_rgb(out_dir + "/" + name);
    ASSERT_TRUE(got.defined()) << name << " not written: " << r.output;
    EXPECT_EQ(got.size(0), 64);
    const size_t ref_call = k + n - 1;
    if (ref_call >= calls.size()) continue;  // from the flush calls, beyond the recording
    const auto ref = tensor_to_image(f.get("call" + std::to_string(ref_call) + ".output"))[0];
    EXPECT_LE(max_pixel_diff(got, ref), 1) << name << " vs call" << ref_call;
    ++compared;
  }
  EXPECT_GT(compared, 0);
  RecordProperty("compared_frames", std::to_string(compared));
}

TEST_F(CliGenerate, Img2ImgSingleFileAndResize) {
  const auto imgs = SafeTensorsFile::open(test::fixture_path("pipeline/input_images.safetensors"));
  // A 96x80 input is centre-cropped to 1:1 and shrunk to 64x64.
  const auto big = torch::cat({imgs.get("image0"), imgs.get("image1")}, 0).slice(0, 0, 96).slice(1, 0, 64);
  const auto wide = torch::cat({big, big.slice(1, 0, 16)}, 1);  // 96 x 80
  write_png_rgb(tmp_ + "/in.png", wide.contiguous());
  const auto r = run("img2img --model " + q(test::fixture_path("models/tiny-sd21")) +
                     " --prompt 'a cat' --t-index-list 1,3 --num-inference-steps 4 --size 64x64 --threads 1 -i " +
                     q(tmp_ + "/in.png") + " -o " + q(tmp_ + "/res.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto got = read_png_rgb(tmp_ + "/res.png");
  ASSERT_TRUE(got.defined());
  EXPECT_EQ(got.sizes(), (std::vector<int64_t>{64, 64, 3}));
}

TEST_F(CliGenerate, ClearErrors) {
  const std::string model = q(test::fixture_path("models/tiny-sd21"));
  auto r = run("txt2img --model " + model + " --size 60x64 -o " + q(tmp_ + "/x.png"));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("multiples of 8"), std::string::npos) << r.output;
  r = run("txt2img --model " + model + " --num-inference-steps 4 --t-index-list 0,7 --size 64x64 -o " +
          q(tmp_ + "/x.png"));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("t_index_list[1] = 7"), std::string::npos) << r.output;
  r = run("img2img --model " + model + " --size 64x64 -i " + q(tmp_ + "/missing.png") + " -o " + q(tmp_ + "/y.png"));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("missing.png"), std::string::npos) << r.output;
  r = run("txt2img --model " + model + " --cfg-type sometimes --size 64x64 -o " + q(tmp_ + "/x.png"));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("cfg_type"), std::string::npos) << r.output;
  // --threads out of range is refused at once (100000 hung the command making threads; -3 silently meant all cores).
  for (const char* threads : {"100000", "-3"}) {
    r = run("txt2img --model " + model + " --size 64x64 --threads " + threads + " -o " + q(tmp_ + "/x.png"));
    EXPECT_NE(r.status, 0) << r.output;
    EXPECT_NE(r.output.find("--threads"), std::string::npos) << r.output;
  }
  // A negative --warmup meant the default (n - 1); usage errors exit 2.
  r = run("txt2img --model " + model + " --size 64x64 --warmup -1 -o " + q(tmp_ + "/x.png"));
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("--warmup: expected >= 0, got -1"), std::string::npos) << r.output;
  // `info --compiled-unet`: a missing package is named (AOTInductor builds); elsewhere the build says what it needs.
  r = run("info --compiled-unet " + q(tmp_ + "/none.pt2"));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find(tmp_ + "/none.pt2: " + (compiled_unet_available() ? "no such file" : "this build's libtorch")),
            std::string::npos)
      << r.output;
}

// Unset settings come from the model folder's streamdiffusion.json (else its native size / family); flags win.
TEST_F(CliGenerate, DefaultsComeFromTheModel) {
  const std::string model = tmp_ + "/model";
  fs::copy(test::fixture_path("models/tiny-sd21"), model, fs::copy_options::recursive);
  // Without streamdiffusion.json: the native size, UNet sample_size 8 x VAE scale factor 8.
  auto r = run("txt2img --model " + q(model) + " --prompt 'a cat' --threads 1 -o " + q(tmp_ + "/native.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_png_rgb(tmp_ + "/native.png").sizes(), (std::vector<int64_t>{64, 64, 3}));

  std::ofstream(model + "/streamdiffusion.json")
      << R"({"size": "96x128", "num_inference_steps": 8,
             "txt2img": {"t_index_list": [0, 5], "cfg_type": "self", "guidance": 1.6, "delta": 0.5}})";
  r = run("txt2img --model " + q(model) + " --prompt 'a cat' --threads 1 -o " + q(tmp_ + "/rec.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto rec = read_png_rgb(tmp_ + "/rec.png");
  EXPECT_EQ(rec.sizes(), (std::vector<int64_t>{128, 96, 3}));
  // The same run spelled out with flags gives the same image.
  r = run("txt2img --model " + q(model) + " --prompt 'a cat' --threads 1 --size 96x128 --num-inference-steps 8 "
          "--t-index-list 0,5 --cfg-type self --guidance 1.6 --delta 0.5 -o " + q(tmp_ + "/flags.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(max_pixel_diff(read_png_rgb(tmp_ + "/flags.png"), rec), 0);
  // Flags override the file, one by one.
  r = run("txt2img --model " + q(model) + " --prompt 'a cat' --threads 1 --size 64x64 --guidance 1.0 -o " +
          q(tmp_ + "/over.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto over = read_png_rgb(tmp_ + "/over.png");
  EXPECT_EQ(over.sizes(), (std::vector<int64_t>{64, 64, 3}));
  // `info` says which defaults apply and why.
  r = run("info --model " + q(model));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("native size 96x128 (streamdiffusion.json)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("t_index_list 0,5 (streamdiffusion.json)"), std::string::npos) << r.output;
  // img2img: no list in the file; with 8 inference steps the built-in default is the middle index.
  EXPECT_NE(r.output.find("t_index_list 4 (built-in default)"), std::string::npos) << r.output;
  // A malformed file is an error naming the file and field, not silently ignored.
  std::ofstream(model + "/streamdiffusion.json") << R"({"txt2img": {"cfg": "none"}})";
  r = run("txt2img --model " + q(model) + " --prompt 'a cat' -o " + q(tmp_ + "/bad.png"));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("streamdiffusion.json"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("'txt2img.cfg'"), std::string::npos) << r.output;
}

// streamdiffusion.json's "cpu_dtype" is what --dtype auto (the default) loads on a CPU; --dtype still wins. The file
// names the dtype this machine would not pick itself, so the test sees the model's choice either way.
TEST_F(CliGenerate, AutoDtypeFollowsTheModelsCpuDtype) {
  const std::string model = tmp_ + "/model";
  fs::copy(test::fixture_path("models/tiny-sd21"), model, fs::copy_options::recursive);
  const std::string machine = sd::dtype_name(sd::auto_dtype(c10::Device(c10::kCPU)));
  const std::string named = machine == "fp32" ? "bf16" : "fp32";
  std::ofstream(model + "/streamdiffusion.json") << R"({"cpu_dtype": ")" << named << R"("})";
  const std::string gen = "stream --model " + q(model) + " --input none --frames 1 --output none --threads 1 ";
  auto r = run(gen + "--stats-json " + q(tmp_ + "/auto.json"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_json_file(tmp_ + "/auto.json")["config"]["dtype"], named);
  EXPECT_NE(r.output.find("dtype " + named + ": the model's streamdiffusion.json names it for CPUs (this machine's own "
                          "choice would be " + machine + ")"),
            std::string::npos)
      << r.output;
  r = run(gen + "--dtype " + machine + " --stats-json " + q(tmp_ + "/flag.json"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_json_file(tmp_ + "/flag.json")["config"]["dtype"], machine);
  r = run("info --model " + q(model));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("--dtype auto on the CPU: " + named + " (streamdiffusion.json cpu_dtype)"), std::string::npos)
      << r.output;
}

// streamdiffusion.json's "cpu_threads" is the thread count of the default --threads 0; --threads N still wins.
TEST_F(CliGenerate, DefaultThreadsFollowTheModelsCpuThreads) {
  const std::string model = tmp_ + "/model";
  fs::copy(test::fixture_path("models/tiny-sd21"), model, fs::copy_options::recursive);
  std::ofstream(model + "/streamdiffusion.json") << R"({"cpu_threads": 1})";
  const std::string gen = "stream --model " + q(model) + " --input none --frames 1 --output none --dtype fp32 ";
  auto r = run(gen + "--stats-json " + q(tmp_ + "/default.json"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_json_file(tmp_ + "/default.json")["config"]["threads"], 1);
  EXPECT_NE(r.output.find("threads 1: the model's streamdiffusion.json names it for CPUs (--threads N overrides)"),
            std::string::npos)
      << r.output;
  r = run(gen + "--threads 2 --stats-json " + q(tmp_ + "/flag.json"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_json_file(tmp_ + "/flag.json")["config"]["threads"], 2);
  r = run("info --model " + q(model));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("--threads 0 (the default) on the CPU: 1 (streamdiffusion.json cpu_threads)"),
            std::string::npos)
      << r.output;
}

// --clip-skip N (alias --text-encoder-clip-skip) changes the prompt embeddings and so the image.
TEST_F(CliGenerate, ClipSkipOption) {
  const std::string base = "txt2img --model " + q(test::fixture_path("models/tiny-sd15")) +
                           " --prompt 'a photo of a cat' --threads 1 --t-index-list 0 -o ";
  auto r = run(base + q(tmp_ + "/s0.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  r = run(base + q(tmp_ + "/s1.png") + " --clip-skip 1");
  ASSERT_EQ(r.status, 0) << r.output;
  r = run(base + q(tmp_ + "/s1b.png") + " --text-encoder-clip-skip 1");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_GT(max_pixel_diff(read_png_rgb(tmp_ + "/s0.png"), read_png_rgb(tmp_ + "/s1.png")), 0);
  EXPECT_EQ(max_pixel_diff(read_png_rgb(tmp_ + "/s1.png"), read_png_rgb(tmp_ + "/s1b.png")), 0);
  r = run(base + q(tmp_ + "/bad.png") + " --clip-skip 9");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("--clip-skip 9"), std::string::npos) << r.output;
}

// `streamdiffusion` alone lists the commands and a first command to try (exit 0), as --help does.
// SDXL folders need no new flag: the CLI on tiny-sdxl reproduces the StreamDiffusion-on-SDXL cases (fixtures sdxl/).
TEST_F(CliGenerate, SdxlTxt2ImgAndImg2ImgReproduceTheStreamCases) {
  if (!test::fixture_exists("sdxl/stream/cases.json")) GTEST_SKIP() << "sdxl fixtures absent";
  const auto xl = read_json_file(test::fixture_path("sdxl/stream/cases.json"));
  for (const auto& c : xl.at("cases")) {
    const auto& p = c.at("params");
    SCOPED_TRACE(p.at("name").get<std::string>());
    const auto f = SafeTensorsFile::open(test::fixture_path("sdxl/stream/" + c.at("file").get<std::string>()));
    const std::string vae = p.at("vae") == "taesdxl" ? q(test::fixture_path("sdxl/models/tiny-sdxl/taesdxl")) : "none";
    const int n = static_cast<int>(p.at("t_index_list").size());
    if (p.at("mode") == "txt2img") {
      const std::string out = tmp_ + "/xl.png";
      const auto r = run("txt2img" + stream_args(p, "sdxl/models/") + " --taesd " + vae + " -o " + q(out));
      ASSERT_EQ(r.status, 0) << r.output;
      EXPECT_NE(r.output.find("SDXL"), std::string::npos) << r.output;
      const auto ref = tensor_to_image(f.get("call" + std::to_string(n - 1) + ".output"))[0];
      EXPECT_LE(max_pixel_diff(read_png_rgb(out), ref), 1);
    } else {
      const auto imgs = SafeTensorsFile::open(test::fixture_path("sdxl/stream/input_images.safetensors"));
      const auto& calls = c.at("result").at("calls");
      const std::string in_dir = tmp_ + "/xl_in", out_dir = tmp_ + "/xl_out";
      fs::create_directories(in_dir);
      for (size_t i = 0; i < calls.size(); ++i) {
        char name[32];
        std::snprintf(name, sizeof(name), "frame_%03zu.png", i);
        write_png_rgb(in_dir + "/" + name, imgs.get("image" + std::to_string(calls[i].at("input_image_ids")[0].get<int>())));
      }
      const auto r = run("img2img" + stream_args(p, "sdxl/models/") + " --taesd " + vae + " --input " + q(in_dir) +
                         " --output " + q(out_dir));
      ASSERT_EQ(r.status, 0) << r.output;
      int compared = 0;
      for (size_t k = 0; k + n - 1 < calls.size(); ++k) {
        char name[32];
        std::snprintf(name, sizeof(name), "frame_%03zu.png", k);
        const auto ref = tensor_to_image(f.get("call" + std::to_string(k + n - 1) + ".output"))[0];
        EXPECT_LE(max_pixel_diff(read_png_rgb(out_dir + "/" + name), ref), 1) << name;
        ++compared;
      }
      EXPECT_GT(compared, 0);
    }
  }
}

TEST(CliHelp, NoArgumentsListsCommandsAndAFirstCommand) {
  for (const std::string args : {"", "--help"}) {
    const auto r = run(args);
    EXPECT_EQ(r.status, 0) << args << ": " << r.output;
    for (const char* want : {"txt2img", "img2img", "stream", "serve", "info", "bench",
                             "streamdiffusion txt2img --prompt \"red apple\" -o apple.png"})
      EXPECT_NE(r.output.find(want), std::string::npos) << args << " lacks " << want << ":\n" << r.output;
    EXPECT_EQ(r.output.find("A subcommand is required"), std::string::npos) << r.output;
  }
}

#else

TEST(CliGenerate, NotBuilt) { GTEST_SKIP() << "the CLI is not part of this build (SD_ENGINE_ONLY)"; }

#endif

}  // namespace
}  // namespace sd
