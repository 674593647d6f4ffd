// `streamdiffusion bench` on the tiny fixture model with every section, one timed run each: the JSON report has the
// expected structure and its numbers are consistent (positive times, fps = 1/median, median within [min, max],
// speed-ups = ratios of the referenced rows, filter counts add up). Whether the optimised path beats the naive one is
// NOT checked: on a 64 px model with a few thousand parameters the overheads dominate.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "common/cli_run.h"
#include "common/fixtures.h"
#include "core/device.h"
#include "models/conv_layout.h"
#include "models/int8.h"

namespace sd {
namespace {

namespace fs = std::filesystem;

#ifdef SD_BENCH_CLI_PATH

using test::RunResult;
RunResult run(const std::string& args) { return test::run_command(std::string(SD_BENCH_CLI_PATH) + " " + args); }

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

class CliBench : public ::testing::Test {
 protected:
  // `bench --model <the tiny model> <args> --json <dir>/<name>`: the run, and its report when it succeeded.
  struct BenchRun {
    RunResult run;
    nlohmann::json report;
  };
  BenchRun bench(const std::string& args, const std::string& name) {
    const std::string json = dir_ + "/" + name;
    BenchRun b{run("bench --model '" + model_ + "' " + args + " --json '" + json + "'"), nlohmann::json()};
    if (b.run.status == 0 && fs::exists(json)) b.report = read_json(json);
    return b;
  }

