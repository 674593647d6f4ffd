#include "pipeline/multi_stream.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <thread>

#include <torch/cuda.h>
#include <torch/torch.h>

#include "core/cuda_graph_counts.h"
#include "core/error.h"
#include "core/log.h"
#include "core/shape_str.h"

namespace sd {

using torch::Tensor;

// The halves of a stream call (private to StreamDiffusion, which befriends this).
struct MultiStreamAccess {
  using CallState = StreamDiffusion::CallState;
  // Up to the encode for img2img (call.image set), the whole first half for txt2img. A skip's sleep is left to
  // run_stream_calls (call.skip_sleep_s): one stream's skip must not stall the others' calls.
  static CallState begin(StreamDiffusion& s, const Tensor& images, InputReady ready) {
    return images.defined() ? s.begin_img2img_input(images, ready, /*defer_sleep=*/true) : s.begin_txt2img();
  }
  static Tensor encode(StreamDiffusion& s, const Tensor& x) { return s.encode_input(x); }
  static Rng& rng(StreamDiffusion& s) { return *s.rng_; }
  static void add_encode_time(StreamDiffusion& s, double seconds) { s.stats_.image_encode_s += seconds; }
  static void begin_latent(StreamDiffusion& s, CallState& c, const Tensor& z) { s.begin_img2img_latent(c, z); }
  static Tensor complete(StreamDiffusion& s, CallState& c) { return s.complete_call(c); }
  static void record_unet(StreamDiffusion& s, const CallState& c, const Tensor& pred, double seconds) {
    s.record_shared_unet(c, pred, seconds);
  }
  static Tensor finish_unet(StreamDiffusion& s, CallState& c, const Tensor& pred) { return s.finish_unet(c, pred); }
  static Tensor decode(StreamDiffusion& s, const Tensor& latent) { return s.decode(latent); }
  static void add_decode_time(StreamDiffusion& s, double seconds) { s.stats_.decode_s += seconds; }
  static Tensor finish(StreamDiffusion& s, CallState& c, const Tensor& latent, const Tensor& image) {
    return s.finish_call(c, latent, image);
  }
  static const Tensor& embeds(const StreamDiffusion& s) { return s.prompt_embeds_; }
  static bool wants_graphs(const StreamDiffusion& s) { return s.wants_graphs(); }
  static const std::shared_ptr<const DiffusionModels>& models(const StreamDiffusion& s) { return s.models_; }
  // Graphs recorded for another model set, or over weights since replaced, read tensors that are gone.
  static void bind(SharedGraphs& g, const std::shared_ptr<const DiffusionModels>& m) {
    if (g.models_.lock() == m && g.weights_version_ == m->weights_version()) return;
    g.cache_.clear();
    g.models_ = m;
    g.weights_version_ = m->weights_version();
  }
  static GraphCache& cache(SharedGraphs& g) { return g.cache_; }
  static const AddedConditioning& added(const StreamDiffusion& s) { return s.added_; }
};

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void sync(const DiffusionModels& m) {
  if (m.device().is_cuda()) torch::cuda::synchronize();
}

std::exception_ptr invalid(const std::string& what) { return std::make_exception_ptr(InvalidArgument(what)); }

std::string message_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "unknown error";
  }
}

}  // namespace

void MultiStreamStats::add(const MultiStreamStats& o) {
  steps += o.steps;
  stream_calls += o.stream_calls;
  shared_unet_calls += o.shared_unet_calls;
  batched_calls += o.batched_calls;
  own_calls += o.own_calls;
  skipped += o.skipped;
  errors += o.errors;
  max_batch = std::max(max_batch, o.max_batch);
  max_rows = std::max(max_rows, o.max_rows);
  shared_encode_calls += o.shared_encode_calls;
  graph_captures += o.graph_captures;
  graph_replays += o.graph_replays;
  graph_failures += o.graph_failures;
  shared_call_failures += o.shared_call_failures;
}

