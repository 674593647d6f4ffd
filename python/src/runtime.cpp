// run_stream(): the real-time runtime of src/runtime (capture -> pre-process -> model -> post-process -> sink on
// their own threads, bounded queues) driven from Python.
//
// Threads and the GIL: the runtime runs on a thread of its own while the calling Python thread waits with the GIL
// released, waking every 50 ms to run Python's signal handlers (PyErr_CheckSignals). Ctrl-C (SIGINT ->
// KeyboardInterrupt, or any exception a signal handler raises) therefore stops the stream cleanly — queues cancelled,
// every thread joined, the sink closed — and is then re-raised in the caller. The per-frame callback runs on the
// runtime's sink thread, holding the GIL only while it runs; an exception in it stops the stream the same way and is
// re-raised by run_stream.
#include <condition_variable>
#include <iostream>
#include <mutex>
#include <shared_mutex>
#include <thread>

#include "core/error.h"
#include "py_common.h"
#include "py_stream.h"

#ifdef SD_PY_HAVE_RUNTIME
#include <opencv2/imgproc.hpp>

#include "runtime/control_command.h"
#include "runtime/control_preprocessor.h"
#include "runtime/frame_sink.h"
#include "runtime/frame_source.h"
#include "runtime/stream_diffusion_processor.h"
#include "runtime/stream_runtime.h"
#endif

namespace sdpy {

#ifdef SD_PY_HAVE_RUNTIME
namespace {

struct CallbackState {
  py::object* callback = nullptr;  // owned by run_stream's frame; used only with the GIL held
  sd::StreamRuntime* runtime = nullptr;
  std::unique_ptr<py::error_already_set> error;  // guarded by the GIL
};

// The output frame (BGR 8UC3) as an RGB uint8 [H, W, 3] tensor (one copy; the runtime reuses its buffers).
at::Tensor frame_rgb(const sd::Frame& f) {
  cv::Mat rgb;
  cv::cvtColor(f.image, rgb, cv::COLOR_BGR2RGB);
  return torch::from_blob(rgb.data, {rgb.rows, rgb.cols, 3}, torch::kUInt8).clone();
}

void on_output(CallbackState& st, const sd::Frame& f) {
  at::Tensor rgb = frame_rgb(f);  // without the GIL
  py::gil_scoped_acquire gil;
  if (st.error) return;
  try {
    py::object r = (*st.callback)(wrap(std::move(rgb)), f.index);
    if (r.is_none()) return;
    if (py::isinstance<py::str>(r)) {
      // A control command line ("prompt rocket", "guidance 1.4", "quit", ...), applied before the next frame.
      auto cmd = sd::parse_control_command(r.cast<std::string>());
      if (cmd)
        st.runtime->post_control(*cmd, [](const std::string& reply) {
          if (reply.rfind("error", 0) == 0) std::cerr << "run_stream: control refused: " << reply << std::endl;
        });
    } else if (!r.cast<bool>()) {
      st.runtime->request_stop("callback returned False");
    }
  } catch (py::error_already_set& e) {
    st.error = std::make_unique<py::error_already_set>(std::move(e));
    st.runtime->request_stop("the Python callback raised");
  } catch (const sd::InvalidArgument& e) {  // a control line that does not parse
    PyErr_SetString(py::module_::import("streamdiffusion_cpp._core").attr("InvalidArgument").ptr(), e.what());
    st.error = std::make_unique<py::error_already_set>();
    st.runtime->request_stop("the Python callback returned a bad control line");
  } catch (const std::exception& e) {
    st.error = std::make_unique<py::error_already_set>(
        (PyErr_SetString(PyExc_RuntimeError, e.what()), py::error_already_set()));
    st.runtime->request_stop("the Python callback raised");
  }
}

// The processor's model-thread calls under the Python Stream's lock (py_stream.h), so that a Python thread may call
// the stream's setters while run_stream runs it: they wait for the frame in progress. The pre- and post-process
// calls touch no state process() changes (frame_processor.h) and run unlocked. The runtime's threads never hold
// the GIL, so the lock is never waited for while holding it.
//
// Frames also hold the model set's weights lock shared, and the commands that change the shared weights (`lora`,
// `ip_adapter_scale`) hold it exclusively, as Models' setters do (py_stream.h).
class LockedProcessor : public sd::FrameProcessor {
 public:
  LockedProcessor(std::shared_ptr<sd::FrameProcessor> p, std::shared_ptr<std::mutex> mu,
                  std::shared_ptr<WeightsMutex> weights_mu)
      : p_(std::move(p)), mu_(std::move(mu)), weights_mu_(std::move(weights_mu)) {}
  int64_t width() const override { return p_->width(); }
  int64_t height() const override { return p_->height(); }
  bool takes_images() const override { return p_->takes_images(); }
  bool takes_image_prompts() const override { return p_->takes_image_prompts(); }
  torch::Tensor preprocess(const torch::Tensor& rgb_u8) override { return p_->preprocess(rgb_u8); }
  void preprocess_controls(sd::Frame& frame, const torch::Tensor& input, const torch::Tensor& control) override {
    p_->preprocess_controls(frame, input, control);
  }
  std::vector<sd::Frame> process(sd::Frame in) override {
    std::lock_guard<std::mutex> lock(*mu_);
    std::shared_lock<WeightsMutex> weights(*weights_mu_);
    return p_->process(std::move(in));
  }
  std::vector<sd::Frame> flush() override {
    std::lock_guard<std::mutex> lock(*mu_);
    std::shared_lock<WeightsMutex> weights(*weights_mu_);
    return p_->flush();
  }
  torch::Tensor postprocess(const torch::Tensor& out) override { return p_->postprocess(out); }
  void begin_postprocess(sd::Frame& out) override {
    std::lock_guard<std::mutex> lock(*mu_);
    p_->begin_postprocess(out);
  }
  std::vector<sd::Frame> apply(const sd::ControlCommand& command) override {
    using K = sd::ControlCommand::Kind;
    std::lock_guard<std::mutex> lock(*mu_);
    if (command.kind == K::Lora || command.kind == K::IpAdapterScale) {
      std::unique_lock<WeightsMutex> weights(*weights_mu_);
      return p_->apply(command);
    }
    std::shared_lock<WeightsMutex> weights(*weights_mu_);  // a prompt change runs the text encoder
    return p_->apply(command);
  }
  int64_t skipped() const override { return p_->skipped(); }
  int64_t latency_frames() const override {
    std::lock_guard<std::mutex> lock(*mu_);
    return p_->latency_frames();
  }
  std::string describe() const override { return p_->describe(); }

