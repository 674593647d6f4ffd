// Many streams, one UNet call, from Python: streamdiffusion_cpp.StreamBatcher runs one call of each of several
// Streams with their UNet rows in ONE UNet call (pipeline/multi_stream.h: the engine's run_stream_calls, as `serve`
// batches its clients), keeping the shared calls' CUDA graphs and the counters across steps.
#include <algorithm>
#include <mutex>
#include <shared_mutex>

#include <pybind11/stl.h>

#include "core/error.h"
#include "pipeline/multi_stream.h"
#include "py_common.h"
#include "py_stream.h"

namespace sdpy {

namespace {

struct PyBatcher {
  sd::MultiStreamOptions options;
  sd::SharedGraphs graphs;
  sd::MultiStreamStats stats;
};

py::dict stats_dict(const sd::MultiStreamStats& s) {
  py::dict d;
  s.for_each([&d](const char* name, int64_t value) { d[name] = value; });
  return d;
}

// One entry of run()'s list: a Stream (txt2img), or (stream, images) with images None for txt2img.
std::pair<std::shared_ptr<PyStream>, at::Tensor> call_of(py::handle item, size_t index) {
  const std::string where = "StreamBatcher.run: calls[" + std::to_string(index) + "]";
  if (py::isinstance<PyStream>(item)) return {item.cast<std::shared_ptr<PyStream>>(), at::Tensor()};
  if (py::isinstance<py::tuple>(item) || py::isinstance<py::list>(item)) {
    const py::sequence seq = py::reinterpret_borrow<py::sequence>(item);
    if (seq.size() == 2 && py::isinstance<PyStream>(seq[0])) {
      const std::string what = where + "[1] (images)";
      return {seq[0].cast<std::shared_ptr<PyStream>>(),
              seq[1].is_none() ? at::Tensor() : to_tensor(seq[1], what.c_str())};
    }
  }
  throw sd::InvalidArgument(where + " is a " + std::string(py::str(item.get_type().attr("__name__"))) +
                            "; expected a Stream (txt2img) or a (Stream, images or None) pair");
}

}  // namespace

void bind_batch(py::module_& m) {
  using Rel = py::gil_scoped_release;
  py::class_<PyBatcher>(m, "StreamBatcher", R"doc(
Many streams, one UNet call: run([...]) makes one call of each Stream given - img2img with its images, or txt2img -
and runs the UNet rows of all the streams that can share a call (same models, size and prompt-embedding shape) in
ONE UNet call, with one TAESD encode and one decode for the group, as `serve` batches its clients. Each stream keeps
its own timesteps, prompt, RCFG state, noise and similarity filter: the outputs equal one call per stream up to the
floating-point differences of a larger batch. Streams that cannot share (sequential mode, ControlNets, the deep
cache) run their own call. Keep one batcher across steps: it holds the shared calls' CUDA graphs and the counters.
A batcher is not thread-safe (drive it from one thread); its streams may be used from other threads meanwhile (a
run waits for their calls in progress, and they for it).
)doc")
      .def(py::init([](int64_t max_streams, bool batch_decode) {
             if (max_streams < 0)
               throw sd::InvalidArgument("StreamBatcher: max_streams must be >= 0 (0 = no limit), got " +
                                         std::to_string(max_streams));
             auto b = std::make_unique<PyBatcher>();
             b->options.max_streams = max_streams;
             b->options.batch_decode = batch_decode;
             b->options.graphs = &b->graphs;
             return b;
           }),
           py::kw_only(), py::arg("max_streams") = 0, py::arg("batch_decode") = true,
           "max_streams: most streams in one UNet call (0 = no limit; larger groups are split in order); "
           "batch_decode: one decode for the group (else one per stream).")
      .def(
          "run",
          [](PyBatcher& b, const py::sequence& calls, bool return_exceptions) {
            std::vector<std::shared_ptr<PyStream>> keep;  // the streams stay alive while the GIL is released
            std::vector<sd::StreamCall> engine_calls;
            for (size_t i = 0; i < calls.size(); ++i) {
              auto [stream, images] = call_of(calls[i], i);
              engine_calls.push_back({stream->stream.get(), images});
              keep.push_back(std::move(stream));
            }
            std::vector<sd::StreamCallResult> results;
            {
              Rel r;
              // Every stream's lock (py_stream.h), GIL released first, taken in one order (by address) so that two
              // batchers sharing streams cannot deadlock.
              std::vector<std::mutex*> mus;
              for (const auto& k : keep) mus.push_back(k->mu.get());
              std::sort(mus.begin(), mus.end());
              mus.erase(std::unique(mus.begin(), mus.end()), mus.end());
              std::vector<std::unique_lock<std::mutex>> locks;
              for (std::mutex* mu : mus) locks.emplace_back(*mu);
              // Then their model sets' weights, shared (after the streams' locks, as py_stream.h orders them).
              std::vector<WeightsMutex*> wmus;
              for (const auto& k : keep) wmus.push_back(k->weights_mu.get());
              std::sort(wmus.begin(), wmus.end());
              wmus.erase(std::unique(wmus.begin(), wmus.end()), wmus.end());
              std::vector<std::shared_lock<WeightsMutex>> weight_locks;
              for (WeightsMutex* mu : wmus) weight_locks.emplace_back(*mu);
              results = sd::run_stream_calls(engine_calls, b.options, &b.stats);
            }
            py::list out;
            for (auto& res : results) {
              if (!res.error) {
                out.append(wrap(std::move(res.output)));
              } else if (return_exceptions) {
                out.append(exception_object(res.error));
              } else {
                std::rethrow_exception(res.error);
              }
            }
            return out;
          },
          py::arg("calls"), py::kw_only(), py::arg("return_exceptions") = false, R"doc(
One call of each stream in `calls`: a Stream (txt2img) or a (Stream, images) pair, images as Stream.img2img takes
them (None: txt2img). A stream may appear once. Returns the outputs in order, as each stream's own img2img() /
txt2img() would. A call that fails (bad input, unprepared stream) fails alone; with return_exceptions=False the first
failure is raised after every call ran, else its entry is the exception (as asyncio.gather).
)doc")
      .def_property_readonly(
          "stats", [](const PyBatcher& b) { return stats_dict(b.stats); },
          "Counters since the batcher was made: steps, stream_calls, shared_unet_calls (UNet calls over >= 2 streams), "
          "shared_encode_calls, batched_calls (stream calls in a shared call), own_calls, skipped, errors, max_batch, "
          "max_rows, graph_captures, graph_replays, graph_failures (CUDA graphs of the shared calls: captures that "
          "failed run eagerly), shared_call_failures "
          "(shared calls that failed; each stream then made its own).")
      .def_property_readonly("max_streams", [](const PyBatcher& b) { return b.options.max_streams; });
}

}  // namespace sdpy
