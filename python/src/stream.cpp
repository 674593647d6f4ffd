// One stream (sd::StreamDiffusion) and its configuration, statistics and random sources.
// Every call that runs the models releases the GIL. Layouts: images in and out are NCHW float in [-1, 1].
#include <chrono>
#include <cmath>
#include <optional>

#include "core/error.h"
#include "pipeline/model_defaults.h"
#include "pipeline/rng.h"
#include "pipeline/stream_diffusion.h"
#include "pipeline/stream_settings.h"
#include "py_common.h"
#include "py_stream.h"

namespace sdpy {
namespace {

using Models = std::shared_ptr<sd::DiffusionModels>;  // see models.cpp

std::vector<at::Tensor> tensor_list(py::handle seq, const char* what) {
  std::vector<at::Tensor> out;
  for (auto item : seq) out.push_back(to_tensor(item, what).to(c10::kFloat).contiguous());
  return out;
}

// Prompt / seed lists from Python: a list of (item, weight) pairs (or bare items, weight 1), or a dict {item: weight};
// a str is parsed as the text form ("a cat:1 | a dog:0.5", "1:0.7, 2:0.3").
std::vector<sd::WeightedPrompt> prompt_list_arg(py::handle obj) {
  if (py::isinstance<py::str>(obj)) return sd::parse_prompt_list(obj.cast<std::string>());
  std::vector<sd::WeightedPrompt> out;
  if (py::isinstance<py::dict>(obj)) {
    for (auto item : obj.cast<py::dict>()) out.push_back({item.first.cast<std::string>(), item.second.cast<double>()});
  } else {
    for (auto item : obj) {
      if (py::isinstance<py::str>(item)) {
        out.push_back({item.cast<std::string>(), 1.0});
        continue;
      }
      const auto pair = item.cast<py::sequence>();
      if (pair.size() != 2) throw sd::InvalidArgument("prompt list: expected (text, weight) pairs");
      out.push_back({pair[0].cast<std::string>(), pair[1].cast<double>()});
    }
  }
  sd::check_prompt_list(out, "prompt list");
  return out;
}

std::vector<sd::WeightedSeed> seed_list_arg(py::handle obj) {
  if (py::isinstance<py::str>(obj)) return sd::parse_seed_list(obj.cast<std::string>());
  std::vector<sd::WeightedSeed> out;
  if (py::isinstance<py::dict>(obj)) {
    for (auto item : obj.cast<py::dict>()) out.push_back({item.first.cast<uint64_t>(), item.second.cast<double>()});
  } else {
    for (auto item : obj) {
      if (py::isinstance<py::int_>(item)) {
        out.push_back({item.cast<uint64_t>(), 1.0});
        continue;
      }
      const auto pair = item.cast<py::sequence>();
      if (pair.size() != 2) throw sd::InvalidArgument("seed list: expected (seed, weight) pairs");
      out.push_back({pair[0].cast<uint64_t>(), pair[1].cast<double>()});
    }
  }
  sd::check_seed_list(out, "seed list");
  return out;
}

py::list prompt_list_py(const std::vector<sd::WeightedPrompt>& l) {
  py::list out;
  for (const auto& e : l) out.append(py::make_tuple(e.text, e.weight));
  return out;
}

py::list seed_list_py(const std::vector<sd::WeightedSeed>& l) {
  py::list out;
  for (const auto& e : l) out.append(py::make_tuple(e.seed, e.weight));
  return out;
}

// A transition: seconds (a number), or the text form ("2.5s", "30f", "0").
sd::Transition transition_arg(py::handle obj) {
  if (py::isinstance<py::str>(obj)) return sd::parse_transition(obj.cast<std::string>());
  sd::Transition t;
  t.seconds = obj.cast<double>();
  if (!(t.seconds >= 0) || !std::isfinite(t.seconds)) throw sd::InvalidArgument("transition: seconds must be >= 0");
  return t;
}

// A getter of one of the stream's state tensors: read under the stream's lock (py_stream.h), wrapped once the GIL is
// held again.
auto state_tensor(const torch::Tensor& (sd::StreamDiffusion::*get)() const) {
  return [get](const PyStream& s) {
    const at::Tensor t = ((*locked(s)).*get)();
    return maybe_wrap(t);
  };
}

}  // namespace

// What Stream.config returns: a copy of the stream's settings that refuses assignments. A plain copy took
// `s.config.guidance_scale = 2` and changed nothing, silently.
struct StreamConfigSnapshot : sd::StreamConfig {
  explicit StreamConfigSnapshot(const sd::StreamConfig& c) : sd::StreamConfig(c) {}
};

void bind_stream(py::module_& m) {
  py::class_<sd::SimilarityFilterOptions>(m, "SimilarityFilterOptions",
                                          "The stochastic similarity filter (img2img): skips near-identical frames.")
      .def(py::init([](bool enabled, double threshold, int max_skip_frame, bool sleep_on_skip) {
             return sd::SimilarityFilterOptions{enabled, threshold, max_skip_frame, sleep_on_skip};
           }),
           py::arg("enabled") = false, py::arg("threshold") = 0.98, py::arg("max_skip_frame") = 10,
           py::arg("sleep_on_skip") = true)
      .def_readwrite("enabled", &sd::SimilarityFilterOptions::enabled)
      .def_readwrite("threshold", &sd::SimilarityFilterOptions::threshold)
      .def_readwrite("max_skip_frame", &sd::SimilarityFilterOptions::max_skip_frame)
      .def_readwrite("sleep_on_skip", &sd::SimilarityFilterOptions::sleep_on_skip);

  py::class_<sd::StreamConfig>(m, "StreamConfig", R"doc(
Settings of one stream (sd::StreamConfig). Build it with resolve_config() to get the model's recommendations for
whatever is left unset, or set every field yourself.
)doc")
      .def(py::init<>())
      .def(py::init<const sd::StreamConfig&>(), py::arg("other"),
           "a copy (of Stream.config, say, to change and build a new Stream from)")
      .def("copy", [](const sd::StreamConfig& c) { return sd::StreamConfig(c); }, "a changeable copy")
      .def("__copy__", [](const sd::StreamConfig& c) { return sd::StreamConfig(c); })
      .def("__deepcopy__", [](const sd::StreamConfig& c, const py::dict&) { return sd::StreamConfig(c); },
           py::arg("memo"))
      .def_readwrite("t_index_list", &sd::StreamConfig::t_index_list,
                     "indices into the num_inference_steps LCM timesteps (0 = t 999)")
      .def_readwrite("num_inference_steps", &sd::StreamConfig::num_inference_steps)
      .def_property(
          "cfg_type", [](const sd::StreamConfig& c) { return sd::cfg_type_name(c.cfg_type); },
          [](sd::StreamConfig& c, const std::string& s) { c.cfg_type = sd::parse_cfg_type(s); },
          "'none' | 'full' | 'self' | 'initialize'")
      .def_readwrite("guidance_scale", &sd::StreamConfig::guidance_scale)
      .def_readwrite("delta", &sd::StreamConfig::delta)
      .def_readwrite("frame_buffer_size", &sd::StreamConfig::frame_buffer_size)
      .def_readwrite("use_denoising_batch", &sd::StreamConfig::use_denoising_batch)
      .def_readwrite("do_add_noise", &sd::StreamConfig::do_add_noise)
      .def_readwrite("width", &sd::StreamConfig::width)
      .def_readwrite("height", &sd::StreamConfig::height)
      .def_readwrite("seed", &sd::StreamConfig::seed)
      .def_readwrite("similarity_filter", &sd::StreamConfig::similarity_filter)
      .def_readwrite("original_frame_layout", &sd::StreamConfig::original_frame_layout)
      .def_readwrite("deep_cache_every", &sd::StreamConfig::deep_cache_every,
                     "reuse the UNet's deep features for k - 1 of every k stream calls (1 = off)")
      .def_readwrite("deep_cache_min_similarity", &sd::StreamConfig::deep_cache_min_similarity,
                     "img2img input similarity below which a full UNet call is forced")
      .def_readwrite("cuda_graphs", &sd::StreamConfig::cuda_graphs,
                     "on CUDA, record the UNet / TAESD calls once per shape as CUDA graphs and replay them")
      .def_readwrite("sync_components", &sd::StreamConfig::sync_components,
                     "wait for the device after each component (exact per-component times; slower on CUDA)")
      .def_property(
          "seed_list", [](const sd::StreamConfig& c) { return seed_list_py(c.seed_list); },
          [](sd::StreamConfig& c, py::object v) { c.seed_list = v.is_none() ? std::vector<sd::WeightedSeed>{} : seed_list_arg(v); },
          "[(seed, weight), ...]: init_noise = sum w_i N_i / sqrt(sum w_i^2) (weights normalised); [] = seed alone")
      .def_property(
          "prompt_blend", [](const sd::StreamConfig& c) { return sd::blend_method_name(c.prompt_blend); },
          [](sd::StreamConfig& c, const std::string& m) { c.prompt_blend = sd::parse_blend_method(m); },
          "'linear' | 'slerp': how a prompt list (and a transition) blends the embeddings")
      .def_property(
          "transition", [](const sd::StreamConfig& c) { return sd::transition_str(c.transition); },
          [](sd::StreamConfig& c, py::object v) { c.transition = transition_arg(v); },
          "how prompt / seed changes morph: seconds (a number or '2.5s'), frames ('30f'), 0 = at once")
      .def_readwrite("latent_feedback", &sd::StreamConfig::latent_feedback,
                     "A in [0, 1]: img2img input latent = (1 - A) * encoded frame + A * previous output latent")
      .def("__repr__", [](const sd::StreamConfig& c) {
        std::string idx;
        for (size_t i = 0; i < c.t_index_list.size(); ++i) idx += (i ? ", " : "") + std::to_string(c.t_index_list[i]);
        return "StreamConfig(t_index_list=[" + idx + "], num_inference_steps=" + std::to_string(c.num_inference_steps) +
               ", cfg_type='" + sd::cfg_type_name(c.cfg_type) + "', guidance_scale=" + std::to_string(c.guidance_scale) +
               ", delta=" + std::to_string(c.delta) + ", frame_buffer_size=" + std::to_string(c.frame_buffer_size) +
               ", width=" + std::to_string(c.width) + ", height=" + std::to_string(c.height) +
               ", seed=" + std::to_string(c.seed) + ")";
      });
  py::class_<StreamConfigSnapshot, sd::StreamConfig>(m, "StreamConfigSnapshot", R"doc(
Stream.config: the settings the stream runs with, read-only. Change a running stream with its setters
(set_guidance_scale, set_delta, set_t_index_list, set_seed, set_similarity_filter, ...), or build a new Stream from
a changed copy: c = s.config.copy(); c.width = 256; Stream(models, c).
)doc")
      .def("__setattr__", [](const py::object&, const std::string& name, const py::object&) {
        throw py::attribute_error(
            "Stream.config is a read-only snapshot: setting '" + name + "' on it would change nothing. Change a "
            "running stream with its setters (set_guidance_scale, set_delta, set_t_index_list, set_seed, "
            "set_similarity_filter, ...), or build a new Stream from s.config.copy()");
      });

  m.def(
      "resolve_config",
      [](std::optional<std::string> model, const std::string& mode, std::optional<std::vector<int64_t>> t_index_list,
         std::optional<int64_t> num_inference_steps, std::optional<std::string> cfg_type,
         std::optional<double> guidance_scale, std::optional<double> delta, std::optional<int64_t> width,
         std::optional<int64_t> height, const std::string& config, const std::string& prediction_type) {
        if (mode != "txt2img" && mode != "img2img")
          throw sd::InvalidArgument("mode must be 'txt2img' or 'img2img', got '" + mode + "'");
        const std::string path = model && !model->empty() ? *model : sd::default_model_dir();
        sd::StreamRequest r{t_index_list, num_inference_steps, cfg_type, guidance_scale, delta, width, height};
        return sd::resolve_stream_config(r, mode == "txt2img", sd::read_model_defaults(path, config, prediction_type));
      },
      py::arg("model") = py::none(), py::arg("mode") = "img2img", py::kw_only(), py::arg("t_index_list") = py::none(),
      py::arg("num_inference_steps") = py::none(), py::arg("cfg_type") = py::none(),
      py::arg("guidance_scale") = py::none(), py::arg("delta") = py::none(), py::arg("width") = py::none(),
      py::arg("height") = py::none(), py::arg("config") = "", py::arg("prediction_type") = "",
      R"doc(
A StreamConfig for `model` (None = the built-in model) in `mode`, each unset setting resolved as the CLI does:
argument > the model's streamdiffusion.json > its family's defaults > built-in (txt2img 0,16,32,45 cfg none, img2img
32,45 cfg self, guidance 1.2, delta 1, the model's native size).
)doc");

  py::class_<sd::StreamStats>(m, "StreamStats", "Counters and seconds per stage since the stream was made.")
      .def_readonly("calls", &sd::StreamStats::calls)
      .def_readonly("processed", &sd::StreamStats::processed)
      .def_readonly("skipped", &sd::StreamStats::skipped)
      .def_readonly("forced", &sd::StreamStats::forced)
      .def_readonly("unet_calls", &sd::StreamStats::unet_calls)
      .def_readonly("unet_rows", &sd::StreamStats::unet_rows)
      .def_readonly("text_encodes", &sd::StreamStats::text_encodes)
      .def_readonly("controlnet_calls", &sd::StreamStats::controlnet_calls,
                    "ControlNet evaluations (one per ControlNet per UNet call that computed residuals)")
      .def_readonly("controlnet_reused", &sd::StreamStats::controlnet_reused,
                    "UNet calls that reused cached residuals (set_controlnet_every)")
      .def_readonly("image_prompt_encodes", &sd::StreamStats::image_prompt_encodes)
      .def_readonly("unet_shallow_calls", &sd::StreamStats::unet_shallow_calls,
                    "UNet calls that ran only the first level on cached deep features (deep_cache_every)")
      .def_readonly("batched_calls", &sd::StreamStats::batched_calls,
                    "calls whose UNet rows ran in one UNet call shared with other streams (multi-stream batching)")
      .def_readonly("deep_cache_forced", &sd::StreamStats::deep_cache_forced,
                    "full UNet calls forced by an input below deep_cache_min_similarity")
      .def_readonly("graph_replays", &sd::StreamStats::graph_replays,
                    "UNet / encode / decode calls answered by a CUDA graph replay")
      .def_readonly("graph_captures", &sd::StreamStats::graph_captures, "CUDA graphs recorded")
      .def_readonly("graph_failures", &sd::StreamStats::graph_failures,
                    "CUDA graph captures that failed (that component and shape then runs eagerly)")
      .def_readonly("image_prompt_s", &sd::StreamStats::image_prompt_s, "wall time of the image prompt encodes")
      .def_readonly("controlnet_s", &sd::StreamStats::controlnet_s)
      .def_readonly("text_encode_s", &sd::StreamStats::text_encode_s)
      .def_readonly("image_encode_s", &sd::StreamStats::image_encode_s)
      .def_readonly("unet_s", &sd::StreamStats::unet_s)
      .def_readonly("decode_s", &sd::StreamStats::decode_s)
      .def_readonly("total_s", &sd::StreamStats::total_s)
      .def_readonly("ema_call_s", &sd::StreamStats::ema_call_s)
      .def("__repr__", [](const sd::StreamStats& s) {
        return "StreamStats(calls=" + std::to_string(s.calls) + ", processed=" + std::to_string(s.processed) +
               ", skipped=" + std::to_string(s.skipped) + ", unet_calls=" + std::to_string(s.unet_calls) +
               ", total_s=" + std::to_string(s.total_s) + ")";
      });

  py::class_<sd::Rng, std::shared_ptr<sd::Rng>>(m, "Rng", "Source of the stream's normal draws.");
  py::class_<sd::TorchRng, sd::Rng, std::shared_ptr<sd::TorchRng>>(
      m, "TorchRng", "torch.manual_seed(seed) + torch.randn, draw for draw (the default).")
      .def(py::init<uint64_t>(), py::arg("seed") = 2);
  py::class_<sd::ReplayRng, sd::Rng, std::shared_ptr<sd::ReplayRng>>(
      m, "ReplayRng", "Hands out recorded float32 tensors in order (golden tests); a shape mismatch raises.")
      .def(py::init([](py::handle draws, const std::string& source) {
             return std::make_shared<sd::ReplayRng>(tensor_list(draws, "ReplayRng draws"), source);
           }),
           py::arg("draws"), py::arg("source") = "replay")
      .def_property_readonly("consumed", &sd::ReplayRng::consumed)
      .def_property_readonly("remaining", &sd::ReplayRng::remaining);
  py::class_<sd::UniformSource, std::shared_ptr<sd::UniformSource>>(m, "UniformSource",
                                                                     "The similarity filter's uniform draws.");
  py::class_<sd::Mt19937UniformSource, sd::UniformSource, std::shared_ptr<sd::Mt19937UniformSource>>(
      m, "Mt19937UniformSource")
      .def(py::init<uint64_t>(), py::arg("seed") = 0);
  py::class_<sd::ReplayUniformSource, sd::UniformSource, std::shared_ptr<sd::ReplayUniformSource>>(
      m, "ReplayUniformSource", "Replays recorded uniform draws in order (golden tests).")
      .def(py::init<std::vector<double>>(), py::arg("values"))
      .def_property_readonly("consumed", &sd::ReplayUniformSource::consumed);

  py::class_<PyStream, std::shared_ptr<PyStream>>(m, "Stream", R"doc(
One StreamDiffusion stream (sd::StreamDiffusion) on a loaded model set: its latent buffer, RCFG state, noise and
similarity-filter state belong to one input sequence. Thread-safe: calls from several threads (a worker running
frames, a GUI changing settings) take turns, each waiting for the call in progress. Images in and out are NCHW float
in [-1, 1]; a call returns the frames submitted n-1 calls earlier (n = len(t_index_list)).
)doc")
      .def(py::init([](Models models, const sd::StreamConfig& config, py::object rng_obj, py::object uniform_obj) {
             if (!models) throw sd::InvalidArgument("Stream: models is None (use load_pipeline())");
             auto rng = rng_obj.is_none() ? nullptr : rng_obj.cast<std::shared_ptr<sd::Rng>>();
             auto uniform = uniform_obj.is_none() ? nullptr : uniform_obj.cast<std::shared_ptr<sd::UniformSource>>();
             auto s = std::make_shared<PyStream>();
             s->models = models;
             s->weights_mu = weights_mutex(models.get());
             s->stream = std::make_shared<sd::StreamDiffusion>(models, config, rng, uniform);
             return s;
           }),
           py::arg("models"), py::arg("config") = sd::StreamConfig(), py::arg("rng") = py::none(),
           py::arg("uniform") = py::none(),
           "rng: a TorchRng (default, seeded from config.seed) or ReplayRng; uniform: the filter's draws.")
      .def(
          "prepare",
          [](PyStream& s, py::object prompt, const std::string& negative_prompt) {
            const bool text = py::isinstance<py::str>(prompt);
            const std::vector<sd::WeightedPrompt> list =
                text ? std::vector<sd::WeightedPrompt>{{prompt.cast<std::string>(), 1.0}} : prompt_list_arg(prompt);
            locked(s)->prepare(list, negative_prompt);
            // After the call: a refused prompt leaves the stream's, which run_stream starts from.
            s.prompt = text ? list[0].text : sd::prompt_list_str(list);
            s.negative_prompt = negative_prompt;
          },
          py::arg("prompt"), py::arg("negative_prompt") = "",
          "Builds every cache: encodes the prompts, seeds the Rng with config.seed (or blends config.seed_list), draws "
          "init_noise. prompt: a str (weights like '(word:1.3)' allowed) or a prompt list [(text, weight), ...].")
      .def(
          "set_prompt_list",
          [](PyStream& s, py::object prompts) {
            const auto list = prompt_list_arg(prompts);
            locked(s)->set_prompt_list(list);
          },
          py::arg("prompts"),
          "A weighted prompt blend [(text, weight), ...] or {text: weight} (weights normalised), on the cached "
          "embeddings: only texts new to the stream are encoded. Morphs with the stream's transition.")
      .def_property_readonly("prompt_list", [](const PyStream& s) {
        const auto list = locked(s)->prompt_list();
        return prompt_list_py(list);
      },
                             "the target prompt list [(text, weight), ...]")
      .def_property_readonly(
          "effective_prompts", [](const PyStream& s) {
            const auto list = locked(s)->effective_prompts();
            return prompt_list_py(list);
          },
          "the normalised prompt weights of the next call (during a transition: the morph's)")
      .def(
          "set_negative_prompt",
          [](PyStream& s, const std::string& negative_prompt) {
            locked(s)->set_negative_prompt(negative_prompt);
            s.negative_prompt = negative_prompt;
          },
          py::arg("negative_prompt"), "A new negative prompt alone (the prompt blend is kept).")
      .def(
          "set_seed_list", [](PyStream& s, py::object seeds) {
            const auto list = seed_list_arg(seeds);
            locked(s)->set_seed_list(list);
          },
          py::arg("seeds"),
          "init_noise from a weighted seed list [(seed, weight), ...], variance-preserving: sum w_i N_i / "
          "sqrt(sum w_i^2). Morphs with the stream's transition.")
      .def_property_readonly("effective_seeds", [](const PyStream& s) {
        const auto list = locked(s)->effective_seeds();
        return seed_list_py(list);
      },
                             "the normalised seed weights of the next call (during a transition: the morph's)")
      .def(
          "set_transition", [](PyStream& s, py::object t) {
            const sd::Transition transition = transition_arg(t);
            locked(s)->set_transition(transition);
          },
          py::arg("transition"),
          "How later prompt / seed changes morph: seconds (a number or '2.5s'), frames ('30f'), 0 = at once.")
      .def_property_readonly("transition_active", [](const PyStream& s) { return locked(s)->transition_active(); })
      .def(
          "set_prompt_blend",
          [](PyStream& s, const std::string& m) { locked(s)->set_prompt_blend(sd::parse_blend_method(m)); },
          py::arg("method"), "'linear' | 'slerp' (the current list is blended again at once)")
      .def(
          "set_latent_feedback", [](PyStream& s, double a) { locked(s)->set_latent_feedback(a); }, py::arg("amount"),
          "A in [0, 1]: img2img input latent = (1 - A) * encoded frame + A * previous output latent (0 = off).")
      .def_property_readonly("prepared", [](const PyStream& s) { return locked(s)->prepared(); })
      .def(
          "img2img",
          [](PyStream& s, py::handle images) {
            at::Tensor x = to_tensor(images, "images");
            at::Tensor out;
            out = locked(s)->img2img(x);
            return wrap(std::move(out));
          },
          py::arg("images"),
          "One stream step on F new frames: float NCHW [F, 3, H, W] (or [3, H, W] when F = 1) in [-1, 1]. Returns the "
          "decoded frames [F, 3, H, W] (about [-1, 1], not clamped) of the frames submitted n-1 calls earlier.")
      .def(
          "txt2img",
          [](PyStream& s) {
            at::Tensor out;
            out = locked(s)->txt2img();
            return wrap(std::move(out));
          },
          "One stream step from F fresh noise latents; returns NCHW [F, 3, H, W] in about [-1, 1].")
      .def(
          "txt2img_one_shot",
          [](PyStream& s) {
            at::Tensor out;
            out = locked(s)->txt2img_one_shot();
            return wrap(std::move(out));
          },
          "sd-turbo one-shot batch: batch_size fresh latents, one UNet call, all images NCHW [B, 3, H, W] in "
          "about [-1, 1]; no latency, no guidance.")
      .def(
          "update_prompt",
          [](PyStream& s, const std::string& prompt, std::optional<std::string> negative_prompt) {
            const std::string neg = negative_prompt.value_or(s.negative_prompt);
            locked(s)->update_prompt(prompt, neg);
            s.prompt = prompt;
            s.negative_prompt = neg;
          },
          py::arg("prompt"), py::arg("negative_prompt") = py::none(),
          "Re-encodes the prompt (and the negative prompt: None keeps the current one).")
      .def("set_guidance_scale", [](PyStream& s, double g) { locked(s)->set_guidance_scale(g); },
           py::arg("guidance_scale"))
      .def("set_delta", [](PyStream& s, double d) { locked(s)->set_delta(d); }, py::arg("delta"))
      .def(
          "set_deep_cache",
          [](PyStream& s, int64_t every, std::optional<double> min_similarity) {
            LockedStream l = locked(s);
            l->set_deep_cache(every, min_similarity.value_or(l->config().deep_cache_min_similarity));
          },
          py::arg("every"), py::arg("min_similarity") = py::none(),
          "Deep-feature reuse, live: a full UNet call every `every` stream calls (1 = off); the cache is dropped.")
      .def(
          "set_t_index_list", [](PyStream& s, const std::vector<int64_t>& l) { locked(s)->set_t_index_list(l); },
          py::arg("t_index_list"),
          "Same length: new timesteps, buffers kept. Other length: the stream restarts (buffers zeroed).")
      .def("set_seed", [](PyStream& s, uint64_t seed) { locked(s)->set_seed(seed); }, py::arg("seed"),
           "Reseeds, redraws init_noise, zeroes stock_noise; the latent buffer is kept.")
      .def(
          "set_similarity_filter",
          [](PyStream& s, py::object options, std::optional<double> threshold, std::optional<int> max_skip_frame) {
            sd::SimilarityFilterOptions o = locked(s)->config().similarity_filter;
            if (py::isinstance<py::float_>(options))
              throw py::type_error("set_similarity_filter: enabled must be True / False (or a SimilarityFilterOptions)"
                                   ", got " + py::str(options).cast<std::string>() +
                                   "; a threshold goes by name: set_similarity_filter(True, threshold=...)");
            if (py::isinstance<sd::SimilarityFilterOptions>(options)) {
              o = options.cast<sd::SimilarityFilterOptions>();
            } else if (!options.is_none()) {
              o.enabled = options.cast<bool>();
            }
            if (threshold) o.threshold = *threshold;
            if (max_skip_frame) o.max_skip_frame = *max_skip_frame;
            locked(s)->set_similarity_filter(o);
          },
          py::arg("enabled") = py::none(), py::arg("threshold") = py::none(), py::arg("max_skip_frame") = py::none(),
          "set_similarity_filter(True, threshold=0.98, max_skip_frame=10), or a SimilarityFilterOptions.")
      .def_property_readonly("config", [](const PyStream& s) { return StreamConfigSnapshot(locked(s)->config()); },
                             "the stream's settings (a read-only snapshot; see StreamConfigSnapshot)")
      .def_property_readonly("stats", [](const PyStream& s) { return locked(s)->stats(); })
      .def_property_readonly("models", [](const PyStream& s) { return std::const_pointer_cast<sd::DiffusionModels>(s.models); })
      .def_property_readonly("prompt", [](const PyStream& s) { return s.prompt; })
      .def_property_readonly("negative_prompt", [](const PyStream& s) { return s.negative_prompt; })
      .def_property_readonly("width", [](const PyStream& s) { return locked(s)->config().width; })
      .def_property_readonly("height", [](const PyStream& s) { return locked(s)->config().height; })
      .def_property_readonly("frame_buffer_size",
                             [](const PyStream& s) { return locked(s)->config().frame_buffer_size; })
      .def_property_readonly("denoising_steps", [](const PyStream& s) { return locked(s)->denoising_steps(); })
      .def_property_readonly("batch_size", [](const PyStream& s) { return locked(s)->batch_size(); })
      .def_property_readonly("unet_batch_size", [](const PyStream& s) { return locked(s)->unet_batch_size(); })
      .def_property_readonly("guidance_scale", [](const PyStream& s) { return locked(s)->guidance_scale(); },
                             "effective guidance scale (1 for cfg none)")
      .def_property_readonly("delta", [](const PyStream& s) { return locked(s)->delta(); })
      .def_property_readonly("timesteps", [](const PyStream& s) { return locked(s)->timesteps(); })
      .def_property_readonly("sub_timesteps", [](const PyStream& s) { return locked(s)->sub_timesteps(); })
      .def_property_readonly("last_skipped",
                             [](const PyStream& s) { return !locked(s)->last_filter_decision().process; },
                             "whether the similarity filter skipped the last img2img call")
      // State tensors (read-only views; None when not built): latent NCHW.
      .def_property_readonly("init_noise", state_tensor(&sd::StreamDiffusion::init_noise))
      .def_property_readonly("stock_noise", state_tensor(&sd::StreamDiffusion::stock_noise))
      .def_property_readonly("latent_buffer", state_tensor(&sd::StreamDiffusion::latent_buffer))
      .def_property_readonly("prompt_embeds", state_tensor(&sd::StreamDiffusion::prompt_embeds))
      .def_property_readonly("cond_embeds", state_tensor(&sd::StreamDiffusion::cond_embeds))
      .def_property_readonly("uncond_embeds", state_tensor(&sd::StreamDiffusion::uncond_embeds))
      .def_property_readonly("alpha_prod_t_sqrt", state_tensor(&sd::StreamDiffusion::alpha_prod_t_sqrt))
      .def_property_readonly("beta_prod_t_sqrt", state_tensor(&sd::StreamDiffusion::beta_prod_t_sqrt))
      .def(
          "_time_img2img_native",
          [](PyStream& s, py::handle images, int n) {
            // The C++ side of the overhead figure: n img2img calls timed in C++ (no Python between them).
            at::Tensor x = to_tensor(images, "images");
            std::vector<double> secs;
            LockedStream l = locked(s);
            for (int i = 0; i < n; ++i) {
              const auto t0 = std::chrono::steady_clock::now();
              at::Tensor out = l->img2img(x);
              secs.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
            }
            return secs;
          },
          py::arg("images"), py::arg("n"), "benchmark helper: seconds of each of n img2img calls, timed in C++")
      .def("__repr__", [](const PyStream& s) {
        const sd::StreamConfig c = locked(s)->config();
        const bool prepared = locked(s)->prepared();
        return "streamdiffusion_cpp.Stream(" + std::to_string(c.width) + "x" + std::to_string(c.height) +
               ", steps=" + std::to_string(c.t_index_list.size()) + ", cfg=" + sd::cfg_type_name(c.cfg_type) +
               ", prepared=" + (prepared ? "True" : "False") + ")";
      });
}

}  // namespace sdpy
