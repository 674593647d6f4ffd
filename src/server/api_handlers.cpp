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

torch::Tensor mat_tensor(const cv::Mat& rgb) {
  const cv::Mat m = rgb.isContinuous() ? rgb : rgb.clone();
  return torch::from_blob(m.data, {m.rows, m.cols, 3}, torch::kUInt8).clone();
}

// The control image of each ControlNet for one request (empty where the scale is 0: skipped, needs none): the
// static control_image, else the preprocessed input image; `feedback` has no previous output in a one-shot request,
// so it gets what a stream's first frame gets (the input image, black in txt2img). Made here, on the network thread.
std::vector<torch::Tensor> request_control_images(const StreamSettings& s, const cv::Mat& image, bool txt2img,
                                                  int width, int height) {
  std::vector<torch::Tensor> out(s.controlnets.size());
  for (size_t i = 0; i < s.controlnets.size(); ++i) {
    const ControlSetting& c = s.controlnets[i];
    if (c.scale == 0) continue;
    if (!s.control_image.empty()) {
      out[i] = mat_tensor(s.control_image);
      continue;
    }
    const auto pre = make_control_preprocessor(c.preprocessor);
    if (pre->feedback()) {
      out[i] = txt2img ? torch::zeros({height, width, 3}, torch::kUInt8) : mat_tensor(image);
    } else if (txt2img) {
      throw InvalidArgument("controlnets[" + std::to_string(i) + "] (preprocessor " + c.preprocessor +
                            ") has no input image to preprocess: give 'control_image' (base64 JPEG/PNG), or set "
                            "controlnets[" + std::to_string(i) + "].scale to 0");
    } else {
      out[i] = pre->apply(mat_tensor(image)).contiguous();
    }
  }
  return out;
}

// The output size of one request: "width" / "height" (each optional: the server's size), positive multiples of
// `step` (what the stream needs: 8 and the VAE's scale factor) up to the server's --max-size. InvalidArgument naming
// the field and what it expects.
std::pair<int64_t, int64_t> request_size(const nlohmann::json& j, const StreamDefaults& d, int64_t step) {
  const int64_t max_w = d.max_width > 0 ? d.max_width : d.img2img.width;
  const int64_t max_h = d.max_height > 0 ? d.max_height : d.img2img.height;
  auto side = [&](const char* key, int64_t fallback, int64_t max) {
    if (!j.contains(key)) return fallback;
    const auto& v = j.at(key);
    const int64_t hi = max / step * step;
    const std::string expected = "expected an integer multiple of " + std::to_string(step) + " in [" +
                                 std::to_string(step) + ", " + std::to_string(hi) + "] (the server's --max-size is " +
                                 std::to_string(max_w) + "x" + std::to_string(max_h) + ")";
    const bool integral =
        v.is_number_integer() || (v.is_number_float() && std::isfinite(v.get<double>()) &&
                                  std::floor(v.get<double>()) == v.get<double>() && std::abs(v.get<double>()) < 1e9);
    if (!integral) throw InvalidArgument(std::string("field '") + key + "': " + expected + ", got " + v.dump());
    int64_t x = 0;
    if (v.is_number_unsigned())
      x = static_cast<int64_t>(std::min<uint64_t>(v.get<uint64_t>(), static_cast<uint64_t>(INT64_MAX)));
    else if (v.is_number_integer())
      x = v.get<int64_t>();
    else
      x = static_cast<int64_t>(v.get<double>());  // integral and small, checked above
    if (x < step || x > max || x % step != 0)
      throw InvalidArgument(std::string("field '") + key + "': " + expected + ", got " + v.dump());
    return x;
  };
  return {side("width", d.img2img.width, max_w), side("height", d.img2img.height, max_h)};
}

// Everything of a stream config an API stream is built with, but the seed (set per request without a rebuild).
bool same_but_seed(const StreamConfig& a, const StreamConfig& b) {
  return a.t_index_list == b.t_index_list && a.num_inference_steps == b.num_inference_steps &&
         a.cfg_type == b.cfg_type && a.guidance_scale == b.guidance_scale && a.delta == b.delta &&
         a.frame_buffer_size == b.frame_buffer_size && a.use_denoising_batch == b.use_denoising_batch &&
         a.do_add_noise == b.do_add_noise && a.width == b.width && a.height == b.height &&
         a.similarity_filter.enabled == b.similarity_filter.enabled &&
         a.original_frame_layout == b.original_frame_layout && a.deep_cache_every == b.deep_cache_every &&
         a.deep_cache_min_similarity == b.deep_cache_min_similarity;
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
    streams_.front().stream->set_seed(cfg.seed);
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
  return {{"requests", requests_.load()},
          {"images", images_.load()},
          {"pending", pending_->load()},
          {"max_pending", max_pending_},
          {"rejected_busy", rejected_busy_.load()},
          {"errors", errors_.load()},
          {"streams_built", streams_built_.load()},
          {"streams_reused", streams_reused_.load()},
          {"streams_cached", streams_cached_.load()}};
}