  void SetUp() override {
    model_ = test::fixture_path("models/tiny-sd21");
    if (!fs::exists(model_)) GTEST_SKIP() << "no fixture model " << model_;
    dir_ = test::make_temp_dir("sd-bench");
  }
  void TearDown() override {
    if (!dir_.empty()) fs::remove_all(dir_);
  }
  std::string model_, dir_;
};

TEST_F(CliBench, AllSectionsWriteAConsistentReport) {
  const std::string json = dir_ + "/bench.json";
  std::string args = "bench --model '" + model_ +
                     "' --sizes 64 --dtypes fp32,bf16 --sections all --iters 1 --warmup 1 --frames 2 "
                     "--naive-iters 1 --filter-frames 6 --flicker-frames 3 --threads 1 --ablation-t-index 0,16 --json '" + json +
                     "'";
#ifdef SD_TEST_HAVE_OPENCV
  const std::string png = dir_ + "/bench.png";
  args += " --chart '" + png + "'";
#endif
  const RunResult r = run(args);
  ASSERT_EQ(r.status, 0) << r.output;
  ASSERT_TRUE(fs::exists(json)) << r.output;
#ifdef SD_TEST_HAVE_OPENCV
  ASSERT_TRUE(fs::exists(png));
  EXPECT_GT(fs::file_size(png), 1000u);
#endif
  const nlohmann::json j = read_json(json);
  EXPECT_EQ(j["schema"], "streamdiffusion-bench/1");
  EXPECT_EQ(j["device"], "cpu");
  EXPECT_EQ(j["threads"], 1);
  EXPECT_EQ(j["sections"].size(), 8u);
  // The run measures its own GEMM ceiling per requested dtype next to the stated ones, and names the CPU's SIMD.
  for (const std::string d : {"fp32", "bf16"}) {
    ASSERT_TRUE(j["ceilings_gflops"].contains("measured_" + d)) << d;
    EXPECT_GT(j["ceilings_gflops"]["measured_" + d].get<double>(), 0.1) << d;
  }
  const std::set<std::string> simd = {"amx_bf16", "avx512_bf16", "avx512", "avx2", "sse", "unknown"};
  EXPECT_EQ(simd.count(j["cpu_simd"].get<std::string>()), 1u) << j["cpu_simd"];
  EXPECT_TRUE(j["cpu_native_bf16"].is_boolean());
  ASSERT_TRUE(j["results"].is_array());
  ASSERT_GE(j["loads"].size(), 4u);  // fp32 + bf16, each with the AutoencoderKL and the TAESD model set

  std::map<std::string, nlohmann::json> by_id;
  std::set<std::string> sections;
  for (const auto& x : j["results"]) {
    const std::string id = x["id"];
    SCOPED_TRACE(id);
    EXPECT_EQ(by_id.count(id), 0u) << "duplicate id";
    by_id[id] = x;
    sections.insert(x["section"].get<std::string>());
    const double med = x["median_s"], mn = x["min_s"], mx = x["max_s"], fps = x["fps"];
    EXPECT_GT(med, 0.0);
    EXPECT_LE(mn, med);
    EXPECT_LE(med, mx);
    EXPECT_NEAR(fps, 1.0 / med, 1e-9 / med);
    EXPECT_EQ(x["samples_s"].size(), x["iters"].get<size_t>());
    EXPECT_GE(x["iters"].get<int>(), 1);
    EXPECT_TRUE(x["dtype"] == "fp32" || x["dtype"] == "bf16");
    EXPECT_GE(x["rss_mib"].get<double>(), 0.0);
    // The tiny model is not a real SD architecture: no FLOP counts, so no GFLOP/s.
    EXPECT_EQ(x["gflop"].get<double>(), 0.0);
    EXPECT_EQ(x["pct_measured_ceiling"].get<double>(), 0.0);
    if (x.contains("extra") && x["extra"].contains("per_frame_s")) {
      double parts = 0;
      for (const auto& [k, v] : x["extra"]["per_frame_s"].items()) {
        EXPECT_GE(v.get<double>(), 0.0) << k;
        parts += v.get<double>();
      }
      EXPECT_GT(parts, 0.0);
    }
  }
  for (const std::string s : {"components", "e2e", "ablation", "batch", "cfg", "vae", "filter", "flicker"})
    EXPECT_EQ(sections.count(s), 1u) << "no result in section " << s;
  for (const std::string id : {"text_encode/fp32", "unet/bf16/64/b1", "taesd_decode/fp32/64", "vae_decode/bf16/64",
                               "vae_encode/fp32/64", "taesd_encode/bf16/64"})
    EXPECT_EQ(by_id.count(id), 1u) << id;

  // Stream rows: per-frame UNet rows match the configuration (n steps batched, guidance rows).
  for (const auto& [id, x] : by_id) {
    if (id.rfind("stream/", 0) != 0) continue;
    SCOPED_TRACE(id);
    const auto& e = x["extra"];
    const double rows = e["unet_rows_per_frame"], calls = e["unet_calls_per_frame"];
    EXPECT_EQ(e.at("graph_failures"), 0);  // no CUDA graph on the CPU, so none failed
    const int64_t n = e["t_index_list"].size();
    const std::string cfg = e["cfg"];
    const double per_call = cfg == "full" ? 2.0 * n : cfg == "initialize" ? n + 1.0 : static_cast<double>(n);
    if (e["denoising_batch"].get<bool>()) {
      EXPECT_DOUBLE_EQ(calls, 1.0);
      EXPECT_DOUBLE_EQ(rows, per_call);
      EXPECT_EQ(x["batch"].get<double>(), per_call);
    } else {
      EXPECT_DOUBLE_EQ(calls, static_cast<double>(n));
    }
  }

  // Comparisons: speed-up = baseline / candidate of the rows they name.
  ASSERT_TRUE(j["comparisons"].is_array());
  std::set<std::string> cmp_sections;
  for (const auto& c : j["comparisons"]) {
    SCOPED_TRACE(c["what"].get<std::string>());
    cmp_sections.insert(c["section"].get<std::string>());
    ASSERT_EQ(by_id.count(c["baseline"].get<std::string>()), 1u);
    ASSERT_EQ(by_id.count(c["candidate"].get<std::string>()), 1u);
    const double b = by_id[c["baseline"].get<std::string>()]["median_s"];
    const double k = by_id[c["candidate"].get<std::string>()]["median_s"];
    EXPECT_DOUBLE_EQ(c["baseline_s"].get<double>(), b);
    EXPECT_NEAR(c["speedup"].get<double>(), b / k, 1e-9 * b / k);
  }
  for (const std::string s : {"batch", "cfg", "vae", "components"}) EXPECT_EQ(cmp_sections.count(s), 1u) << s;
  // 2 dtypes x (attention tiles 1 + upsample phases 2 + CPU layout 3 + batch 2 + cfg 3 + vae 4) comparisons at one
  // size.
  EXPECT_EQ(j["comparisons"].size(), 30u);
  // TAESD (encode, decode) and the AutoencoderKL's decode in the CPU layout the rule does not pick for the dtype.
  for (const std::string dt : {"fp32", "bf16"}) {
    const bool cl = sd::nn::cpu_channels_last(dt == "fp32" ? c10::kFloat : c10::kBFloat16);
    EXPECT_EQ(j["cpu_channels_last"][dt].get<bool>(), cl) << dt;
    for (const std::string name : {"taesd_encode", "taesd_decode", "vae_decode"}) {
      const std::string id = name + "/" + dt + "/64/other-layout";
      ASSERT_EQ(by_id.count(id), 1u) << id;
      const std::string variant = by_id[id]["variant"];
      EXPECT_EQ(variant,
                std::string(name == "vae_decode" ? "AutoencoderKL" : "TAESD") + (cl ? " NCHW" : " channels-last"));
    }
  }
  EXPECT_EQ(by_id.count("vae_encode/fp32/64/other-layout"), 0u);  // slow, and the same convolutions
  // The UNet with the tiled CPU attention switched off is its own row (and the fast path is back on after it).
  EXPECT_EQ(by_id.count("unet/bf16/64/b1/no-attention-tiles"), 1u);
  // So are both decoders with the upsample phases off (CPU).
  for (const std::string id : {"taesd_decode/fp32/64/no-upsample-phases", "vae_decode/bf16/64/no-upsample-phases"})
    EXPECT_EQ(by_id.count(id), 1u) << id;

  // Ablation: 7 steps (2 denoising steps, so the stream batch row is there), the first is the naive path in fp32.
  ASSERT_EQ(j["ablation"].size(), 1u);
  const auto& a = j["ablation"][0];
  EXPECT_EQ(a["size"], 64);
  EXPECT_EQ(a["steps"], 2);
  ASSERT_EQ(a["rows"].size(), 7u);
  EXPECT_DOUBLE_EQ(a["rows"][0]["speedup_vs_naive"].get<double>(), 1.0);
  EXPECT_EQ(a["rows"][0]["dtype"], "fp32");
  EXPECT_EQ(a["rows"][5]["dtype"], "bf16");
  const auto& naive = by_id.at(a["rows"][0]["result"].get<std::string>());
  EXPECT_EQ(naive["name"], "naive_txt2img");
  EXPECT_EQ(naive["batch"], 2);                                  // CFG batch of 2
  EXPECT_EQ(naive["extra"]["unet_rows_per_frame"], 4);           // 2 steps x 2 rows
  EXPECT_EQ(naive["extra"]["text_encodes_per_frame"], 2);        // prompt + negative prompt per call
  const double naive_s = naive["median_s"];
  double prev = 0;
  for (const auto& row : a["rows"]) {
    SCOPED_TRACE(row["label"].get<std::string>());
    const auto& res = by_id.at(row["result"].get<std::string>());
    EXPECT_DOUBLE_EQ(row["median_s"].get<double>(), res["median_s"].get<double>());
    EXPECT_NEAR(row["speedup_vs_naive"].get<double>(), naive_s / row["median_s"].get<double>(), 1e-9 * naive_s);
    if (prev > 0) {
      EXPECT_NEAR(row["speedup_vs_previous"].get<double>(), prev / row["median_s"].get<double>(), 1e-9 * prev);
    }
    prev = row["median_s"];
  }

  // Filter: the counts add up and the effective fps is frames / total time of the timed frames.
  int filters = 0;
  for (const auto& [id, x] : by_id) {
    if (x["section"] != "filter" || x["name"] != "img2img_filter") continue;
    ++filters;
    const auto& e = x["extra"];
    EXPECT_EQ(e["frames"], 6);
    EXPECT_EQ(e["processed"].get<int>() + e["skipped"].get<int>(), 6);
    EXPECT_GE(e["skipped"].get<int>(), 1) << "a static scene must be skipped at threshold 0.98";
    double total = 0;
    for (const auto& s : x["samples_s"]) total += s.get<double>();
    EXPECT_NEAR(e["effective_fps"].get<double>(), 6.0 / total, 1e-9 * 6.0 / total);
    EXPECT_NEAR(e["compute_saved_pct"].get<double>(), 100.0 * e["skipped"].get<int>() / 6.0, 1e-9);
  }
  EXPECT_EQ(filters, 2);  // fp32 and bf16
}

// The latent-feedback flicker figure (README "Latent feedback"): the same noisy static scene through a stream without
// and one with --latent-feedback A; the outputs change less from frame to frame with it.
TEST_F(CliBench, FlickerSectionMeasuresLatentFeedback) {
  const std::string json = dir_ + "/flicker.json";
  const RunResult r = run("bench --model '" + model_ + "' --sections flicker --sizes 64 --dtypes fp32 --threads 1 " +
                          "--latent-feedback 0.5 --flicker-frames 8 --json '" + json + "'");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("% less than without"), std::string::npos) << r.output;
  const nlohmann::json j = read_json(json);
  std::map<double, nlohmann::json> by_a;
  for (const auto& x : j["results"]) {
    ASSERT_EQ(x["section"], "flicker");
    by_a[x["extra"]["latent_feedback"].get<double>()] = x["extra"];
  }
  ASSERT_EQ(by_a.size(), 2u);
  const auto& off = by_a.at(0.0);
  const auto& on = by_a.at(0.5);
  EXPECT_EQ(off["frames"], 8);
  const double input = off["input_flicker_levels"], f_off = off["flicker_levels"], f_on = on["flicker_levels"];
  std::cout << "  flicker: input " << input << ", without " << f_off << ", with A=0.5 " << f_on << " levels/frame\n";
  EXPECT_GT(input, 1.0);  // the sensor noise is there (std 0.04 of [-1, 1] = 5 levels)
  EXPECT_GT(f_off, 0.0);
  EXPECT_LT(f_on, f_off);
  EXPECT_NEAR(on["reduction_pct"].get<double>(), 100.0 * (1 - f_on / f_off), 1e-9);
  EXPECT_EQ(on["flicker_without_levels"].get<double>(), f_off);
  // bad values are refused
  EXPECT_NE(run("bench --model '" + model_ + "' --sections flicker --latent-feedback 0").status, 0);
  EXPECT_NE(run("bench --model '" + model_ + "' --sections flicker --flicker-frames 1").status, 0);
}

TEST_F(CliBench, RejectsUnknownSectionsAndBadOptions) {
  RunResult r = run("bench --model '" + model_ + "' --sections components,warp");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("unknown section 'warp'"), std::string::npos) << r.output;
  r = run("bench --model '" + model_ + "' --dtypes fp16");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("fp16"), std::string::npos) << r.output;
  r = run("bench --model '" + model_ + "' --sizes 60");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--sizes"), std::string::npos) << r.output;
}

