// `streamdiffusion serve`: the resident server — the model loaded once, the browser app of web/ (live webcam /
// screen img2img and live txt2img over a WebSocket per client) and an HTTP API (txt2img, img2img, health, stats).
// See src/server/http_server.h for the routes and src/server/websocket_session.h for the WebSocket protocol.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <thread>
#include <tuple>

#include <ATen/Parallel.h>

#include "apps/cli/commands.h"
#include "apps/cli/controlnet_options.h"
#include "apps/cli/pipeline_options.h"
#include "core/error.h"
#include "core/log.h"
#include "pipeline/control_guidance.h"
#include "pipeline/controlnet.h"
#include "runtime/image_folder_source.h"
#include "runtime/signal_guard.h"
#include "server/http_server.h"

#ifndef SD_DEFAULT_WEB_ROOT
#define SD_DEFAULT_WEB_ROOT "web"
#endif

namespace {

struct ServeOptions {
  sd::cli::PipelineOptions p;
  sd::server::ServerOptions s;
  std::string mode = "img2img";
  std::string max_size;  // "" = twice the stream size per side
  int64_t max_ws_mib = 4, max_body_mib = 16;
  double drain_seconds = 10;
};

sd::cli::Runner setup_serve(CLI::App& app) {
  auto o = std::make_shared<ServeOptions>();
  o->s.web_root = SD_DEFAULT_WEB_ROOT;
  sd::cli::add_pipeline_options(app, o->p, sd::cli::PipelineMode::Either);
  sd::cli::add_ip_adapter_options(app, o->p);
  sd::cli::add_controlnet_options(app, o->p,
                                  "not for serve: each client sends its control images (its frames through the "
                                  "preprocessor, or the control_image setting)");
  // The shared help names the stream command's control channel; serve's live changes are per-client settings.
  app.get_option("--controlnet")
      ->description("ControlNet loaded once for every client: a diffusers folder or a single file "
                    "(control_*.safetensors), DIR|FILE or DIR|FILE:SCALE (a new client's scale, default 1); "
                    "repeatable, the residuals are summed. Per client: the 'controlnets' setting (page: scale slider)");
  app.get_option("--control-preprocessor")
      ->description("a new client's control image of each ControlNet: canny[:LOW:HIGH] | gray | passthrough | feedback "
                    "(its previous output); once for all or once per --controlnet (default canny). Per client: the "
                    "'controlnets' setting (page: preprocessor choice) or a static 'control_image'");
  app.get_option("--control-guidance-start")
      ->description("a new client's control_guidance_start of each ControlNet (diffusers'): step i of n of "
                    "t_index_list is conditioned unless i/n < START or (i+1)/n > END; once for all or once per "
                    "--controlnet (default 0). Per client: the 'controlnets' setting (page: steps from)");
  app.get_option("--control-guidance-end")
      ->description("a new client's control_guidance_end of each ControlNet; once for all or once per --controlnet "
                    "(default 1). Per client: the 'controlnets' setting (page: steps to)");
  app.get_option("--ip-adapter-scale")
      ->description("weight of the image prompt's attention (0 = off); server-wide, changed by the 'ip_adapter_scale' "
                    "setting");
  app.get_option("--image-prompt")->description("image file: every new client's IP-Adapter image prompt (each may set "
                                                "its own with the 'image_prompt' setting)");
  app.add_option("--host", o->s.host, "address to listen on (0.0.0.0 = every interface: think twice)")
      ->capture_default_str();
  app.add_option("--port", o->s.port, "TCP port (0 = any free port, printed at start)")->capture_default_str();
  CLI::Option* web_root = app.add_option("--web-root", o->s.web_root, "folder of the browser app")->capture_default_str();
  app.add_option("--mode", o->mode, "img2img | txt2img: the mode a new browser client starts in")
      ->capture_default_str();
  app.add_option("--max-streams", o->s.max_streams,
                 "concurrent WebSocket streams (each has its own stream state); more get a 'busy' message")
      ->capture_default_str();
  app.add_option("--max-size", o->max_size,
                 "WIDTHxHEIGHT: the largest output an API request may ask for with \"width\" / \"height\" "
                 "(default: twice the stream size per side, at most 4096)");
  app.add_option("--max-ws-message", o->max_ws_mib, "largest WebSocket message in MiB (a bigger one closes that client)")
      ->capture_default_str();
  app.add_option("--max-http-body", o->max_body_mib, "largest HTTP request body in MiB (413 beyond)")
      ->capture_default_str();
  app.add_option("--allow-origin", o->s.allow_origins,
                 "a page origin (e.g. https://example.org) allowed to open a WebSocket besides this server's own "
                 "localhost / IP address origins; '*' = any (repeatable)");
  app.add_option("--io-threads", o->s.io_threads, "network threads (they also code the JPEG frames)")
      ->capture_default_str();
  app.add_option("--max-api-pending", o->s.max_api_pending, "API images waiting for the model at once (503 beyond)")
      ->capture_default_str();
  app.add_option("--max-batch-streams", o->s.max_batch_streams,
                 "most clients whose pending frames run in ONE UNet call (their stream-batch rows concatenated; each "
                 "keeps its own timesteps, prompt, RCFG state and noise); 1 = one client per model step")
      ->capture_default_str()
      ->check(CLI::Range(1, 64));
  app.add_option("--send-queue", o->s.send_queue_frames,
                 "output frames queued per client; a slow client loses its oldest unsent frames")
      ->capture_default_str();
  app.add_option("--jpeg-quality", o->s.jpeg_quality, "quality of the output frames (1-100)")->capture_default_str();
  app.add_option("--worker-id", o->s.worker_id,
                 "this worker's name in a fleet: in each stream's hello and stats messages, /api/health, /api/ready "
                 "and /metrics (default HOST:PORT); up to 64 characters of [A-Za-z0-9_.:-]");
  app.add_option("--drain-seconds", o->drain_seconds,
                 "on SIGTERM or POST /api/drain (loopback only): refuse new streams, tell each client to reconnect "
                 "elsewhere, and exit when they have gone or after this many seconds (0 = SIGTERM stops at once)")
      ->capture_default_str();
  app.footer(
      "Open http://127.0.0.1:8000/ (with the default --host/--port) for the browser app. The API:\n"
      "  curl -s localhost:8000/api/health\n"
      "  curl -s -H 'Content-Type: application/json' -d '{\"prompt\":\"a cat\",\"seed\":3}' localhost:8000/api/txt2img "
      "-o cat.png\n"
      "  curl -s -H 'Content-Type: application/json' -d \"{\\\"prompt\\\":\\\"oil painting\\\",\\\"image\\\":\\\"$(base64 -w0 "
      "in.jpg)\\\"}\" localhost:8000/api/img2img -o out.png\n"
      "Stop with Ctrl-C (SIGINT): clients are told, the model step in progress finishes. SIGTERM drains first (see\n"
      "--drain-seconds; a fleet behind nginx: scripts/fleet.sh, docs/SCALING.md).");

  return [o, web_root] {
    sd::cli::apply_threads(o->p.common);
    if (o->mode != "img2img" && o->mode != "txt2img")
      throw sd::InvalidArgument("--mode '" + o->mode + "': expected img2img or txt2img");
    if (o->max_ws_mib < 1 || o->max_ws_mib > 256) throw sd::InvalidArgument("--max-ws-message must be in [1, 256] MiB");
    if (o->max_body_mib < 1 || o->max_body_mib > 1024)
      throw sd::InvalidArgument("--max-http-body must be in [1, 1024] MiB");
    if (o->s.jpeg_quality < 1 || o->s.jpeg_quality > 100) throw sd::InvalidArgument("--jpeg-quality must be in [1, 100]");
    if (!(o->drain_seconds >= 0 && o->drain_seconds <= 3600))
      throw sd::InvalidArgument("--drain-seconds must be in [0, 3600], got " + std::to_string(o->drain_seconds));
    if (o->s.worker_id.size() > 64 ||
        o->s.worker_id.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-") !=
            std::string::npos)
      throw sd::InvalidArgument("--worker-id '" + o->s.worker_id +
                                "': expected up to 64 characters of [A-Za-z0-9_.:-]");
    if (!o->p.control_input.empty())
      throw sd::InvalidArgument("--control-input is not a serve option: each client's control images come from its own "
                                "frames (--control-preprocessor) or its control_image setting");
    if (o->p.frame_buffer_size != 1)
      throw sd::InvalidArgument("serve: each client's stream takes one frame per call (--frame-buffer-size must be 1)");
    o->s.max_ws_message = static_cast<size_t>(o->max_ws_mib) << 20;
    o->s.max_http_body = static_cast<size_t>(o->max_body_mib) << 20;
    if (!o->s.web_root.empty() && !std::filesystem::is_directory(o->s.web_root)) {
      if (web_root->count() > 0) throw sd::InvalidArgument("--web-root '" + o->s.web_root + "': not a folder");
      // The built-in default (the source tree's web/) is gone, e.g. a copied binary: the API still works.
      sd::log::warn("no browser app at {} (give --web-root): serving the API only", o->s.web_root);
      o->s.web_root.clear();
    }

    sd::server::StreamDefaults d;
    const sd::ModelDefaults md = sd::read_model_defaults(o->p.model, o->p.config, o->p.prediction_type);
    d.img2img = sd::cli::stream_config(o->p, false, md);
    {
      // txt2img has its own default steps and cfg; the similarity filter is an img2img feature.
      sd::cli::PipelineOptions t = o->p;
      t.similarity_filter = 0;
      t.latent_feedback = 0;
      d.txt2img = sd::cli::stream_config(t, true, md);
    }
    if (o->max_size.empty()) {
      // Room for the sizes clients of other SD servers ask for (768 on a 512 model) without letting one request
      // hold the model thread for a 16x larger image.
      d.max_width = std::min<int64_t>(2 * d.img2img.width, 4096);
      d.max_height = std::min<int64_t>(2 * d.img2img.height, 4096);
    } else {
      std::tie(d.max_width, d.max_height) = sd::cli::parse_size(o->max_size, "--max-size");
    }
    if (d.max_width < d.img2img.width || d.max_height < d.img2img.height)
      throw sd::InvalidArgument("--max-size " + std::to_string(d.max_width) + "x" + std::to_string(d.max_height) +
                                " is smaller than the stream size " + std::to_string(d.img2img.width) + "x" +
                                std::to_string(d.img2img.height));
    d.native_width = md.native_width;
    d.native_height = md.native_height;
    d.prompt = o->p.prompt;
    d.negative_prompt = o->p.negative_prompt;
    if (!o->p.prompt_list.empty()) d.prompt_list = sd::parse_prompt_list(o->p.prompt_list);
    d.txt2img_mode = o->mode == "txt2img";
    d.start_index = o->p.start_index;

    const sd::cli::LoadedModels l = sd::cli::load_models(o->p);
    sd::log::info("loaded {} in {:.2f} s ({} threads)", l.models->describe(), l.load_s, at::get_num_threads());
    for (const auto& r : l.models->loras()) d.lora_names.push_back(r.name);
    // ControlNets: loaded once, shared by every client (each with its own scales, preprocessors and ranges). Clients
    // may switch to txt2img, so has_input_frames is true here and txt2img clients are told what they miss.
    const sd::cli::ControlNetSetup cn = sd::cli::load_controlnets(o->p, *l.models, true);
    d.controlnets = cn.units;
    for (const auto& p : cn.preprocessors) d.control_preprocessors.push_back(p->name());
    d.controlnet_every = o->p.controlnet_every;
    // A default range that tells two equal steps apart would refuse every client's frames: refused here.
    for (size_t i = 0; i < cn.units.size(); ++i)
      for (const auto* c : {&d.img2img, &d.txt2img}) {
        const std::string e = sd::control_guidance_split_error(
            cn.units[i].guidance_start, cn.units[i].guidance_end, c->t_index_list,
            "--controlnet " + std::to_string(i) + " (--control-guidance-start / --control-guidance-end)");
        if (!e.empty() && cn.units[i].scale != 0)
          throw sd::InvalidArgument((c == &d.img2img ? "img2img t_index_list " : "txt2img t_index_list ") + e);
      }
    for (size_t i = 0; i < cn.units.size(); ++i)
      sd::log::info("ControlNet {}: {} (scale {}, preprocessor {}, guidance {}..{})", i, cn.units[i].net->name(),
                    cn.units[i].scale, d.control_preprocessors[i], cn.units[i].guidance_start,
                    cn.units[i].guidance_end);
    d.ip_adapter = l.models->ip_adapter() != nullptr;
    if (!o->p.image_prompt.empty()) {
      // The image prompt of every new client (each may replace it with its own image_prompt setting).
      const torch::Tensor t = sd::read_rgb_image(o->p.image_prompt).contiguous();
      d.image_prompt = cv::Mat(static_cast<int>(t.size(0)), static_cast<int>(t.size(1)), CV_8UC3);
      std::memcpy(d.image_prompt.data, t.data_ptr<uint8_t>(), static_cast<size_t>(t.numel()));
    }

    sd::SignalGuard signals;  // SIGINT / SIGTERM: clean shutdown (a second one: at once)
    sd::server::Server server(l.models, d, o->s);
    server.start();
    const std::string host = o->s.host.find(':') != std::string::npos ? "[" + o->s.host + "]" : o->s.host;
    std::printf("listening on http://%s:%u/\n", host.c_str(), static_cast<unsigned>(server.port()));
    std::fflush(stdout);
    sd::log::info("serving {} on http://{}:{}/ ({} stream slots, {}x{}, up to {} streams per UNet call)",
                  o->s.web_root, host, server.port(), o->s.max_streams, d.img2img.width, d.img2img.height,
                  o->s.max_batch_streams);
    while (sd::SignalGuard::pending() == 0 && !server.draining())
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    const int sig = sd::SignalGuard::pending();
    if (sig != SIGINT && o->drain_seconds > 0) {
      // SIGTERM (a rolling restart, Kubernetes' preStop) or POST /api/drain: clients move to other workers first.
      sd::log::info("{}: draining for up to {} s", sig ? sd::SignalGuard::name(sig) : "POST /api/drain",
                    o->drain_seconds);
      if (sig) sd::SignalGuard::clear();  // a second signal during the drain stops at once
      server.drain_and_stop(o->drain_seconds, [] { return sd::SignalGuard::pending() != 0; });
    } else {
      sd::log::info("{}: shutting down", sig ? sd::SignalGuard::name(sig) : "drain");
    }
    server.stop();
    const auto s = server.stats();
    sd::log::info("served {} streams, {} model steps ({} shared UNet calls for {} stream calls), {} HTTP requests",
                  s["streams_total"].get<int64_t>(), s["worker"]["steps"].get<int64_t>(),
                  s["worker"]["batched_calls"].get<int64_t>(), s["worker"]["batched_streams"].get<int64_t>(),
                  s["http_requests"].get<int64_t>());
    return 0;
  };
}

REGISTER_COMMAND("serve",
                 "resident server: browser app (live webcam / screen img2img, live txt2img) and HTTP API on one "
                 "loaded model",
                 13, setup_serve);

}  // namespace
