#pragma once
// The HTTP API (JSON in, PNG or JSON out):
//   GET  /api/health    {"status":"ok", "model":..., "width":..., "height":..., "streams":..., "max_streams":...,
//                       "worker_id":..., "draining":...}  (alive; readiness is /api/ready, fleet.h)
//   GET  /api/stats     server, model worker, per-stream and API counters, RSS
//   POST /api/txt2img   Content-Type: application/json, body: the stream settings fields (see stream_settings.h,
//                       without "mode") and optionally "width" / "height" (positive multiples of 8 and of the VAE's
//                       scale factor, at most the server's --max-size; default the server's size) -> image/png of
//                       that size
//   POST /api/img2img   the same plus "image": base64 JPEG or PNG (a data: URL is fine), any size within
//                       8..4096 px per side (centre-cropped and resized to the server's size) -> image/png
//                       With ControlNets (serve --controlnet) both take "controlnets" and "control_image" (txt2img
//                       needs the latter for each ControlNet that runs: not at scale 0 or with a range keeping none
//                       of the steps), img2img preprocesses "image"; with an IP-Adapter both
//                       take "image_prompt" and "ip_adapter_scale" (server-wide).
// Each request runs a StreamDiffusion in sequential mode (all denoising steps in one call, no stream latency) as one
// unit of work on the shared ModelWorker, in turn with the live streams. The stream of each mode and size is kept
// (a few, least recently used dropped) and prepared again per request, which gives what a fresh one would. At most `max_pending` requests
// wait at once; beyond that 503 with a JSON "busy" body. Errors: 400 (bad JSON, unknown field, bad image), 404,
// 405, 415 — always a JSON body {"error": "..."}. A request whose client hangs up before the model takes it is
// dropped (HttpSession cancels it: it never runs; counted as "cancelled" in /api/stats, sd_api_cancelled_total).
#include <atomic>
#include <functional>
#include <list>
#include <memory>
#include <numeric>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "pipeline/diffusion_models.h"
#include "pipeline/stream_diffusion.h"
#include "server/graph_counters.h"
#include "server/model_worker.h"
#include "server/stream_settings.h"

namespace sd::server {

struct ApiRequest {
  std::string method;  // "GET", "POST", ...
  std::string target;  // path and query
  std::string content_type;
  std::string body;
};

struct ApiResponse {
  unsigned status = 200;
  std::string content_type = "application/json";
  std::string body;
  static ApiResponse json(unsigned status, const nlohmann::json& j);
  static ApiResponse error(unsigned status, const std::string& message);
};

class ApiHandlers {
 public:
  using Done = std::function<void(ApiResponse)>;
  // Drops an image request whose client has gone, if the model has not taken it yet: true then (it never runs, its
  // pending place is free at once, it counts as "cancelled" and its `done` is never called); false when it runs or
  // has run. Any thread.
  using Cancel = std::function<bool()>;

  ApiHandlers(std::shared_ptr<const DiffusionModels> models, StreamDefaults defaults, ModelWorker& worker,
              int max_pending, std::function<nlohmann::json()> server_stats);

  static bool is_api(const std::string& target);
  // `done` is called exactly once: at once (health, stats, errors) or from the model thread (images), unless the
  // returned Cancel (set for a queued image only) drops the request.
  Cancel handle(const ApiRequest& request, Done done);
  // For a client that waits for "100 Continue" before it sends the body (Expect: 100-continue): the refusal its
  // request gets whatever the body says (404, 405, 415, 503 busy), counted as handle() counts it; nullopt when the
  // body is wanted (then handle() takes the whole request as usual). `request.body` is not looked at.
  std::optional<ApiResponse> refusal_before_body(const ApiRequest& request);

  nlohmann::json stats() const;

 private:
  // What needs no body: health, stats and the refusals of the route, method, Content-Type and a busy server
  // (counted); nullopt for an image request that has a pending slot (taken here when `take_slot`, else only looked
  // for).
  std::optional<ApiResponse> answer_before_body(const ApiRequest& request, bool take_slot);
  // An image request whose pending slot is taken: its body parsed, its job scheduled (and its Cancel returned).
  Cancel generate(bool txt2img, const ApiRequest& request, Done done);
  // What request sizes must be multiples of: 8 and the VAE's scale factor (the stream's own checks).
  int64_t size_step() const { return std::lcm<int64_t>(8, models_->vae_scale_factor()); }
  // Model thread: the kept stream of this mode and size, reused when `cfg` differs from its config by the seed at
  // most (else built anew); at most kMaxCachedStreams are kept, the least recently used goes first.
  StreamDiffusion& stream_for(const StreamConfig& cfg, bool txt2img);

  std::shared_ptr<const DiffusionModels> models_;
  StreamDefaults defaults_;
  ModelWorker& worker_;
  const int max_pending_;
  std::function<nlohmann::json()> server_stats_;
  std::shared_ptr<std::atomic<int>> pending_ = std::make_shared<std::atomic<int>>(0);
  std::atomic<int64_t> requests_{0}, images_{0}, rejected_busy_{0}, errors_{0}, cancelled_{0};

  struct CachedStream {
    struct Key {
      bool txt2img;
      int64_t width, height;
      bool operator==(const Key& o) const { return txt2img == o.txt2img && width == o.width && height == o.height; }
    };
    Key key;
    std::unique_ptr<StreamDiffusion> stream;
  };
  static constexpr size_t kMaxCachedStreams = 4;
  std::list<CachedStream> streams_;  // model thread only; most recently used first
  std::atomic<int64_t> streams_built_{0}, streams_reused_{0}, streams_cached_{0};
  GraphCounters graphs_;  // the image streams' CUDA graphs, failed requests included
};

}  // namespace sd::server