 private:
  std::shared_ptr<sd::FrameProcessor> p_;
  std::shared_ptr<std::mutex> mu_;
  std::shared_ptr<WeightsMutex> weights_mu_;
};

py::object json_to_py(const nlohmann::json& j) {
  return py::module_::import("json").attr("loads")(j.dump());
}

}  // namespace
#endif

void bind_runtime(py::module_& m) {
#ifdef SD_PY_HAVE_RUNTIME
  m.attr("HAVE_RUNTIME") = true;
  m.def(
      "run_stream",
      [](std::shared_ptr<PyStream> s, const std::string& source, const std::string& sink, py::object callback,
         const std::string& mode, int64_t max_frames, double fps, bool realtime, bool loop, const std::string& resize,
         std::optional<std::pair<int64_t, int64_t>> input_size, double output_fps, double status_interval,
         std::vector<std::string> control_preprocessors, const std::string& control_input,
         const std::string& image_prompt_input, int64_t image_prompt_every, double image_prompt_change) {
        if (!s) throw sd::InvalidArgument("run_stream: call stream.prepare(prompt) first");
        // The prompts the processor starts from: GIL-protected, so read before the GIL is let go.
        const std::string prompt = s->prompt, negative_prompt = s->negative_prompt;
        sd::SourceOptions so;
        so.fps = fps;
        so.realtime = realtime;
        so.loop = loop;
        if (input_size) std::tie(so.width, so.height) = *input_size;
        sd::StreamOptions ro;
        ro.mode = sd::parse_stream_mode(mode);
        ro.resize = sd::parse_resize_mode(resize);
        ro.max_frames = max_frames;
        ro.status_interval_s = status_interval;
        ro.stop_on_signal = false;  // Python owns SIGINT: see the file comment
        if (!callback.is_none() && !PyCallable_Check(callback.ptr()))
          throw py::type_error("run_stream: callback must be callable(image, index) or None");

        std::unique_ptr<sd::StreamRuntime> rt;
        CallbackState st;
        st.callback = &callback;
        {
          py::gil_scoped_release release;
          std::lock_guard<std::mutex> setup_lock(*s->mu);  // the processor reads the stream (py_stream.h)
          if (!s->stream->prepared()) throw sd::InvalidArgument("run_stream: call stream.prepare(prompt) first");
          auto src = sd::open_source(source, so);
          const bool txt2img = !src->has_images();
          sd::SinkOptions sk;
          sk.fps = output_fps > 0 ? output_fps : (src->fps() > 0 ? src->fps() : 30.0);
          auto snk = sd::open_sink(sink, sk);
          auto proc = std::make_shared<sd::StreamDiffusionProcessor>(s->stream, prompt, negative_prompt, txt2img);
          // Second sources read with the input: raw frames are stdin only, hence no input_size for them.
          sd::SourceOptions second = so;
          second.width = second.height = 0;
          std::unique_ptr<sd::FrameSource> control_src, image_prompt_src;
          if (!control_input.empty()) {
            if (s->stream->controlnets().empty())
              throw sd::InvalidArgument("run_stream: control_input needs ControlNets (stream.set_controlnets)");
            control_src = sd::open_source(control_input, second);
          }
          const size_t n_cn = s->stream->controlnets().size();
          if (!control_preprocessors.empty() || control_src) {
            // One name per ControlNet, or one for all; a second source alone: passthrough. Neither: the control images
            // set on the stream stay (stream.set_control_image).
            if (control_preprocessors.empty()) control_preprocessors = {"passthrough"};
            if (control_preprocessors.size() == 1 && n_cn > 1) control_preprocessors.resize(n_cn, control_preprocessors[0]);
            if (control_preprocessors.size() != n_cn)
              throw sd::InvalidArgument("run_stream: control_preprocessors has " +
                                        std::to_string(control_preprocessors.size()) + " names for " +
                                        std::to_string(n_cn) + " ControlNets (give one, or one per ControlNet)");
            std::vector<std::shared_ptr<const sd::ControlPreprocessor>> pre;
            for (const auto& name : control_preprocessors) pre.push_back(sd::make_control_preprocessor(name));
            proc->set_control_preprocessors(std::move(pre), control_src != nullptr);
          }
          if (!image_prompt_input.empty()) image_prompt_src = sd::open_source(image_prompt_input, second);
          proc->set_image_prompt_change(image_prompt_change);
          if (!callback.is_none()) ro.on_output = [&st](const sd::Frame& f) { on_output(st, f); };
          auto locked_proc = std::make_shared<LockedProcessor>(proc, s->mu, s->weights_mu);
          rt = std::make_unique<sd::StreamRuntime>(std::move(src), std::move(locked_proc), std::move(snk), ro);
          if (control_src) rt->set_control_source(std::move(control_src));
          if (image_prompt_src) rt->set_image_prompt_source(std::move(image_prompt_src), image_prompt_every);
        }
        st.runtime = rt.get();

        std::mutex mu;
        std::condition_variable cv;
        bool done = false;
        std::exception_ptr failure;
        std::thread worker([&] {
          try {
            rt->run();
          } catch (...) {
            failure = std::current_exception();
          }
          std::lock_guard<std::mutex> lock(mu);
          done = true;
          cv.notify_all();
        });
        std::unique_ptr<py::error_already_set> interrupt;
        for (;;) {
          {
            py::gil_scoped_release release;
            std::unique_lock<std::mutex> lock(mu);
            cv.wait_for(lock, std::chrono::milliseconds(50), [&] { return done; });
            if (done) break;
          }
          if (PyErr_CheckSignals() != 0) {
            interrupt = std::make_unique<py::error_already_set>();  // fetches KeyboardInterrupt
            rt->request_stop("interrupted (" + std::string(interrupt->type() ? py::str(interrupt->type().attr("__name__")).cast<std::string>() : "signal") + ")");
            break;
          }
        }
        {
          py::gil_scoped_release release;
          worker.join();
        }
        if (interrupt) {
          interrupt->restore();
          throw py::error_already_set();
        }
        if (st.error) {
          st.error->restore();
          throw py::error_already_set();
        }
        if (failure) std::rethrow_exception(failure);
        return json_to_py(rt->summary());
      },
      py::arg("stream"), py::arg("source") = "none", py::arg("sink") = "none", py::kw_only(),
      py::arg("callback") = py::none(), py::arg("mode") = "auto", py::arg("max_frames") = 0, py::arg("fps") = 0.0,
      py::arg("realtime") = false, py::arg("loop") = false, py::arg("resize") = "crop",
      py::arg("input_size") = py::none(), py::arg("output_fps") = 0.0, py::arg("status_interval") = 0.0,
      py::arg("control_preprocessors") = std::vector<std::string>{}, py::arg("control_input") = "",
      py::arg("image_prompt_input") = "", py::arg("image_prompt_every") = 1, py::arg("image_prompt_change") = 1.0,
      R"doc(
Runs a prepared Stream in the real-time runtime until the source ends, max_frames are read, the callback stops it or
Ctrl-C (KeyboardInterrupt, re-raised after a clean stop). The GIL is released while the engine works.

source: "none" (txt2img ticks), a video file, an image folder, "camera[:N]", "screen[:x,y,w,h]", "-" (raw rgb24 on
stdin, input_size=(w, h)). sink: "none", "window", a video file, a folder or "out/%05d.png", "-" (raw rgb24).
callback(image, index): each output frame as a uint8 RGB [H, W, 3] Tensor and its input index, on the sink thread;
return None / True to go on, False to stop, or a control line ("prompt rocket", "guidance 1.4", "t_index_list 32,45",
"seed 3", "filter on", "quit") applied before the next frame. mode: "auto" | "live" | "lossless". fps: tick /
screen / folder rate.
ControlNets (stream.set_controlnets): control_preprocessors names each one's preprocessor ("canny[:LOW:HIGH]", "gray",
"passthrough", "feedback"; one name for all) run on each input frame, or on control_input's frames (passthrough when
no name is given); without either, the control images set with stream.set_control_image stay;
control_input is a second source read in step with the input (when it ends, the input ends).
IP-Adapter: image_prompt_input is a source of image prompts read every image_prompt_every input frames and encoded
only when it changed by more than image_prompt_change (mean absolute difference in uint8 levels); when it ends the
last image prompt stays.
Returns the runtime's summary (frames in/out, dropped, fps, latency, stop_reason, image_prompt_source, ...).
)doc");
#else
  m.attr("HAVE_RUNTIME") = false;
  m.def("run_stream", [](py::args, py::kwargs) -> py::object {
    throw sd::Error("run_stream: this build has no runtime (engine-only build without OpenCV)");
  });
#endif
}

}  // namespace sdpy
