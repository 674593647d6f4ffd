// `streamdiffusion bench`: per-component and end-to-end timings on a model folder (use make-random-model for the real
// architectures). Medians over timed iterations after warm-up; RSS after each stage; GFLOP/s where the architecture's
// FLOP counts are known.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "apps/cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "io/model_folder.h"
#include "io/state_dict.h"
#include "models/autoencoder_kl.h"
#include "models/autoencoder_tiny.h"
#include "models/clip_text_model.h"
#include "models/unet_2d_condition.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/stream_diffusion.h"
#include "tokenizer/clip_tokenizer.h"

namespace {

using Clock = std::chrono::steady_clock;

double rss_mib() {
  std::ifstream in("/proc/self/statm");
  long pages_total = 0, pages_rss = 0;
  in >> pages_total >> pages_rss;
  return static_cast<double>(pages_rss) * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
}

double peak_rss_mib() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Runs fn warmup + iters times, returns the median seconds of the timed runs.
template <typename Fn>
double time_median(int warmup, int iters, Fn&& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> t;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = Clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return median(t);
}

// FLOPs (multiply-add = 2) of the real SD architectures, per image, from the measurements; 0 = unknown.
double known_gflop(const std::string& component, int64_t params, int64_t size) {
  const bool s256 = size == 256, s512 = size == 512;
  if (!s256 && !s512) return 0;
  if (component == "unet" && (params == 865910724 || params == 859520964)) return s256 ? 181 : 804;
  if (component == "taesd_encode" && params == 1222532) return s256 ? 31 : 122;
  if (component == "taesd_decode" && params == 1222531) return s256 ? 35 : 141;
  if (component == "vae_decode" && params > 40000000) return s256 ? 622 : 2515;
  if (component == "text_encode" && params == 340387840) return 45;
  return 0;
}

struct Row {
  std::string what;
  std::string dtype;
  int64_t size = 0;
  int64_t batch = 1;
  double seconds = 0;
  double gflops = 0;  // achieved GFLOP/s (0 = unknown)
  double rss = 0;
};

void print_row(const Row& r) {
  std::cout << std::left << std::setw(26) << r.what << std::setw(6) << r.dtype << std::right << std::setw(6) << r.size
            << std::setw(4) << r.batch << std::setw(11) << std::fixed << std::setprecision(4) << r.seconds;
  if (r.gflops > 0)
    std::cout << std::setw(10) << std::setprecision(1) << r.gflops;
  else
    std::cout << std::setw(10) << "-";
  std::cout << std::setw(10) << std::setprecision(0) << r.rss << "\n" << std::flush;
}

struct BenchOptions {
  std::string model;
  std::string sizes = "256";
  std::string dtypes = "bf16";
  std::string components = "text,unet,taesd,vae,stream";
  int threads = 0;
  int iters = 3;
  int warmup = 1;
  int stream_frames = 10;
  std::string t_index_list = "35";
  std::string json_path;
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

bool want(const BenchOptions& o, const std::string& c) {
  auto v = split(o.components);
  return std::find(v.begin(), v.end(), c) != v.end();
}

int run_bench(const BenchOptions& o) {
  const int threads = sd::set_threads(o.threads);
  auto folder = sd::ModelFolder::open(o.model);
  std::vector<Row> rows;
  nlohmann::json loads = nlohmann::json::array();
  std::cout << "bench: " << o.model << ", " << threads << " threads, libtorch " << TORCH_VERSION << "\n";
  std::cout << std::left << std::setw(26) << "what" << std::setw(6) << "dtype" << std::right << std::setw(6) << "size"
            << std::setw(4) << "B" << std::setw(11) << "seconds" << std::setw(10) << "GFLOP/s" << std::setw(10)
            << "RSS MiB" << "\n";
  torch::NoGradGuard ng;
  for (const auto& dname : split(o.dtypes)) {
    const auto dtype = sd::parse_dtype(dname);
    auto load_note = [&](const std::string& what, double s, int64_t params) {
      std::cout << std::fixed << "  load " << what << " (" << dname << "): " << std::setprecision(2) << s << " s, " << params
                << " params, RSS " << std::setprecision(0) << rss_mib() << " MiB\n";
      loads.push_back({{"component", what}, {"dtype", dname}, {"seconds", s}, {"parameters", params},
                       {"rss_mib", rss_mib()}});
    };
    if (want(o, "text")) {
      auto t0 = Clock::now();
      auto tok = sd::ClipTokenizer::from_folder(folder.component_dir("tokenizer"));
      auto te = sd::load_clip_text_model(folder.component_dir("text_encoder"), dtype);
      const int64_t p = sd::count_parameters(*te);
      load_note("text_encoder", std::chrono::duration<double>(Clock::now() - t0).count(), p);
      auto ids = tok.encode_batch({"a photo of a cat, trending on artstation"});
      Row r{"text_encode", dname, 77, 1};
      r.seconds = time_median(o.warmup, o.iters, [&] { te->forward(ids); });
      const double gf = known_gflop("text_encode", p, 256);
      r.gflops = gf > 0 ? gf / r.seconds : 0;
      r.rss = rss_mib();
      print_row(r);
      rows.push_back(r);
    }
    for (const auto& sz : split(o.sizes)) {
      const int64_t size = std::stoll(sz);
      const int64_t h = size / 8;
      if (want(o, "unet")) {
        auto t0 = Clock::now();
        auto unet = sd::load_unet(folder.component_dir("unet"), dtype);
        const int64_t p = sd::count_parameters(*unet);
        load_note("unet", std::chrono::duration<double>(Clock::now() - t0).count(), p);
        const int64_t D = unet->config().cross_attention_dim[0];
        for (int64_t b : {1, 2}) {
          auto x = torch::randn({b, 4, h, h}).to(dtype);
          auto t = torch::full({b}, 999, torch::kLong);
          auto ehs = torch::randn({b, 77, D}).to(dtype);
          Row r{"unet", dname, size, b};
          r.seconds = time_median(o.warmup, o.iters, [&] { unet->forward(x, t, ehs); });
          const double gf = known_gflop("unet", p, size) * static_cast<double>(b);
          r.gflops = gf > 0 ? gf / r.seconds : 0;
          r.rss = rss_mib();
          print_row(r);
          rows.push_back(r);
        }
      }
      if (want(o, "taesd") && folder.taesd_dir()) {
        auto t0 = Clock::now();
        auto taesd = sd::load_taesd(*folder.taesd_dir(), dtype);
        load_note("taesd", std::chrono::duration<double>(Clock::now() - t0).count(), sd::count_parameters(*taesd));
        auto img = (torch::rand({1, 3, size, size}) * 2 - 1).to(dtype);
        auto z = torch::randn({1, 4, h, h}).to(dtype);
        Row re{"taesd_encode", dname, size, 1};
        re.seconds = time_median(o.warmup, o.iters, [&] { taesd->encode(img); });
        double gf = known_gflop("taesd_encode", sd::count_parameters(*taesd->encoder), size);
        re.gflops = gf > 0 ? gf / re.seconds : 0;
        re.rss = rss_mib();
        print_row(re);
        rows.push_back(re);
        Row rd{"taesd_decode", dname, size, 1};
        rd.seconds = time_median(o.warmup, o.iters, [&] { taesd->decode(z); });
        gf = known_gflop("taesd_decode", sd::count_parameters(*taesd->decoder), size);
        rd.gflops = gf > 0 ? gf / rd.seconds : 0;
        rd.rss = rss_mib();
        print_row(rd);
        rows.push_back(rd);
      }
      if (want(o, "vae")) {
        auto t0 = Clock::now();
        auto vae = sd::load_vae(folder.component_dir("vae"), dtype);
        const int64_t p = sd::count_parameters(*vae);
        load_note("vae", std::chrono::duration<double>(Clock::now() - t0).count(), p);
        auto z = torch::randn({1, 4, h, h}).to(dtype);
        Row rd{"vae_decode", dname, size, 1};
        rd.seconds = time_median(std::min(o.warmup, 1), std::max(1, o.iters / 2), [&] { vae->decode(z); });
        const double gf = known_gflop("vae_decode", p, size);
        rd.gflops = gf > 0 ? gf / rd.seconds : 0;
        rd.rss = rss_mib();
        print_row(rd);
        rows.push_back(rd);
      }
      if (want(o, "stream")) {
        sd::LoadOptions lo;
        lo.dtype = dtype;
        lo.threads = -1;
        auto t0 = Clock::now();
        auto models = sd::load_pipeline(o.model, lo);
        load_note("pipeline", std::chrono::duration<double>(Clock::now() - t0).count(), 0);
        for (const std::string mode : {"img2img", "txt2img"}) {
          sd::StreamConfig cfg;
          cfg.width = cfg.height = size;
          cfg.cfg_type = sd::CfgType::None;
          cfg.t_index_list.clear();
          for (const auto& s : split(o.t_index_list)) cfg.t_index_list.push_back(std::stoll(s));
          sd::StreamDiffusion stream(models, cfg);
          stream.prepare("a photo of a cat, trending on artstation");
          auto frame = (torch::rand({3, size, size}) * 2 - 1);
          auto step = [&] {
            if (mode == "img2img")
              stream.img2img(frame);
            else
              stream.txt2img();
          };
          Row r{"stream_" + mode + "_t" + std::to_string(cfg.t_index_list.size()), dname, size, 1};
          r.seconds = time_median(o.warmup + static_cast<int>(cfg.t_index_list.size()), o.stream_frames, step);
          r.rss = rss_mib();
          print_row(r);
          std::cout << "    -> " << std::setprecision(2) << 1.0 / r.seconds << " fps\n";
          rows.push_back(r);
        }
      }
    }
  }
  std::cout << "peak RSS " << std::setprecision(0) << peak_rss_mib() << " MiB\n";
  if (!o.json_path.empty()) {
    nlohmann::json j;
    j["model"] = o.model;
    j["threads"] = threads;
    j["loads"] = loads;
    j["peak_rss_mib"] = peak_rss_mib();
    for (const auto& r : rows)
      j["rows"].push_back({{"what", r.what}, {"dtype", r.dtype}, {"size", r.size}, {"batch", r.batch},
                           {"seconds", r.seconds}, {"gflops", r.gflops}, {"rss_mib", r.rss}});
    std::ofstream(o.json_path) << j.dump(2) << "\n";
  }
  return 0;
}

sd::cli::Runner setup_bench(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  app.add_option("--model", o->model, "diffusers model folder (e.g. from make-random-model)")->required();
  app.add_option("--sizes", o->sizes, "image sizes, comma-separated (square)")->capture_default_str();
  app.add_option("--dtypes", o->dtypes, "fp32,bf16,fp16")->capture_default_str();
  app.add_option("--components", o->components, "any of text,unet,taesd,vae,stream")->capture_default_str();
  app.add_option("--threads", o->threads, "intra-op threads (0 = all cores)")->capture_default_str();
  app.add_option("--iters", o->iters, "timed iterations per measurement (median)")->capture_default_str();
  app.add_option("--warmup", o->warmup, "untimed warm-up iterations")->capture_default_str();
  app.add_option("--stream-frames", o->stream_frames, "timed frames of the end-to-end stream")->capture_default_str();
  app.add_option("--t-index-list", o->t_index_list, "t_index_list of the end-to-end stream")->capture_default_str();
  app.add_option("--json", o->json_path, "write the results as JSON");
  return [o] { return run_bench(*o); };
}

REGISTER_COMMAND("bench", "time each component and the end-to-end stream on a model folder", 80, setup_bench);

}  // namespace