// The multistream section (not part of "all"): per stream count one row one by one and one batched (one UNet call
// per round), fps_total = K / median, the ratio in the row, the comparison and the JSON table; bad counts refused.
TEST_F(CliBench, MultistreamSectionTimesOneByOneAndBatched) {
  const BenchRun b = bench("--sizes 64 --dtypes fp32 --sections multistream --streams 1,3 --frames 2 --warmup 0 "
                           "--threads 1",
                           "multi.json");
  const RunResult& r = b.run;
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("3 streams: one by one"), std::string::npos) << r.output;
  const auto& j = b.report;
  ASSERT_TRUE(j.contains("multistream")) << j.dump();
  ASSERT_EQ(j["multistream"].size(), 1u);
  const auto& rows = j["multistream"][0]["rows"];
  ASSERT_EQ(rows.size(), 2u);
  std::map<std::string, nlohmann::json> by_id;
  for (const auto& res : j["results"]) by_id[res["id"].get<std::string>()] = res;
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t k = rows[i]["streams"].get<int64_t>();
    EXPECT_EQ(k, i == 0 ? 1 : 3);
    const double one = rows[i]["one_by_one_fps"].get<double>(), many = rows[i]["batched_fps"].get<double>();
    EXPECT_GT(one, 0);
    EXPECT_GT(many, 0);
    EXPECT_NEAR(rows[i]["ratio"].get<double>(), many / one, 1e-9);
    EXPECT_NEAR(one, k / rows[i]["one_by_one_s_per_round"].get<double>(), 1e-9);
    const std::string variant = "k=" + std::to_string(k) + " ae=taesd cfg=self t=32,45";
    const auto& b = by_id.at("multistream/batched/" + variant + "/fp32/64");
    EXPECT_EQ(b["section"], "multistream");
    EXPECT_EQ(b["extra"]["unet_calls_per_round"], 1);
    EXPECT_EQ(b["extra"].at("graph_failures"), 0);
    EXPECT_EQ(b["extra"]["shared_unet_calls"], k >= 2 ? 2 : 0);
    ASSERT_TRUE(by_id.count("multistream/one-by-one/" + variant + "/fp32/64"));
    EXPECT_EQ(by_id.at("multistream/one-by-one/" + variant + "/fp32/64")["extra"].at("graph_failures"), 0);
  }
  EXPECT_NE(run("bench --model '" + model_ + "' --sections multistream --streams 0").status, 0);
  EXPECT_NE(run("bench --model '" + model_ + "' --sections multistream --streams 2,x").status, 0);
}

