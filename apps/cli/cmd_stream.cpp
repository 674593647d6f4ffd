// `streamdiffusion stream`: real-time StreamDiffusion on a frame stream — video file, image folder, camera, screen or
// raw stdin in; window, video file, image folder or raw stdout out; the prompt and the other pipeline settings
// changeable while it runs. See src/runtime/stream_runtime.h for the threads, queues and modes.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>

#include <ATen/Parallel.h>
#include <fcntl.h>
#include <unistd.h>

#include "apps/cli/commands.h"
#include "apps/cli/controlnet_options.h"
#include "apps/cli/pipeline_options.h"
#include "core/device.h"
#include "core/error.h"
#include "core/log.h"
#include "pipeline/controlnet.h"
#include "runtime/control_channel.h"
#include "runtime/frame_sink.h"
#include "runtime/frame_source.h"
#include "runtime/image_folder_source.h"
#include "runtime/signal_guard.h"
#include "runtime/stream_diffusion_processor.h"
#include "runtime/stream_runtime.h"

namespace {

struct StreamCliOptions {
  sd::cli::PipelineOptions p;
  std::string input, output = "window";
  std::string input_size;
  double input_fps = 0;
  bool loop = false, realtime = false, sync = false;
  std::string mode = "auto", resize = "crop";
  int64_t frames = 0;
  double output_fps = 0;
  std::string fourcc;
  std::vector<std::string> control{"auto"};
  std::vector<std::string> at;
  std::string stats_json;
  double status_interval = 1.0;
  int queue = 4;
  int64_t warmup_outputs = 100;
  double watchdog = 10.0;
  bool fixed_threads = false;
  std::string image_prompt_input;  // --image-prompt-input SRC
  int64_t image_prompt_every = 1;
  double image_prompt_change = 1.0;
};

// "N:COMMAND" -> applied before input frame N.
sd::ScheduledCommand parse_at(const std::string& s) {
  const auto colon = s.find(':');
  if (colon == std::string::npos || colon == 0)
    throw sd::InvalidArgument("--at '" + s + "': expected FRAME:COMMAND, e.g. '100:prompt a cat'");
  sd::ScheduledCommand sc;
  try {
    size_t pos = 0;
    sc.frame = std::stoll(s.substr(0, colon), &pos);
    if (pos != colon || sc.frame < 0) throw std::invalid_argument(s);
  } catch (const std::exception&) {
    throw sd::InvalidArgument("--at '" + s + "': the frame number must be an integer >= 0");
  }
  auto c = sd::parse_control_command(s.substr(colon + 1));
  if (!c) throw sd::InvalidArgument("--at '" + s + "': no command after the colon");
  if (c->kind == sd::ControlCommand::Kind::Stats || c->kind == sd::ControlCommand::Kind::Help)
    throw sd::InvalidArgument("--at '" + s + "': only pipeline commands and quit can be scheduled");
  sc.command = *c;
  return sc;
}

// stdin as a control channel only when it is not the frame source and reading it cannot stop the process (a
// background job reading its terminal gets SIGTTIN).
bool stdin_usable_for_control(const std::string& input) {
  if (input == "-" || input == "stdin") return false;
  if (fcntl(STDIN_FILENO, F_GETFD) == -1) return false;  // closed (<&-): `--control stdin` says so, auto skips it
  if (isatty(STDIN_FILENO)) return tcgetpgrp(STDIN_FILENO) == getpgrp();
  return true;
}

sd::cli::Runner setup_stream(CLI::App& app) {
  auto o = std::make_shared<StreamCliOptions>();
  sd::cli::add_pipeline_options(app, o->p, sd::cli::PipelineMode::Either);
  sd::cli::add_ip_adapter_options(app, o->p);
  sd::cli::add_controlnet_options(
      app, o->p,
      "second source for the control images (video file | image folder | camera[:N] | screen[:x,y,w,h]), one frame "
      "read with each input frame; when it ends the stream ends (default preprocessor: passthrough)");
  app.add_option("--image-prompt-input", o->image_prompt_input,
                 "second source of IP-Adapter image prompts (video file | image folder | camera[:N] | "
                 "screen[:x,y,w,h]): one frame read every --image-prompt-every input frames, encoded only when it "
                 "changed; when it ends the last image stays (needs --ip-adapter)");
  app.add_option("--image-prompt-every", o->image_prompt_every,
                 "read the --image-prompt-input every N input frames")
      ->check(sd::cli::at_least(1))
      ->capture_default_str();
  app.add_option("--image-prompt-change", o->image_prompt_change,
                 "mean absolute difference (uint8 levels) above which an image prompt from --image-prompt-input "
                 "counts as new and is encoded again")
      ->check(sd::cli::at_least(0))
      ->capture_default_str();
  app.add_option("-i,--input", o->input,
                 "video file | image folder | camera[:N] | screen[:x,y,w,h] | - (raw rgb24 on stdin) | none "
                 "(txt2img: a continuous stream of generated frames)")
      ->required();
  app.add_option("-o,--output", o->output,
                 "window | video file (.mp4 .avi .mkv .mov .webm) | image folder or pattern (out/%05d.png) | - (raw "
                 "rgb24 on stdout) | none")
      ->capture_default_str();
  app.add_option("--input-size", o->input_size, "WIDTHxHEIGHT of raw stdin frames; requested camera size");
  app.add_option("--input-fps", o->input_fps,
                 "frame rate of --input none (0 = as fast as the model), of screen capture (default 30), of "
                 "--realtime files")
      ->check(sd::cli::at_least(0));
  app.add_flag("--loop", o->loop, "start a video file / image folder over at its end");
  app.add_flag("--realtime", o->realtime, "deliver file frames at their native rate (a live source: stale frames dropped)");
  app.add_option("--mode", o->mode,
                 "auto | live | lossless. live: latest frame wins, stale frames are dropped and counted; lossless: "
                 "one output per input, in order. auto: live for camera/screen/--realtime, else lossless")
      ->capture_default_str();
  app.add_flag("--sync", o->sync, "run every stage on one thread, no queues (the bare loop, for comparisons)");
  app.add_option("--resize", o->resize, "crop (centre-crop to the aspect ratio, then resize) | stretch")
      ->capture_default_str();
  app.add_option("--frames", o->frames, "stop after this many input frames (0 = until the input ends)")
      ->check(sd::cli::at_least(0));
  app.add_option("--output-fps", o->output_fps, "frame rate written to a video file (default: the input's, else 30)")
      ->check(sd::cli::at_least(0));
  app.add_option("--fourcc", o->fourcc, "video codec override (MJPG, avc1, mp4v, VP80, ...)");
  app.add_option("--control", o->control,
                 "control channel(s): auto (stdin unless it carries frames) | stdin | none | fifo:PATH | unix:PATH | "
                 "osc://HOST:PORT[?reply=osc://HOST:PORT|sender] (OSC over UDP: /prompt s, /guidance f, ... = the "
                 "control commands; last value wins) (repeatable)")
      ->capture_default_str();
  app.add_option("--at", o->at, "FRAME:COMMAND, a control command applied before input frame FRAME (repeatable)");
  app.add_option("--stats-json", o->stats_json, "write a JSON summary here at exit (fps, latency, drops, RSS, ...)");
  app.add_option("--status-interval", o->status_interval, "seconds between status lines on stderr (0 = none)")
      ->capture_default_str();
  app.add_option("--queue", o->queue, "capacity of each lossless queue")
      ->check(sd::cli::at_least(1))
      ->capture_default_str();
  app.add_option("--warmup-outputs", o->warmup_outputs, "outputs after which RSS counts as 'after warm-up'")
      ->capture_default_str();
  app.add_flag("--fixed-threads", o->fixed_threads,
               "keep --threads intra-op threads when other processes contend for the CPU (default: the model thread "
               "drops to 1 thread while its run-queue wait is high - no barrier stalls - and goes back when it clears)");
  app.add_option("--watchdog", o->watchdog,
                 "log any frame a stage spends more than this many times its median on (and over 100 ms), with the "
                 "stage, while it is still there (0 = off; the timings stay in --stats-json)")
      ->check(CLI::Validator(
          [](std::string& text) -> std::string {
            const double v = std::strtod(text.c_str(), nullptr);  // not a number: the number check says so
            return v == 0 || v >= 1 ? "" : "expected 0 (off) or a factor >= 1, got " + text;
          },
          "0 or >= 1"))
      ->capture_default_str();
  app.footer(
      "Control commands (one per line): prompt <text> | negative <text> | guidance <g> | delta <d> | "
      "t_index_list <i,j,..> | seed <n> | filter on|off | filter_threshold <x> | lora <name> <s> | "
      "ip_adapter_scale <s> | image_prompt <file>|none | controlnet_scale <i> <s> | control_preprocessor <i> <name> | "
      "deep_cache <k> [<s>] | "
      "stats | quit.\n"
      "Lossless mode: the stream's n-1 frames of latency are absorbed (warm-up outputs dropped, the last input "
      "repeated at the end), so output frame i is the result for input frame i.\n"
      "Examples:\n"
      "  streamdiffusion stream --model M --input in.mp4 --output out.mp4 --prompt 'oil painting'\n"
      "  streamdiffusion stream --model M --input camera:0 --output window --prompt 'anime' --control unix:/tmp/sd\n"
      "  streamdiffusion stream --config live.yaml --control osc://127.0.0.1:9000   (then: oscsend localhost 9000 "
      "/prompt s 'a fox')\n"
      "  ffmpeg -i in.mp4 -f rawvideo -pix_fmt rgb24 -s 512x512 - | streamdiffusion stream --model M --input - "
      "--input-size 512x512 --output - | ffplay -f rawvideo -pixel_format rgb24 -video_size 512x512 -\n"
      "  streamdiffusion stream --model M --input none --output window --prompt 'a cat' --t-index-list 0 "
      "--cfg-type none\n"
      "  streamdiffusion stream --model M --controlnet control_v11p_sd15_canny --control-preprocessor canny "
      "--input camera:0 --output window --prompt 'a marble statue'");

  return [o] {
    // Logs (main.cpp's default logger) and status lines go to stderr: stdout may carry raw frames.
    sd::cli::apply_threads(o->p.common);

    // Everything that can be refused is checked before the model loads.
    if (!o->stats_json.empty()) {
      const std::string dir = std::filesystem::path(o->stats_json).parent_path().string();
      const std::string folder = dir.empty() ? "." : dir;
      if (!std::filesystem::is_directory(folder) || ::access(folder.c_str(), W_OK) != 0)
        throw sd::InvalidArgument("--stats-json " + o->stats_json + ": the folder '" + folder +
                                  "' does not exist or is not writable");
    }
    sd::SourceOptions so;
    if (!o->input_size.empty()) {
      const auto [w, h] = sd::cli::parse_size(o->input_size, "--input-size", /*model_size=*/false);
      so.width = w;
      so.height = h;
    }
    so.fps = o->input_fps;
    so.loop = o->loop;
    so.realtime = o->realtime;
    sd::StreamOptions ro;
    ro.mode = sd::parse_stream_mode(o->mode);
    ro.resize = sd::parse_resize_mode(o->resize);
    ro.synchronous = o->sync;
    ro.max_frames = o->frames;
    sd::check_status_interval(o->status_interval);
    ro.status_interval_s = o->status_interval;
    ro.queue_capacity = static_cast<size_t>(o->queue);
    ro.warmup_outputs = o->warmup_outputs;
    ro.watchdog_factor = o->watchdog;
    ro.adaptive_threads = !o->fixed_threads;
    for (const auto& a : o->at) ro.scheduled.push_back(parse_at(a));
    std::vector<std::string> controls;
    for (const auto& c : o->control) {
      if (c == "none") continue;
      if (c == "auto") {
        if (stdin_usable_for_control(o->input)) controls.push_back("stdin");
        continue;
      }
      if ((c == "stdin" || c == "-") && (o->input == "-" || o->input == "stdin"))
        throw sd::InvalidArgument("--control stdin: stdin carries the frames (--input -); use fifo:PATH or unix:PATH");
      controls.push_back(c);
    }

    auto source = sd::open_source(o->input, so);
    const bool txt2img = !source->has_images();
    std::unique_ptr<sd::FrameSource> control_source;
    if (!o->p.control_input.empty()) {
      if (o->p.controlnets.empty()) throw sd::InvalidArgument("--control-input needs --controlnet");
      if (o->p.control_input == "-" || o->p.control_input == "stdin")
        throw sd::InvalidArgument("--control-input cannot read stdin (raw frames are the --input's only); give a "
                                  "video, an image folder, camera[:N] or screen");
      sd::SourceOptions cso = so;
      cso.width = cso.height = 0;  // raw frames are stdin only
      control_source = sd::open_source(o->p.control_input, cso);
      if (!control_source->has_images())
        throw sd::InvalidArgument("--control-input " + o->p.control_input + " gives no images");
    }
    std::unique_ptr<sd::FrameSource> image_prompt_source;
    if (!o->image_prompt_input.empty()) {
      if (o->p.ip_adapter.empty()) throw sd::InvalidArgument("--image-prompt-input needs an IP-Adapter (--ip-adapter DIR)");
      if (o->image_prompt_input == "-" || o->image_prompt_input == "stdin")
        throw sd::InvalidArgument("--image-prompt-input cannot read stdin (raw frames are the --input's only); give "
                                  "a video, an image folder, camera[:N] or screen");
      sd::SourceOptions iso = so;
      iso.width = iso.height = 0;  // raw frames are stdin only
      image_prompt_source = sd::open_source(o->image_prompt_input, iso);
      if (!image_prompt_source->has_images())
        throw sd::InvalidArgument("--image-prompt-input " + o->image_prompt_input + " gives no images");
    }
    sd::SinkOptions sk;
    sk.fps = o->output_fps > 0 ? o->output_fps : (source->fps() > 0 ? source->fps() : 30.0);
    sk.fourcc = o->fourcc;
    auto sink = sd::open_sink(o->output, sk);
    const sd::StreamConfig cfg = sd::cli::stream_config(o->p, txt2img);

    const sd::cli::LoadedModels l = sd::cli::load_models(o->p);
    sd::log::info("loaded {} in {:.2f} s ({} threads)", l.models->describe(), l.load_s, at::get_num_threads());
    auto stream = std::make_shared<sd::StreamDiffusion>(l.models, cfg);
    torch::Tensor initial_image_prompt;
    if (!o->p.image_prompt.empty()) {
      initial_image_prompt = sd::read_rgb_image(o->p.image_prompt);
      stream->set_image_prompt(initial_image_prompt);
    }
    const sd::cli::ControlNetSetup controlnets = sd::cli::load_controlnets(o->p, *l.models, !txt2img);
    if (!controlnets.units.empty()) {
      stream->set_controlnets(controlnets.units);
      stream->set_controlnet_every(o->p.controlnet_every);
      for (size_t i = 0; i < controlnets.units.size(); ++i)
        sd::log::info("controlnet {}: {} scale {} preprocessor {}, guidance {}..{}", i,
                      controlnets.units[i].net->describe(), controlnets.units[i].scale,
                      controlnets.preprocessors[i]->name(), controlnets.units[i].guidance_start,
                      controlnets.units[i].guidance_end);
    }
    stream->prepare(sd::cli::prompt_list_from(o->p), o->p.negative_prompt);
    auto processor = std::make_shared<sd::StreamDiffusionProcessor>(stream, o->p.prompt, o->p.negative_prompt, txt2img);
    if (!controlnets.units.empty())
      processor->set_control_preprocessors(controlnets.preprocessors, control_source != nullptr);
    processor->set_image_prompt_change(o->image_prompt_change);
    if (initial_image_prompt.defined()) processor->set_current_image_prompt(initial_image_prompt);

    sd::SignalGuard signals;  // from here on, Ctrl-C stops the stream cleanly (twice: at once)
    sd::StreamRuntime runtime(std::move(source), processor, std::move(sink), ro);
    if (control_source) runtime.set_control_source(std::move(control_source));
    if (image_prompt_source) runtime.set_image_prompt_source(std::move(image_prompt_source), o->image_prompt_every);
    std::vector<std::unique_ptr<sd::ControlChannel>> channels;
    for (const auto& c : controls) {
      const bool coalesce = sd::ControlChannel::last_value_wins(c);  // OSC: faders stream values
      channels.push_back(std::make_unique<sd::ControlChannel>(
          c, [&runtime, coalesce](sd::ControlCommand cmd, sd::ControlChannel::Reply reply) {
            runtime.post_control(std::move(cmd), std::move(reply), coalesce);
          }));
      sd::log::info("control: {} ({})", channels.back()->describe(), sd::control_help());
    }

    std::string error;
    try {
      runtime.run();
    } catch (const std::exception& e) {
      error = e.what();
    }
    nlohmann::json channel_stats = nlohmann::json::array();
    for (const auto& c : channels) channel_stats.push_back(c->stats());
    channels.clear();

    nlohmann::json summary = runtime.summary();
    summary["control_channels"] = channel_stats;
    const sd::StreamStats& ps = stream->stats();
    const auto per_call_ms = [](double s, int64_t n) { return n > 0 ? 1000.0 * s / static_cast<double>(n) : 0.0; };
    summary["pipeline"] = {{"calls", ps.calls},
                           {"processed", ps.processed},
                           {"skipped", ps.skipped},
                           {"unet_ms_per_call", per_call_ms(ps.unet_s, ps.unet_calls)},
                           {"image_encode_ms_per_call", per_call_ms(ps.image_encode_s, ps.processed)},
                           {"decode_ms_per_call", per_call_ms(ps.decode_s, ps.processed)},
                           {"call_ms_mean", per_call_ms(ps.total_s, ps.processed)},
                           {"controlnets", stream->controlnets().size()},
                           {"controlnet_calls", ps.controlnet_calls},
                           {"controlnet_reused", ps.controlnet_reused},
                           {"controlnet_ms_per_call", per_call_ms(ps.controlnet_s, ps.unet_calls)},
                           {"unet_shallow_calls", ps.unet_shallow_calls},
                           {"deep_cache_forced", ps.deep_cache_forced},
                           {"image_prompt_encodes", ps.image_prompt_encodes},
                           {"image_prompts_unchanged", processor->image_prompts_unchanged()},
                           {"image_prompt_ms_per_encode", per_call_ms(ps.image_prompt_s, ps.image_prompt_encodes)}};
    summary["config"] = {{"model", o->p.model},
                         {"input", o->input},
                         {"output", o->output},
                         {"txt2img", txt2img},
                         {"width", cfg.width},
                         {"height", cfg.height},
                         {"t_index_list", stream->config().t_index_list},
                         {"cfg_type", sd::cfg_type_name(cfg.cfg_type)},
                         {"frame_buffer_size", cfg.frame_buffer_size},
                         {"dtype", sd::dtype_name(l.models->dtype())},  // what "auto" resolved to
                         {"threads", at::get_num_threads()},
                         {"synchronous", o->sync},
                         {"load_s", l.load_s}};
    // --compiled-unet: did the package run the stream's UNet calls?
    if (const auto c = l.models->compiled_unet_stats(); !c.path.empty())
      summary["compiled_unet"] = {
          {"file", c.path}, {"calls", c.calls}, {"fallbacks", c.fallbacks}, {"last_fallback", c.last_fallback}};
    const auto& lat = summary["latency_ms"];
    const int64_t discarded = summary["discarded_at_stop"].get<int64_t>();
    const int64_t in_flight = summary["in_flight_at_stop"].get<int64_t>();
    // Every frame in is accounted for: out, dropped, or lost to the stop (only then are those two shown).
    const std::string lost = discarded + in_flight > 0 ? ", " + std::to_string(discarded) + " discarded and " +
                                                             std::to_string(in_flight) + " in flight at stop"
                                                       : std::string();
    std::fprintf(stderr,
                 "[stream] %s: %lld in, %lld out, %lld dropped%s, %lld skipped in %.1f s | out %.2f fps (steady %.2f) "
                 "| latency p50 %.1f ms p95 %.1f ms\n",
                 summary["stop_reason"].get<std::string>().c_str(),
                 static_cast<long long>(summary["frames_in"].get<int64_t>()),
                 static_cast<long long>(summary["frames_out"].get<int64_t>()),
                 static_cast<long long>(summary["dropped"].get<int64_t>()), lost.c_str(),
                 static_cast<long long>(summary["skipped"].get<int64_t>()), summary["duration_s"].get<double>(),
                 summary["output_fps"].get<double>(), summary["output_fps_steady"].get<double>(),
                 lat["p50"].get<double>(), lat["p95"].get<double>());
    const auto& wd = summary["watchdog"];
    std::fprintf(stderr, "[stream] watchdog: %lld slow frames, longest gap between outputs %.0f ms\n",
                 static_cast<long long>(wd["slow_frames"].get<int64_t>()), wd["max_output_gap_ms"].get<double>());
    if (const auto c = l.models->compiled_unet_stats(); !c.path.empty()) {
      std::fprintf(stderr, "[stream] compiled UNet: %lld calls, %lld by the model's own UNet%s%s%s\n",
                   static_cast<long long>(c.calls), static_cast<long long>(c.fallbacks),
                   c.fallbacks ? " (last: " : "", c.last_fallback.c_str(), c.fallbacks ? ")" : "");
    }
    if (const auto& g = summary["thread_governor"]; g.is_object() && g["active"].get<bool>())
      std::fprintf(stderr, "[stream] threads: %d of %d now; cut to 1 thread %lld times under CPU contention (%lld of "
                   "%lld model frames)\n", g["threads"].get<int>(), g["max_threads"].get<int>(),
                   static_cast<long long>(g["reductions"].get<int64_t>()),
                   static_cast<long long>(g["frames_reduced"].get<int64_t>()),
                   static_cast<long long>(g["frames"].get<int64_t>()));
    // Last: a file that cannot be written after all still leaves the summary above.
    if (!o->stats_json.empty()) {
      std::ofstream f(o->stats_json);
      if (!f) throw sd::FormatError(o->stats_json, "cannot write the stats summary");
      f << summary.dump(2) << "\n";
    }
    if (!error.empty()) throw sd::Error(error);
    const int sig = sd::SignalGuard::pending();
    return sig != 0 ? 128 + sig : 0;
  };
}

REGISTER_COMMAND("stream",
                 "real-time stream: video / camera / screen / raw frames / none (txt2img) in, window / video / images / "
                 "raw frames out, live control",
                 12, setup_stream);

}  // namespace
