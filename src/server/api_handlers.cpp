#include "server/api_handlers.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>

#include <torch/torch.h>

#include "core/error.h"
#include "models/ip_adapter.h"
#include "pipeline/image.h"
#include "runtime/control_preprocessor.h"
#include "server/api_request.h"
#include "server/image_codec.h"

namespace sd::server {

ApiResponse ApiResponse::json(unsigned status, const nlohmann::json& j) {
  ApiResponse r;
  r.status = status;
  // replace: an error text may quote raw request bytes (a bad target, JSON with invalid UTF-8); a strict dump would
  // throw out of the network handler and terminate the server.
  r.body = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return r;
}

ApiResponse ApiResponse::error(unsigned status, const std::string& message) {
  return json(status, {{"error", message}});
}

namespace {

// One API image as a unit of model work.
class ApiJob : public ModelTask {
 public:
  explicit ApiJob(std::function<void()> fn) : fn_(std::move(fn)) {}
  void run_model_step() override { fn_(); }

 private:
  std::function<void()> fn_;
};

std::string path_of(const std::string& target) { return target.substr(0, target.find('?')); }

// Everything of a stream config an API stream is built with, but the seed (set per request without a rebuild).
bool same_but_seed(const StreamConfig& a, const StreamConfig& b) {
  return a.t_index_list == b.t_index_list && a.num_inference_steps == b.num_inference_steps &&
         a.cfg_type == b.cfg_type && a.guidance_scale == b.guidance_scale && a.delta == b.delta &&
         a.frame_buffer_size == b.frame_buffer_size && a.use_denoising_batch == b.use_denoising_batch &&
         a.do_add_noise == b.do_add_noise && a.width == b.width && a.height == b.height &&
         a.similarity_filter.enabled == b.similarity_filter.enabled &&
         a.original_frame_layout == b.original_frame_layout && a.deep_cache_every == b.deep_cache_every &&
         a.deep_cache_min_similarity == b.deep_cache_min_similarity && a.prompt_blend == b.prompt_blend &&
         a.latent_feedback == b.latent_feedback && a.transition == b.transition;
}

}  // namespace

StreamDiffusion& ApiHandlers::stream_for(const StreamConfig& cfg, bool txt2img) {
  // Model thread only. prepare() (after set_seed) draws the state from the seed again and ControlNets, control
  // images and the image prompt are set per request, so a kept stream gives what a fresh one would.
  const CachedStream::Key key{txt2img, cfg.width, cfg.height};
  auto it = std::find_if(streams_.begin(), streams_.end(), [&](const CachedStream& c) { return c.key == key; });
  if (it != streams_.end() && same_but_seed(it->stream->config(), cfg)) {
    streams_reused_.fetch_add(1);
    streams_.splice(streams_.begin(), streams_, it);  // most recently used first
    if (cfg.seed_list.empty())
      streams_.front().stream->set_seed(cfg.seed);
    else
      streams_.front().stream->set_seed_list(cfg.seed_list);
    return *streams_.front().stream;
  }
  if (it != streams_.end()) streams_.erase(it);  // same size, other settings: replaced
  streams_.push_front(CachedStream{key, std::make_unique<StreamDiffusion>(models_, cfg)});
  while (streams_.size() > kMaxCachedStreams) streams_.pop_back();
  streams_built_.fetch_add(1);
  streams_cached_.store(static_cast<int64_t>(streams_.size()));
  return *streams_.front().stream;
}

ApiHandlers::ApiHandlers(std::shared_ptr<const DiffusionModels> models, StreamDefaults defaults, ModelWorker& worker,
                         int max_pending, std::function<nlohmann::json()> server_stats)
    : models_(std::move(models)),
      defaults_(std::move(defaults)),
      worker_(worker),
      max_pending_(max_pending),
      server_stats_(std::move(server_stats)) {}

bool ApiHandlers::is_api(const std::string& target) { return target.rfind("/api/", 0) == 0 || target == "/api"; }

nlohmann::json ApiHandlers::stats() const {
  nlohmann::json j = {{"requests", requests_.load()},
          {"images", images_.load()},
          {"pending", pending_->load()},
          {"max_pending", max_pending_},
          {"rejected_busy", rejected_busy_.load()},
          {"errors", errors_.load()},
          {"cancelled", cancelled_.load()},
          {"streams_built", streams_built_.load()},
          {"streams_reused", streams_reused_.load()},
          {"streams_cached", streams_cached_.load()}};
  graphs_.put(j);
  return j;
}

ApiHandlers::Cancel ApiHandlers::handle(const ApiRequest& req, Done done) {
  requests_.fetch_add(1);
  if (auto r = answer_before_body(req, true)) {
    done(std::move(*r));
    return {};
  }
  return generate(path_of(req.target) == "/api/txt2img", req, std::move(done));
}

std::optional<ApiResponse> ApiHandlers::refusal_before_body(const ApiRequest& req) {
  const std::string path = path_of(req.target);
  const bool get = req.method == "GET" || req.method == "HEAD";
  if ((path == "/api/health" || path == "/api/stats") && get) return std::nullopt;  // an answer, given after the body
  auto r = answer_before_body(req, false);
  if (r) requests_.fetch_add(1);  // handle() never sees this request
  return r;
}

std::optional<ApiResponse> ApiHandlers::answer_before_body(const ApiRequest& req, bool take_slot) {
  const std::string path = path_of(req.target);
  const bool get = req.method == "GET" || req.method == "HEAD";
  if (path == "/api/health") {
    if (!get) return ApiResponse::error(405, "use GET for " + path);
    nlohmann::json h = {{"status", "ok"},
                        {"model", models_->describe()},
                        {"width", defaults_.img2img.width},
                        {"height", defaults_.img2img.height},
                        {"max_width", defaults_.max_width > 0 ? defaults_.max_width : defaults_.img2img.width},
                        {"max_height", defaults_.max_height > 0 ? defaults_.max_height : defaults_.img2img.height},
                        {"size_multiple", size_step()}};
    if (server_stats_) {
      const auto s = server_stats_();
      h["streams"] = s.value("streams", 0);
      h["max_streams"] = s.value("max_streams", 0);
      h["worker_id"] = s.value("worker_id", "");
      h["draining"] = s.value("draining", false);
    }
    return ApiResponse::json(200, h);
  }
  if (path == "/api/stats") {
    if (!get) return ApiResponse::error(405, "use GET for " + path);
    nlohmann::json s = server_stats_ ? server_stats_() : nlohmann::json::object();
    s["api"] = stats();
    return ApiResponse::json(200, s);
  }
  if (path == "/api/txt2img" || path == "/api/img2img") {
    if (req.method != "POST") return ApiResponse::error(405, "use POST with a JSON body for " + path);
    if (req.content_type.rfind("application/json", 0) != 0) {
      errors_.fetch_add(1);
      return ApiResponse::error(415, path.substr(5) + ": expected Content-Type: application/json, got '" +
                                         req.content_type + "'");
    }
    // The slot first: a busy server answers before it spends a network thread on decoding the body's images. Without
    // `take_slot` it is only looked at: a slot taken now would be held for as long as the body takes to arrive.
    const bool busy = take_slot ? pending_->fetch_add(1) >= max_pending_ : pending_->load() >= max_pending_;
    if (!busy) return std::nullopt;
    if (take_slot) pending_->fetch_sub(1);
    rejected_busy_.fetch_add(1);
    return ApiResponse::json(503, {{"error", "busy"},
                                   {"message", "the server has " + std::to_string(max_pending_) +
                                                   " API requests waiting already; try again shortly"}});
  }
  errors_.fetch_add(1);
  return ApiResponse::error(404, "no API endpoint " + path +
                                     " (expected /api/health, /api/ready, /api/stats, /api/txt2img, /api/img2img, "
                                     "or POST /api/drain)");
}

ApiHandlers::Cancel ApiHandlers::generate(bool txt2img, const ApiRequest& req, Done done) {
  const std::string what = txt2img ? "txt2img" : "img2img";
  ApiBody parsed;
  try {
    parsed = parse_api_body(txt2img, req.body, defaults_, size_step());
  } catch (const std::exception& e) {  // sd::Error mostly; anything else must not escape into the network thread
    pending_->fetch_sub(1);
    errors_.fetch_add(1);
    done(ApiResponse::error(400, what + ": " + e.what()));
    return {};
  }
  const StreamDefaults& defaults = parsed.defaults;
  const StreamSettings& settings = parsed.settings;
  const cv::Mat& image = parsed.image;
  const std::vector<torch::Tensor>& control = parsed.control;
  auto pending = pending_;
  auto models = models_;
  auto job = std::make_shared<ApiJob>([this, pending, models, defaults, settings, image, control,
                                        txt2img, done]() {
    struct Release {
      std::shared_ptr<std::atomic<int>> p;
      ~Release() { p->fetch_sub(1); }
    } release{pending};
    try {
      torch::NoGradGuard no_grad;
      // Server-wide; unchanged scales are not re-fused (a re-fuse blocks the model worker for seconds).
      for (const auto& [name, scale] : settings.lora) {
        bool same = false;
        for (const auto& r : models->loras())
          if (r.name == name) same = r.scale == scale;
        if (!same) models->set_lora_scale(name, scale);
      }
      if (settings.ip_adapter_scale && models->ip_adapter() &&
          models->ip_adapter()->adapter->scale() != *settings.ip_adapter_scale)
        models->set_ip_adapter_scale(*settings.ip_adapter_scale);
      StreamConfig cfg = settings.config(defaults);
      cfg.use_denoising_batch = false;  // all steps in one call: the first output is the final image
      cfg.similarity_filter.enabled = false;
      cfg.transition = sd::Transition{};  // one image per request: nothing to morph
      StreamDiffusion& stream = stream_for(cfg, txt2img);
      // Its CUDA graph counters into the API's, also when the request fails (a kept stream outlives the job).
      // Counted before the answer (stats read after it include the request), or on the way out of a failure.
      struct CountGraphs {
        GraphCounters& counters;
        const StreamDiffusion& stream;
        const StreamStats before;
        bool counted = false;
        void count() {
          if (!counted) counters.add(before, stream.stats());
          counted = true;
        }
        ~CountGraphs() { count(); }
      } count_graphs{graphs_, stream, stream.stats()};
      if (stream.has_image_prompt()) stream.clear_image_prompt();  // a kept stream: the last request's
      stream.prepare(settings.prompts(), settings.negative_prompt);
      if (!defaults.controlnets.empty()) {
        stream.set_controlnets(settings.control_units(defaults));  // the shared nets, this request's scales, ranges
        for (size_t i = 0; i < control.size(); ++i)
          if (control[i].defined()) stream.set_control_image(i, control[i]);
      }
      if (!settings.image_prompt.empty()) stream.set_image_prompt(mat_tensor(settings.image_prompt));
      torch::Tensor out;
      if (txt2img) {
        out = stream.txt2img();
      } else {
        const torch::Tensor hwc = torch::from_blob(image.data, {image.rows, image.cols, 3}, torch::kUInt8);
        out = stream.img2img(image_to_device_tensor(hwc, image.rows, image.cols, models->device(), models->dtype()),
                             InputReady::complete);
      }
      const torch::Tensor img = tensor_to_image(out.slice(0, 0, 1)).squeeze(0).contiguous();
      cv::Mat rgb(static_cast<int>(img.size(0)), static_cast<int>(img.size(1)), CV_8UC3);
      std::memcpy(rgb.data, img.data_ptr<uint8_t>(), static_cast<size_t>(img.numel()));
      ApiResponse r;
      r.content_type = "image/png";
      r.body = encode_png(rgb);
      count_graphs.count();
      images_.fetch_add(1);
      done(std::move(r));
    } catch (const InvalidArgument& e) {  // what the request asked for cannot be done (a setting the models refuse)
      errors_.fetch_add(1);
      done(ApiResponse::error(400, std::string("generation failed: ") + e.what()));
    } catch (const std::exception& e) {  // the server's failure (out of memory, a model error): not the client's
      errors_.fetch_add(1);
      done(ApiResponse::error(500, std::string("generation failed: ") + e.what()));
    }
  });
  if (!worker_.schedule(job)) {
    // The worker has stopped: the job never runs, so release its slot and answer here.
    pending_->fetch_sub(1);
    done(ApiResponse::error(503, "the server is shutting down"));
    return {};
  }
  // Weak: a job that has run is gone, and a Cancel kept by its connection must not keep its images alive. Taking it
  // out of the queue and the worker taking it for its turn exclude each other under the worker's lock.
  return [this, weak = std::weak_ptr<ModelTask>(job)] {
    const auto queued = weak.lock();
    if (!queued || !worker_.unschedule(queued)) return false;
    pending_->fetch_sub(1);
    cancelled_.fetch_add(1);
    return true;
  };
}

}  // namespace sd::server