// --sections profile: the img2img frame's operators by self time (CPU here): the convolutions and matrix products
// are there, each share is its self time over the total, the shares add up to 1, the table is sorted, and the
// per-frame total is at most the whole frame's time (the operators run inside the frame).
TEST_F(CliBench, ProfileSectionListsTheFramesOperators) {
  const BenchRun b =
      bench("--sizes 64 --dtypes fp32 --sections profile,e2e --frames 4 --warmup 1 --threads 1", "profile.json");
  const RunResult& r = b.run;
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("profile    img2img fp32 64 px"), std::string::npos) << r.output;
  const auto& j = b.report;
  ASSERT_TRUE(j.contains("profile")) << j.dump();
  ASSERT_EQ(j["profile"].size(), 1u);
  const auto& p = j["profile"][0];
  EXPECT_EQ(p["clock"], "cpu");
  EXPECT_EQ(p["frames"], 4);
  const auto& ops = p["operators"];
  ASSERT_GT(ops.size(), 10u);
  double shares = 0, ms = 0, prev = 1e30;
  std::set<std::string> names;
  for (const auto& op : ops) {
    const double self = op["self_ms_per_frame"].get<double>();
    EXPECT_GE(self, 0);
    EXPECT_LE(self, prev) << "sorted by self time";
    prev = self;
    EXPECT_GT(op["calls_per_frame"].get<double>(), 0);
    // The longest call is at most the operator's whole time, and at least its mean call's.
    const double calls = op["calls_per_frame"].get<double>() * 4;
    EXPECT_LE(op["max_call_ms"].get<double>(), self * 4 + 1e-9) << op.dump();
    EXPECT_GE(op["max_call_ms"].get<double>(), self * 4 / calls - 1e-9) << op.dump();
    shares += op["share"].get<double>();
    ms += self;
    names.insert(op["operator"].get<std::string>());
  }
  EXPECT_NEAR(shares, 1.0, 1e-9);
  EXPECT_NEAR(ms, p["ms_per_frame"].get<double>(), 1e-9);
  bool conv = false, matmul = false;
  for (const auto& n : names) {
    conv = conv || n.find("conv") != std::string::npos;
    matmul = matmul || n.find("mm") != std::string::npos || n.find("linear") != std::string::npos;
  }
  EXPECT_TRUE(conv) << "no convolution among the operators";
  EXPECT_TRUE(matmul) << "no matrix product among the operators";
  // The e2e img2img row of the same run: the profiled operators fit inside its frame (median, with the profiler's own
  // cost on top of the operators the bound is loose but real).
  int e2e_rows = 0;
  for (const auto& res : j["results"]) {
    if (res["section"] != "e2e" || res["name"] != "img2img") continue;
    ++e2e_rows;
    EXPECT_LT(p["ms_per_frame"].get<double>(), 3.0 * 1e3 * res["median_s"].get<double>()) << res.dump();
  }
  EXPECT_EQ(e2e_rows, 1);
}

