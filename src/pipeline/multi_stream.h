#pragma once
// Many streams, one UNet call. run_stream_calls() makes one stream call (img2img or txt2img) for each of several
// StreamDiffusion objects that share one DiffusionModels, running the UNet rows of all of them in ONE UNet call:
//
//   per stream   the first half of its call (StreamDiffusion::begin_img2img / begin_txt2img): input checks,
//                similarity filter, encode, add noise, the stream batch [new rows; buffer], the RCFG shift and the
//                UNet row layout of its cfg type (spec §3.2 steps 1-5, §4.1); the img2img inputs of the group are
//                encoded in ONE call when the encode is deterministic (TAESD)
//   shared       cat of every stream's rows (latents, timesteps, prompt embeddings, SDXL added conditioning) ->
//                one DiffusionModels::unet call -> split back by each stream's row count
//   per stream   guidance / RCFG update, LCM denoise, buffer update (StreamDiffusion::finish_unet)
//   shared       one decode of every stream's output latents (MultiStreamOptions::batch_decode), split
//   per stream   output, latent feedback, counters (StreamDiffusion::finish_call)
//
// Each row keeps its own timestep, prompt embeddings, RCFG state, noise and Rng: the halves are the very code the
// one-stream img2img() / txt2img() run, so the outputs equal one-by-one calls up to the UNet's and decoder's
// floating-point differences between batch sizes (tests/pipeline/test_multi_stream.cpp measures them).
//
// Streams share a UNet call when they have the same models object, latent size and prompt-embedding shape
// (text length, IP-Adapter tokens, width; dtype and device come with the models). A stream runs its own call
// (the plain one-stream path, counted in StreamCallResult::fallback) when StreamDiffusion::batch_blocker() names a
// reason - sequential mode, ControlNets, the deep-feature cache - or when no other stream of the step is compatible.
// A call the similarity filter skips returns the previous output without any model call; its sleep
// (SimilarityFilterOptions::sleep_on_skip) is slept once, at the end of a step in which no call ran the models, never
// while other streams' calls wait. With an AutoencoderKL the encode stays per stream (it draws its posterior noise
// from each stream's own Rng).
//
// CUDA graphs (MultiStreamOptions::graphs): on a CUDA device the group's encode, UNet call and decode are recorded once
// per row count (core/cuda_graph.h) and replayed after, like the one-stream path's own calls; no host wait inside a
// step unless a stream asks for it (StreamConfig::sync_components).
//
// Errors are per call: a bad input (shape, unprepared stream, the same stream twice) fails that call only, before
// it changes anything. A shared encode, UNet call or decode that fails (a CUDA out-of-memory error at a large row
// count, say) is made again by each of its streams alone, from where the shared call left them (nothing of theirs
// changed in it), so the outputs are the one-by-one outputs; a call fails only if its own call fails too
// (StreamCallResult::fallback says why it ran alone, MultiStreamStats::shared_call_failures counts them, and the log
// has a warning). After the shared UNet call a stream's failure is its own call's (its buffer has moved on).
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include <torch/types.h>

#include "core/cuda_graph.h"
#include "pipeline/stream_diffusion.h"

namespace sd {

struct StreamCall {
  StreamDiffusion* stream = nullptr;
  torch::Tensor images;  // img2img: what StreamDiffusion::img2img takes; undefined: txt2img
  InputReady ready = InputReady::queued;  // as StreamDiffusion::img2img's
};

struct StreamCallResult {
  torch::Tensor output;      // what img2img() / txt2img() would return
  std::exception_ptr error;  // set (and output undefined) when this call failed
  bool skipped = false;      // answered by the similarity filter (no model call)
  int64_t shared_with = 0;   // streams in the UNet call that ran its rows (1 = its own call; 0 = none ran)
  std::string fallback;      // why it ran alone, or made its encode or decode alone, while other streams were batched
                             // (or after their shared call failed); "" otherwise
};

// The CUDA graphs of the shared calls: the caller keeps one across steps (serve's model worker, bench) and passes it
// in MultiStreamOptions::graphs. A group goes through it when every one of its streams has graphs on
// (StreamConfig::cuda_graphs, no trace, no IP-Adapter image prompt); a graph per (call, row count), recorded on the
// second call of a shape. Off a CUDA device those calls run eagerly (counts().eager). Its graphs are dropped when the
// group's model set differs from the last one's, or when that set's weights were replaced (a LoRA re-fused).
class SharedGraphs {
 public:
  explicit SharedGraphs(size_t max_graphs = 16) : cache_(max_graphs) {}
  GraphCache::Counts counts() const { return cache_.counts(); }
  void clear() { cache_.clear(); }