std::string batch_incompatibility(const StreamDiffusion& a, const StreamDiffusion& b) {
  if (std::string r = a.batch_blocker(); !r.empty()) return "the first stream cannot share UNet calls: " + r;
  if (std::string r = b.batch_blocker(); !r.empty()) return "the second stream cannot share UNet calls: " + r;
  if (&a.models() != &b.models()) return "different model sets (streams share a UNet call only on the same models)";
  if (a.latent_height() != b.latent_height() || a.latent_width() != b.latent_width())
    return "different stream sizes (" + std::to_string(a.config().width) + "x" + std::to_string(a.config().height) +
           " vs " + std::to_string(b.config().width) + "x" + std::to_string(b.config().height) + ")";
  const Tensor& ea = a.prompt_embeds();
  const Tensor& eb = b.prompt_embeds();
  if (ea.dim() != eb.dim() || !ea.sizes().slice(1).equals(eb.sizes().slice(1)))
    return "different prompt-embedding shapes per row (" + shape_str(ea.sizes().slice(1)) + " vs " +
           shape_str(eb.sizes().slice(1)) + ")";
  if (a.added_conditioning().defined() != b.added_conditioning().defined())
    return "one stream has SDXL added conditioning and the other has none";
  return "";
}

std::vector<StreamCallResult> run_stream_calls(const std::vector<StreamCall>& calls,
                                               const MultiStreamOptions& options, MultiStreamStats* stats_out) {
  torch::NoGradGuard no_grad;
  const size_t n = calls.size();
  std::vector<StreamCallResult> res(n);
  MultiStreamStats st;
  st.steps = 1;
  st.stream_calls = static_cast<int64_t>(n);

  // Checks that fail one call before anything changes: no stream, the same stream twice.
  std::vector<bool> usable(n, true);
  std::map<const StreamDiffusion*, size_t> first;
  for (size_t i = 0; i < n; ++i) {
    if (!calls[i].stream) {
      res[i].error = invalid("run_stream_calls: call " + std::to_string(i) + " has no stream");
      usable[i] = false;
      continue;
    }
    auto [it, fresh] = first.emplace(calls[i].stream, i);
    if (!fresh) {
      res[i].error = invalid("run_stream_calls: calls " + std::to_string(it->second) + " and " + std::to_string(i) +
                             " are for the same stream; a stream takes one call per step");
      usable[i] = false;
    }
  }

  // Groups of streams that can share a UNet call, in call order; blocked streams run alone.
  std::vector<std::vector<size_t>> groups;
  std::vector<size_t> alone;
  std::vector<bool> capped(n, false);
  for (size_t i = 0; i < n; ++i) {
    if (!usable[i]) continue;
    const StreamDiffusion& s = *calls[i].stream;
    if (std::string why = s.batch_blocker(); !why.empty()) {
      res[i].fallback = why;
      alone.push_back(i);
      continue;
    }
    bool placed = false;
    for (auto& g : groups) {
      if (!batch_incompatibility(*calls[g.front()].stream, s).empty()) continue;
      if (options.max_streams > 0 && static_cast<int64_t>(g.size()) >= options.max_streams) {
        capped[i] = true;  // a compatible group is full
        continue;
      }
      g.push_back(i);
      placed = true;
      break;
    }
    if (!placed) groups.push_back({i});
  }
  const size_t batchable = [&] {
    size_t k = 0;
    for (const auto& g : groups) k += g.size();
    return k;
  }();
  for (auto& g : groups) {
    if (g.size() != 1) continue;
    if (capped[g.front()])
      res[g.front()].fallback = "the shared calls of this step are full (max_streams " +
                                std::to_string(options.max_streams) + ")";
    else if (batchable > 1)
      res[g.front()].fallback = "no other stream of this step shares its models, size and prompt-embedding shape";
    alone.push_back(g.front());
    g.clear();
  }
  std::sort(alone.begin(), alone.end());

  // The longest sleep a skipped call asked for (SimilarityFilterOptions::sleep_on_skip): slept once, at the end of a
  // step in which no call ran the models, so that a skip paces the caller as one stream's would but never stalls
  // the other streams' calls.
  double skip_sleep_s = 0;
  // A call on its own: the one-stream path itself (img2img() / txt2img() in their halves, for the deferred sleep).
  const auto run_alone = [&](size_t i) {
    StreamDiffusion& s = *calls[i].stream;
    const int64_t unet_before = s.stats().unet_calls;
    try {
      MultiStreamAccess::CallState c = MultiStreamAccess::begin(s, calls[i].images, calls[i].ready);
      if (c.done) {
        res[i].output = c.output;
        res[i].skipped = true;
        skip_sleep_s = std::max(skip_sleep_s, c.skip_sleep_s);
        return;
      }
      if (c.image.defined()) MultiStreamAccess::begin_latent(s, c, MultiStreamAccess::encode(s, c.image));
      res[i].output = MultiStreamAccess::complete(s, c);
      res[i].shared_with = s.stats().unet_calls > unet_before ? 1 : 0;
    } catch (...) {
      res[i].error = std::current_exception();
    }
  };

  for (const auto& g : groups) {
    if (g.empty()) continue;
    // First halves. A call the filter skips is answered here; one that throws fails alone.
    std::vector<size_t> active;
    std::vector<MultiStreamAccess::CallState> states(n);
    for (size_t i : g) {
      try {
        states[i] = MultiStreamAccess::begin(*calls[i].stream, calls[i].images, calls[i].ready);
        if (states[i].done) {
          res[i].output = states[i].output;
          res[i].skipped = true;
          skip_sleep_s = std::max(skip_sleep_s, states[i].skip_sleep_s);
        } else {
          active.push_back(i);
        }
      } catch (...) {
        res[i].error = std::current_exception();
      }
    }
    if (active.empty()) continue;

    const DiffusionModels& models = calls[active.front()].stream->models();
    // Through the shared CUDA graphs when every stream allows them; a host wait after each shared call only when
    // a stream asks for one (its timings then split encode, UNet and decode time exactly).
    bool graphs = options.graphs != nullptr, sync_each = false;
    for (size_t i : active) {
      graphs = graphs && MultiStreamAccess::wants_graphs(*calls[i].stream);
      sync_each = sync_each || calls[i].stream->config().sync_components;
    }
    if (graphs) MultiStreamAccess::bind(*options.graphs, MultiStreamAccess::models(*calls[active.front()].stream));
    const auto shared_call = [&](const std::string& name, const std::vector<Tensor>& inputs,
                                 const GraphCache::Fn& fn) {
      if (!graphs) return fn(inputs);
      return run_counted(MultiStreamAccess::cache(*options.graphs), name, inputs, fn, st);
    };

    // The img2img inputs' encode: one call for the group when the encode is a pure function of the image (TAESD);
    // the AutoencoderKL draws its posterior sample from each stream's Rng, so there each stream encodes its own.
    std::vector<size_t> to_encode;
    for (size_t i : active)
      if (states[i].image.defined()) to_encode.push_back(i);
    const auto fail = [&](size_t i, std::exception_ptr e) {
      res[i].error = e;
      active.erase(std::find(active.begin(), active.end(), i));
    };
    // A shared call that failed (a CUDA out-of-memory error at a large row count, say) is made again by each of its
    // streams alone, from where the shared call left them (nothing of theirs changed in it); a stream's call fails
    // only if its own call fails too. `why` goes to each call's StreamCallResult::fallback.
    const auto shared_failed = [&](const char* call, size_t streams, const std::exception_ptr& e) {
      const std::string why = "the shared " + std::string(call) + " of " + std::to_string(streams) +
                              " streams failed (" + message_of(e) + "); each stream made its own";
      // An out-of-memory group fails at every step until it shrinks: one warning per 10 s, the counter has them all.
      static log::Throttle throttle(std::chrono::seconds(10));
      int64_t held = 0;
      if (throttle.pass(held))
        log::warn("multi-stream: {}{}", why,
                  held > 0 ? " (and " + std::to_string(held) + " shared calls failed since the last warning)" : "");
      ++st.shared_call_failures;
      return why;
    };
    const auto encode_each = [&](const std::vector<size_t>& which, const std::string& why) {
      for (size_t i : which) {
        try {
          MultiStreamAccess::begin_latent(*calls[i].stream, states[i],
                                          MultiStreamAccess::encode(*calls[i].stream, states[i].image));
          if (!why.empty()) res[i].fallback = why;
        } catch (...) {
          fail(i, std::current_exception());
        }
      }
    };
    if (to_encode.size() >= 2 && models.deterministic_encode()) {
      Tensor z;  // [sum F, C, h, w]: the group's latents in to_encode order
      double enc_s = 0;
      std::exception_ptr shared_error;
      try {
        std::vector<Tensor> xs;
        for (size_t i : to_encode) xs.push_back(states[i].image);
        const Tensor x = torch::cat(xs, 0);  // [sum F, 3, H, W]
        const auto t0 = std::chrono::steady_clock::now();
        // A deterministic encode draws nothing from the Rng it is given.
        Rng& rng = MultiStreamAccess::rng(*calls[to_encode.front()].stream);
        z = shared_call("encode", {x}, [&models, &rng](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{models.encode_image(in[0], rng)};
        })[0];
        if (sync_each) sync(models);
        enc_s = seconds_since(t0);
        ++st.shared_encode_calls;
      } catch (...) {
        shared_error = std::current_exception();
        z = Tensor();
      }
      if (z.defined()) {
        int64_t off = 0;
        for (size_t i : to_encode) {
          const int64_t r = states[i].image.size(0);
          try {
            MultiStreamAccess::add_encode_time(*calls[i].stream,
                                               enc_s * static_cast<double>(r) / static_cast<double>(z.size(0)));
            MultiStreamAccess::begin_latent(*calls[i].stream, states[i], z.slice(0, off, off + r));
          } catch (...) {
            fail(i, std::current_exception());
          }
          off += r;
        }
      } else {
        encode_each(to_encode, shared_failed("encode", to_encode.size(), shared_error));
      }
    } else {
      encode_each(to_encode, "");
    }
    if (active.empty()) continue;

    // Its own UNet call, as one stream would make it: the others were skipped or failed, or the shared call failed.
    const auto complete_alone = [&](size_t i, const std::string& why) {
      try {
        res[i].output = MultiStreamAccess::complete(*calls[i].stream, states[i]);
        res[i].shared_with = 1;
        if (!why.empty()) res[i].fallback = why;
      } catch (...) {
        res[i].error = std::current_exception();
      }
    };
    if (active.size() == 1) {
      complete_alone(active.front(), "");
      continue;
    }

    // One UNet call over every stream's rows.
    Tensor pred;
    std::vector<int64_t> rows;
    int64_t total = 0;
    double unet_s = 0;
    std::exception_ptr shared_error;
    try {
      std::vector<Tensor> xs, ts, es, tes, tis;
      for (size_t i : active) {
        const StreamDiffusion& s = *calls[i].stream;
        const Tensor& ehs = MultiStreamAccess::embeds(s);
        const AddedConditioning& added = MultiStreamAccess::added(s);
        const int64_t r = states[i].x_in.size(0);
        if (states[i].t_in.size(0) != r || ehs.size(0) != r || (added.defined() && added.text_embeds.size(0) != r))
          throw Error("internal: UNet batch rows disagree for stream call " + std::to_string(i) + ": sample " +
                      shape_str(states[i].x_in.sizes()) + ", timesteps " + shape_str(states[i].t_in.sizes()) +
                      ", text " + shape_str(ehs.sizes()));
        rows.push_back(r);
        xs.push_back(states[i].x_in);
        ts.push_back(states[i].t_in);
        es.push_back(ehs);
        if (added.defined()) {
          tes.push_back(added.text_embeds);
          tis.push_back(added.time_ids);
        }
      }
      AddedConditioning added;
      if (!tes.empty()) added = {torch::cat(tes, 0), torch::cat(tis, 0)};
      const Tensor x = torch::cat(xs, 0);
      total = x.size(0);
      const auto t0 = std::chrono::steady_clock::now();
      // Inputs: sample [R, C, h, w], t [R], text rows [R, 77, D], SDXL's added conditioning (undefined for SD).
      pred = shared_call("unet", {x, torch::cat(ts, 0), torch::cat(es, 0), added.text_embeds, added.time_ids},
                         [&models](const std::vector<Tensor>& in) {
                           AddedConditioning a;
                           a.text_embeds = in[3];
                           a.time_ids = in[4];
                           return std::vector<Tensor>{models.unet(in[0], in[1], in[2], a, ControlResiduals{})};
                         })[0];
      if (sync_each) sync(models);
      unet_s = seconds_since(t0);
    } catch (...) {
      shared_error = std::current_exception();
      pred = Tensor();
    }
    if (!pred.defined()) {
      const std::string why = shared_failed("UNet call", active.size(), shared_error);
      for (size_t i : active) complete_alone(i, why);
      continue;
    }
    ++st.shared_unet_calls;
    st.batched_calls += static_cast<int64_t>(active.size());
    st.max_batch = std::max<int64_t>(st.max_batch, static_cast<int64_t>(active.size()));
    st.max_rows = std::max(st.max_rows, total);

    // Second halves on each stream's rows; from here a stream's state has moved on, so a failure is its call's.
    std::vector<size_t> done;
    std::vector<Tensor> latents;
    int64_t off = 0;
    for (size_t k = 0; k < active.size(); ++k) {
      const size_t i = active[k];
      StreamDiffusion& s = *calls[i].stream;
      const Tensor p = pred.slice(0, off, off + rows[k]);
      off += rows[k];
      const double share = unet_s * static_cast<double>(rows[k]) / static_cast<double>(total);
      try {
        MultiStreamAccess::record_unet(s, states[i], p, share);
        latents.push_back(MultiStreamAccess::finish_unet(s, states[i], p));
        done.push_back(i);
        res[i].shared_with = static_cast<int64_t>(active.size());
      } catch (...) {
        res[i].error = std::current_exception();
      }
    }

    // The decode: one call for the group (or one per stream, also when the shared one fails), then each stream's
    // bookkeeping.
    std::vector<Tensor> images(done.size());
    std::string decode_why;
    if (options.batch_decode && done.size() >= 2) {
      try {
        const auto t0 = std::chrono::steady_clock::now();
        const Tensor all = torch::cat(latents, 0);
        const Tensor img = shared_call("decode", {all}, [&models](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{models.decode_latent(in[0])};
        })[0];
        if (sync_each) sync(models);
        const double dec_s = seconds_since(t0);
        int64_t o = 0;
        for (size_t k = 0; k < done.size(); ++k) {
          const int64_t r = latents[k].size(0);
          images[k] = img.slice(0, o, o + r);
          o += r;
          MultiStreamAccess::add_decode_time(*calls[done[k]].stream,
                                             dec_s * static_cast<double>(r) / static_cast<double>(all.size(0)));
        }
      } catch (...) {
        decode_why = shared_failed("decode", done.size(), std::current_exception());
        for (auto& img : images) img = Tensor();
      }
    }
    for (size_t k = 0; k < done.size(); ++k) {
      const size_t i = done[k];
      try {
        if (!images[k].defined()) {
          images[k] = MultiStreamAccess::decode(*calls[i].stream, latents[k]);
          if (!decode_why.empty()) res[i].fallback = decode_why;
        }
        res[i].output = MultiStreamAccess::finish(*calls[i].stream, states[i], latents[k], images[k]);
      } catch (...) {
        res[i].output = Tensor();
        res[i].error = std::current_exception();
      }
    }
  }
  for (size_t i : alone) run_alone(i);

  for (size_t i = 0; i < n; ++i) {
    if (res[i].error) ++st.errors;
    else if (res[i].skipped) ++st.skipped;
    else if (res[i].shared_with == 1) ++st.own_calls;
  }
  if (st.own_calls > 0) st.max_batch = std::max<int64_t>(st.max_batch, 1);
  if (stats_out) stats_out->add(st);
  // No call of this step ran the models (all skipped, or failed): it paces its caller as one stream's skip would.
  if (skip_sleep_s > 0 &&
      std::none_of(res.begin(), res.end(), [](const StreamCallResult& r) { return r.shared_with > 0; }))
    std::this_thread::sleep_for(std::chrono::duration<double>(skip_sleep_s));
  return res;
}

std::vector<torch::Tensor> run_streams_batched(const std::vector<StreamCall>& calls,
                                               const MultiStreamOptions& options, MultiStreamStats* stats) {
  std::vector<StreamCallResult> res = run_stream_calls(calls, options, stats);
  std::vector<Tensor> out;
  for (auto& r : res) {
    if (r.error) std::rethrow_exception(r.error);
    out.push_back(std::move(r.output));
  }
  return out;
}

}  // namespace sd