// --profile-streams K: a second table over rounds of K batched streams. A round makes one encode, one UNet call and
// one decode for all K streams, as a single stream's frame does for one: as many aten::conv2d calls (the kernels under
// it differ with the batch size).
TEST_F(CliBench, ProfileStreamsProfilesBatchedRounds) {
  const BenchRun b = bench("--sizes 64 --dtypes fp32 --sections profile --profile-streams 3 --frames 2 --warmup 1 "
                           "--threads 1",
                           "profile-streams.json");
  const RunResult& r = b.run;
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("profile    3 batched img2img streams (cfg self, t 32,45) fp32 64 px"), std::string::npos)
      << r.output;
  const auto& j = b.report;
  ASSERT_EQ(j["profile"].size(), 2u) << j.dump();
  const auto& one = j["profile"][0];
  const auto& many = j["profile"][1];
  EXPECT_EQ(one["mode"], "img2img");
  EXPECT_EQ(many["mode"], "img2img-batched-streams");
  EXPECT_EQ(many["streams"], 3);
  EXPECT_EQ(many["rounds"], 2);
  const auto conv2d_calls = [](const nlohmann::json& p, const std::string& unit) {
    double calls = 0, ms = 0;
    for (const auto& op : p["operators"]) {
      ms += op["self_ms_per_" + unit].get<double>();
      if (op["operator"] == "aten::conv2d") calls = op["calls_per_" + unit].get<double>();
    }
    EXPECT_NEAR(ms, p["ms_per_" + unit].get<double>(), 1e-9);
    return calls;
  };
  const double per_frame = conv2d_calls(one, "frame");
  EXPECT_GT(per_frame, 10);
  EXPECT_EQ(conv2d_calls(many, "round"), per_frame);
  EXPECT_NE(run("bench --model '" + model_ + "' --sections profile --profile-streams -1").status, 0);
}

// --profile-kernels: Kineto's kernel trace of graphed frames needs a GPU and a CUDA build; elsewhere the profile
// section says so in one line and its operator tables are unchanged (tests/pipeline/test_bench_profile.cpp checks the
// summary; scripts/gpu-check.sh runs it on a GPU).
TEST_F(CliBench, ProfileKernelsSaysWhyItSkipsOffAGpu) {
  const BenchRun b = bench("--sizes 64 --dtypes fp32 --sections profile --profile-kernels --profile-trace '" + dir_ +
                               "' --frames 2 --warmup 1 --threads 1",
                           "kernels.json");
  ASSERT_EQ(b.run.status, 0) << b.run.output;
  EXPECT_NE(b.run.output.find("profile    kernels: skipped (Kineto's kernel trace needs a CUDA device and a CUDA build)"),
            std::string::npos)
      << b.run.output;
  ASSERT_EQ(b.report["profile"].size(), 1u) << b.report.dump();
  EXPECT_EQ(b.report["profile"][0]["mode"], "img2img");
  EXPECT_EQ(b.report["profile"][0]["clock"], "cpu");
  EXPECT_FALSE(fs::exists(dir_ + "/kernels-img2img.json")) << "no trace where none was taken";
}