void ApiHandlers::handle(const ApiRequest& req, Done done) {
  requests_.fetch_add(1);
  const std::string path = path_of(req.target);
  const bool get = req.method == "GET" || req.method == "HEAD";
  if (path == "/api/health") {
    if (!get) return done(ApiResponse::error(405, "use GET for " + path));
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
    }
    return done(ApiResponse::json(200, h));
  }
  if (path == "/api/stats") {
    if (!get) return done(ApiResponse::error(405, "use GET for " + path));
    nlohmann::json s = server_stats_ ? server_stats_() : nlohmann::json::object();
    s["api"] = stats();
    return done(ApiResponse::json(200, s));
  }
  if (path == "/api/txt2img" || path == "/api/img2img") {
    if (req.method != "POST") return done(ApiResponse::error(405, "use POST with a JSON body for " + path));
    return generate(path == "/api/txt2img", req, std::move(done));
  }
  errors_.fetch_add(1);
  done(ApiResponse::error(404, "no API endpoint " + path +
                                   " (expected /api/health, /api/stats, /api/txt2img, /api/img2img)"));
}

void ApiHandlers::generate(bool txt2img, const ApiRequest& req, Done done) {
  const std::string what = txt2img ? "txt2img" : "img2img";
  if (req.content_type.rfind("application/json", 0) != 0) {
    errors_.fetch_add(1);
    return done(ApiResponse::error(415, what + ": expected Content-Type: application/json, got '" +
                                            req.content_type + "'"));
  }
  StreamSettings settings;
  cv::Mat image;
  std::vector<torch::Tensor> control;
  StreamDefaults defaults = defaults_;  // at this request's size
  try {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(req.body);
    } catch (const nlohmann::json::parse_error& e) {
      throw InvalidArgument(std::string("bad JSON: ") + e.what());
    }
    if (!j.is_object()) throw InvalidArgument("expected a JSON object, got " + std::string(j.type_name()));
    const auto [width, height] = request_size(j, defaults_, size_step());
    defaults.img2img.width = defaults.txt2img.width = width;
    defaults.img2img.height = defaults.txt2img.height = height;
    std::set<std::string> skip{"width", "height"};
    if (!txt2img) skip.insert("image");
    settings = apply_settings_json(j, StreamSettings::defaults(defaults, txt2img), defaults, skip, false);
    if (!txt2img) {
      if (!j.contains("image") || !j["image"].is_string())
        throw InvalidArgument("field 'image': expected a base64 JPEG or PNG string");
      const std::string bytes = base64_decode(j["image"].get_ref<const std::string&>(), "field 'image'");
      image = fit_image(decode_image(bytes, true, "field 'image'"), static_cast<int>(width), static_cast<int>(height));
      if (!image.isContinuous()) image = image.clone();
    }
    control = request_control_images(settings, image, txt2img, static_cast<int>(width), static_cast<int>(height));
  } catch (const std::exception& e) {  // sd::Error mostly; anything else must not escape into the network thread
    errors_.fetch_add(1);
    return done(ApiResponse::error(400, what + ": " + e.what()));
  }

  if (pending_->fetch_add(1) >= max_pending_) {
    pending_->fetch_sub(1);
    rejected_busy_.fetch_add(1);
    return done(ApiResponse::json(503, {{"error", "busy"},
                                        {"message", "the server has " + std::to_string(max_pending_) +
                                                        " API requests waiting already; try again shortly"}}));
  }
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
      StreamDiffusion& stream = stream_for(cfg, txt2img);
      if (stream.has_image_prompt()) stream.clear_image_prompt();  // a kept stream: the last request's
      stream.prepare(settings.prompt, settings.negative_prompt);
      if (!defaults.controlnets.empty()) {
        std::vector<ControlNetUnit> units = defaults.controlnets;  // the shared nets, this request's scales
        for (size_t i = 0; i < units.size() && i < settings.controlnets.size(); ++i)
          units[i].scale = settings.controlnets[i].scale;
        stream.set_controlnets(std::move(units));
        for (size_t i = 0; i < control.size(); ++i)
          if (control[i].defined()) stream.set_control_image(i, control[i]);
      }
      if (!settings.image_prompt.empty()) stream.set_image_prompt(mat_tensor(settings.image_prompt));
      torch::Tensor out;
      if (txt2img) {
        out = stream.txt2img();
      } else {
        const torch::Tensor hwc = torch::from_blob(image.data, {image.rows, image.cols, 3}, torch::kUInt8);
        out = stream.img2img(image_to_tensor(hwc, image.rows, image.cols).to(models->device(), models->dtype()));
      }
      const torch::Tensor img = tensor_to_image(out.slice(0, 0, 1)).squeeze(0).contiguous();
      cv::Mat rgb(static_cast<int>(img.size(0)), static_cast<int>(img.size(1)), CV_8UC3);
      std::memcpy(rgb.data, img.data_ptr<uint8_t>(), static_cast<size_t>(img.numel()));
      ApiResponse r;
      r.content_type = "image/png";
      r.body = encode_png(rgb);
      images_.fetch_add(1);
      done(std::move(r));
    } catch (const std::exception& e) {
      errors_.fetch_add(1);
      done(ApiResponse::error(400, std::string("generation failed: ") + e.what()));
    }
  });
  if (!worker_.schedule(job)) {
    // The worker has stopped: the job never runs, so release its slot and answer here.
    pending_->fetch_sub(1);
    done(ApiResponse::error(503, "the server is shutting down"));
  }
}

}  // namespace sd::server