 private:
  friend struct MultiStreamAccess;
  GraphCache cache_;
  std::weak_ptr<const DiffusionModels> models_;
  uint64_t weights_version_ = 0;
};

struct MultiStreamOptions {
  int64_t max_streams = 0;   // most streams in one UNet call (0 = no limit); larger groups are split in order
  bool batch_decode = true;  // one decode for the group's output latents (else one per stream)
  SharedGraphs* graphs = nullptr;  // CUDA graphs of the shared UNet call and decode (null: they run eagerly)
};

// Counters of one or more run_stream_calls steps (added up by the caller, e.g. serve's model worker).
struct MultiStreamStats {
  int64_t steps = 0;            // run_stream_calls invocations
  int64_t stream_calls = 0;     // calls given
  int64_t shared_unet_calls = 0;  // UNet calls that ran the rows of >= 2 streams
  int64_t batched_calls = 0;    // stream calls whose rows ran in such a shared call
  int64_t own_calls = 0;        // stream calls that ran their own UNet call(s)
  int64_t skipped = 0;          // answered by the similarity filter
  int64_t errors = 0;
  int64_t max_batch = 0;        // most streams in one UNet call so far
  int64_t max_rows = 0;         // most UNet rows in one call so far
  int64_t shared_encode_calls = 0;  // encodes of >= 2 streams' img2img inputs in one call (TAESD)
  int64_t graph_captures = 0;   // shared encode / UNet / decode calls recorded as CUDA graphs (SharedGraphs)
  int64_t graph_replays = 0;    // shared encode / UNet / decode calls answered by a replay
  int64_t graph_failures = 0;   // captures of shared calls that failed (that key then runs eagerly)
  int64_t shared_call_failures = 0;  // shared encode / UNet / decode calls that failed (each stream then made its own)
  void add(const MultiStreamStats& o);
  // Calls f(name, value) for every counter, in declaration order (reports: Python's StreamBatcher.stats).
  template <class F>
  void for_each(F&& f) const {
    f("steps", steps);
    f("stream_calls", stream_calls);
    f("shared_unet_calls", shared_unet_calls);
    f("batched_calls", batched_calls);
    f("own_calls", own_calls);
    f("skipped", skipped);
    f("errors", errors);
    f("max_batch", max_batch);
    f("max_rows", max_rows);
    f("shared_encode_calls", shared_encode_calls);
    f("graph_captures", graph_captures);
    f("graph_replays", graph_replays);
    f("graph_failures", graph_failures);
    f("shared_call_failures", shared_call_failures);
  }
};

// One stream call per entry (see the header comment). `stats`, when given, is added to.
std::vector<StreamCallResult> run_stream_calls(const std::vector<StreamCall>& calls,
                                               const MultiStreamOptions& options = {},
                                               MultiStreamStats* stats = nullptr);

// run_stream_calls, then the outputs in order; rethrows the first call's error.
std::vector<torch::Tensor> run_streams_batched(const std::vector<StreamCall>& calls,
                                               const MultiStreamOptions& options = {},
                                               MultiStreamStats* stats = nullptr);

// "" when streams a and b can share UNet calls, else why not (the first difference found): either one's
// batch_blocker(), different models, latent size or prompt-embedding shape.
std::string batch_incompatibility(const StreamDiffusion& a, const StreamDiffusion& b);

}  // namespace sd