// --pipelined-frames N: e2e rows also queue N frames back to back with one synchronisation (a runtime's throughput;
// by default on a GPU only): the frame count, fps = frames / total time, and the host's queueing time inside that
// total; other sections' rows have none, and neither has a CPU run without the option.
TEST_F(CliBench, E2eRowsCarryAPipelinedThroughput) {
  const BenchRun b = bench("--sizes 64 --dtypes fp32 --sections e2e,cfg --frames 2 --pipelined-frames 3 --warmup 1 "
                           "--threads 1",
                           "pipelined.json");
  const RunResult& r = b.run;
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("3 frames back to back"), std::string::npos) << r.output;
  const auto& j = b.report;
  int e2e = 0;
  for (const auto& res : j["results"]) {
    SCOPED_TRACE(res["id"].get<std::string>());
    if (res["section"] != "e2e") {
      EXPECT_FALSE(res.contains("extra") && res["extra"].contains("pipelined"));
      continue;
    }
    ++e2e;
    ASSERT_TRUE(res["extra"].contains("pipelined")) << res.dump();
    const auto& p = res["extra"]["pipelined"];
    EXPECT_EQ(p["frames"], 3);
    const double total = p["total_s"].get<double>();
    ASSERT_GT(total, 0);
    EXPECT_NEAR(p["fps"].get<double>(), 3 / total, 1e-9 * 3 / total);
    EXPECT_GT(p["host_s_per_frame"].get<double>(), 0);
    EXPECT_LE(p["host_s_per_frame"].get<double>() * 3, total);
  }
  EXPECT_EQ(e2e, 2);  // txt2img and img2img
  const BenchRun plain =
      bench("--sizes 64 --dtypes fp32 --sections e2e --frames 2 --warmup 0 --threads 1", "plain.json");
  ASSERT_EQ(plain.run.status, 0) << plain.run.output;
  for (const auto& res : plain.report["results"]) EXPECT_FALSE(res["extra"].contains("pipelined")) << res.dump();
  const RunResult bad = run("bench --model '" + model_ + "' --sections e2e --pipelined-frames -2");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.output.find("--pipelined-frames"), std::string::npos) << bad.output;
}

// --frame-on-device (always on CUDA): one more e2e img2img row whose frame is on the device before the first call
// (variant "... frame=device"), the same stream configuration as the host-frame row.
TEST_F(CliBench, FrameOnDeviceAddsAnImg2imgRow) {
  const BenchRun b =
      bench("--sizes 64 --dtypes fp32 --sections e2e --frames 2 --warmup 1 --threads 1 --frame-on-device", "dev.json");
  ASSERT_EQ(b.run.status, 0) << b.run.output;
  const nlohmann::json* host = nullptr;
  const nlohmann::json* dev = nullptr;
  int e2e = 0;
  for (const auto& res : b.report["results"]) {
    if (res["section"] != "e2e") continue;
    ++e2e;
    if (res["name"] != "img2img") continue;
    const std::string v = res["variant"];
    (v.size() > 13 && v.compare(v.size() - 13, 13, " frame=device") == 0 ? dev : host) = &res;
  }
  EXPECT_EQ(e2e, 3);  // txt2img, img2img, img2img frame=device
  ASSERT_TRUE(host && dev) << b.report.dump();
  EXPECT_EQ((*dev)["variant"].get<std::string>(), (*host)["variant"].get<std::string>() + " frame=device");
  EXPECT_GT((*dev)["fps"].get<double>(), 0);
  EXPECT_EQ((*dev)["extra"]["unet_calls_per_frame"], (*host)["extra"]["unet_calls_per_frame"]);
  EXPECT_EQ((*dev)["extra"]["t_index_list"], (*host)["extra"]["t_index_list"]);
  EXPECT_GT((*dev)["extra"]["per_frame_s"]["image_encode"].get<double>(), 0);
  const BenchRun plain = bench("--sizes 64 --dtypes fp32 --sections e2e --frames 2 --warmup 0 --threads 1", "p.json");
  ASSERT_EQ(plain.run.status, 0) << plain.run.output;
  for (const auto& res : plain.report["results"])
    EXPECT_EQ(res["variant"].get<std::string>().find("frame=device"), std::string::npos) << "off the GPU only on request";
  for (const auto& res : plain.report["results"])
    EXPECT_EQ(res["variant"].get<std::string>().find("fused-conv=off"), std::string::npos) << "off the GPU on request";
}

// --unfused-rows (always on CUDA while the fusion is on): TAESD's components and the e2e frames that use it again with
// cuDNN's fused convolution + ReLU off (ids ".../unfused"; variants "TAESD unfused", "... fused-conv=off"), each
// compared with its fused row. Off the GPU both ways are the eager path; the rows report the fusion off there.
TEST_F(CliBench, UnfusedRowsTimeTaesdBothWays) {
  const BenchRun b = bench("--sizes 64 --dtypes fp32 --sections components,e2e --iters 2 --frames 2 --warmup 1 "
                           "--threads 1 --unfused-rows", "unfused.json");
  ASSERT_EQ(b.run.status, 0) << b.run.output;
  std::map<std::string, int> taesd;  // component rows by variant
  std::set<std::string> unfused_e2e;
  int e2e = 0;
  for (const auto& res : b.report["results"]) {
    const std::string v = res["variant"], name = res["name"];
    if (res["section"] == "components" && name.rfind("taesd_", 0) == 0) {
      ++taesd[v];
      EXPECT_GT(res["median_s"].get<double>(), 0) << res.dump();
    }
    if (res["section"] != "e2e") continue;
    ++e2e;
    EXPECT_FALSE(res["extra"]["cuda_fused_conv"].get<bool>()) << "off CUDA nothing runs fused: " << res.dump();
    if (v.find(" fused-conv=off") != std::string::npos) unfused_e2e.insert(name);
  }
  EXPECT_EQ(taesd["TAESD"], 2);  // encode, decode
  EXPECT_EQ(taesd["TAESD unfused"], 2);
  EXPECT_EQ(e2e, 4);  // txt2img, img2img, and both unfused
  EXPECT_EQ(unfused_e2e, (std::set<std::string>{"txt2img", "img2img"}));
  int compared = 0;
  for (const auto& c : b.report["comparisons"]) {
    const std::string what = c["what"];
    if (what.find("fused convolution + ReLU vs unfused") == std::string::npos) continue;
    ++compared;
    EXPECT_NE(c["baseline"].get<std::string>().find(what.rfind("TAESD e", 0) == 0 || what.rfind("TAESD d", 0) == 0
                                                         ? "/unfused"
                                                         : "fused-conv=off"),
              std::string::npos)
        << c.dump();
    EXPECT_GT(c["speedup"].get<double>(), 0);
  }
  EXPECT_EQ(compared, 4) << b.report["comparisons"].dump();  // encode, decode, txt2img, img2img
  EXPECT_NE(b.run.output.find("TAESD decode fused convolution + ReLU vs unfused, fp32 64 px"), std::string::npos)
      << b.run.output;
}

// --deep-cache-every K: extra e2e rows (variant "... deep=K", timed frames a multiple of K, the shallow calls
// counted) and one comparison per mode against the exact row by their means; K = 0 is refused.
TEST_F(CliBench, DeepCacheRowsAndComparisons) {
  const std::string json = dir_ + "/deep.json";
  RunResult r = run("bench --model '" + model_ + "' --sizes 64 --dtypes fp32 --sections e2e --frames 3 --warmup 1 "
                    "--threads 1 --deep-cache-every 2 --json '" + json + "'");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = read_json(json);
  int deep_rows = 0;
  for (const auto& x : j["results"]) {
    if (x["variant"].get<std::string>().find(" deep=2") == std::string::npos) continue;
    ++deep_rows;
    EXPECT_EQ(x["samples_s"].size(), 4u) << "3 frames rounded up to a multiple of 2";
    EXPECT_EQ(x["extra"]["unet_shallow_calls"], 2) << x.dump();
    EXPECT_DOUBLE_EQ(x["extra"]["amortized_s_per_frame"].get<double>(), x["mean_s"].get<double>());
  }
  EXPECT_EQ(deep_rows, 2);
  int comparisons = 0;
  for (const auto& c : j["comparisons"]) {
    if (c["what"].get<std::string>().rfind("deep cache every 2", 0) != 0) continue;
    ++comparisons;
    EXPECT_NE(c["candidate"].get<std::string>().find(" deep=2/fp32/64"), std::string::npos) << c.dump();
  }
  EXPECT_EQ(comparisons, 2);
  r = run("bench --model '" + model_ + "' --deep-cache-every 0");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("bench --deep-cache-every must be >= 1"), std::string::npos) << r.output;
}

// A TAESD-only model (vae/ holds only a config, like models/emoji-tiny): "all" runs what it can, the AutoencoderKL
// sections are refused by name, and a model with neither autoencoder is a clear error.
TEST_F(CliBench, TaesdOnlyModel) {
  const std::string m = dir_ + "/taesd-only";
  fs::copy(model_, m, fs::copy_options::recursive);
  for (const auto& e : fs::directory_iterator(m + "/vae"))
    if (e.path().extension() == ".safetensors" || e.path().extension() == ".bin") fs::remove(e.path());
  ASSERT_TRUE(fs::exists(m + "/vae/config.json"));
  const std::string json = dir_ + "/taesd-only.json";
  RunResult r = run("bench --model '" + m + "' --sizes 64 --dtypes fp32 --iters 1 --warmup 0 --frames 2 " +
                    "--filter-frames 3 --flicker-frames 2 --threads 1 --json '" + json + "'");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("sections vae and ablation left out"), std::string::npos) << r.output;
  const nlohmann::json j = read_json(json);
  std::set<std::string> sections;
  for (const auto& x : j["results"]) sections.insert(x["section"].get<std::string>());
  EXPECT_EQ(sections, (std::set<std::string>{"components", "e2e", "batch", "cfg", "filter", "flicker"}));

  r = run("bench --model '" + m + "' --sections vae --sizes 64 --dtypes fp32");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("vae has no weights (a TAESD-only model); the vae and ablation sections need an "
                          "AutoencoderKL"),
            std::string::npos)
      << r.output;

  fs::remove_all(m + "/taesd");
  r = run("bench --model '" + m + "' --sections e2e --sizes 64 --dtypes fp32");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("neither vae/ weights nor a TAESD"), std::string::npos) << r.output;
}

// Without --sizes the bench runs at the model's native size (streamdiffusion.json, else sample_size x VAE scale).
TEST_F(CliBench, DefaultSizeIsTheModelsNativeSize) {
  const std::string m = dir_ + "/native";
  fs::copy(model_, m, fs::copy_options::recursive);
  std::ofstream(m + "/streamdiffusion.json") << R"({"size": "96x96"})";
  const std::string json = dir_ + "/native.json";
  RunResult r = run("bench --model '" + m + "' --sections components --dtypes fp32 --iters 1 --warmup 0 --threads 1 "
                    "--json '" + json + "'");
  ASSERT_EQ(r.status, 0) << r.output;
  const nlohmann::json j = read_json(json);
  ASSERT_GT(j["results"].size(), 1u);
  for (const auto& x : j["results"])  // text encoding has no image size (0)
    if (x["name"] != "text_encode") {
      EXPECT_EQ(x["size"].get<int64_t>(), 96) << x.dump();
    }
  std::ofstream(m + "/streamdiffusion.json") << R"({"size": "64x96"})";
  r = run("bench --model '" + m + "' --sections components --dtypes fp32");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("is not square; give --sizes"), std::string::npos) << r.output;
}

// --dtypes defaults to auto, resolved like every other command's --dtype: the JSON names the concrete dtype.
TEST_F(CliBench, DtypesAutoIsTheDefaultAndReportedResolved) {
  const std::string expected = dtype_name(auto_dtype(c10::Device(c10::kCPU)));
  const std::string json = dir_ + "/auto.json";
  RunResult r = run("bench --model '" + model_ + "' --sections components --sizes 64 --iters 1 --warmup 0 --threads 1 "
                    "--json '" + json + "'");
  ASSERT_EQ(r.status, 0) << r.output;
  nlohmann::json j = read_json(json);
  EXPECT_EQ(j["dtypes"], nlohmann::json::array({expected})) << j["dtypes"];
  ASSERT_GT(j["results"].size(), 1u);
  for (const auto& x : j["results"]) EXPECT_EQ(x["dtype"], expected) << x.dump();
  // Named twice (auto is fp32 here or bf16 there): each dtype runs once.
  r = run("bench --model '" + model_ + "' --sections components --sizes 64 --iters 1 --warmup 0 --threads 1 "
          "--dtypes auto,fp32," + expected + " --json '" + json + "'");
  ASSERT_EQ(r.status, 0) << r.output;
  j = read_json(json);
  const auto want = expected == "fp32" ? nlohmann::json::array({"fp32"}) : nlohmann::json::array({expected, "fp32"});
  EXPECT_EQ(j["dtypes"], want) << j["dtypes"];
}

// --dtypes int8: rows labelled int8 with the int8 GEMM as their measured ceiling where the kernels exist (libtorch 2,
// a CPU with VNNI/AMX); elsewhere a clear refusal that says why (Debian's libtorch 1.13 has no oneDNN int8 operators).
TEST_F(CliBench, Int8RowsOrTheReasonTheyCannotRun) {
  const std::string json = dir_ + "/int8.json";
  const RunResult r = run("bench --model '" + model_ + "' --sections components --sizes 64 --iters 1 --warmup 0 "
                          "--threads 1 --dtypes int8 --json '" + json + "'");
  if (!sd::int8::available()) {
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.output.find("bench --dtypes int8: " + sd::int8::unavailable_reason()), std::string::npos) << r.output;
    return;
  }
  ASSERT_EQ(r.status, 0) << r.output;
  const nlohmann::json j = read_json(json);
  EXPECT_EQ(j["dtypes"], nlohmann::json::array({"int8"}));
  EXPECT_GT(j["ceilings_gflops"]["measured_int8"].get<double>(), 0.0) << j["ceilings_gflops"];
  bool unet = false;
  for (const auto& x : j["results"]) {
    EXPECT_EQ(x["dtype"], "int8") << x.dump();
    if (x["name"] == "unet") unet = true;
  }
  EXPECT_TRUE(unet);
  EXPECT_NE(r.output.find("int8/"), std::string::npos) << "the load line names the int8 mode: " << r.output;
}

#else

TEST(CliBench, NeedsTheCli) { GTEST_SKIP() << "built without the streamdiffusion CLI"; }

#endif

}  // namespace
}  // namespace sd
