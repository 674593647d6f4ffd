#pragma once
// Helpers for the runtime tests: synthetic videos whose frames carry their index in their pixels, a stub
// FrameProcessor with a StreamDiffusion-like delay line, in-memory sources and sinks.
#include <atomic>
#include <chrono>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>
#include <opencv2/videoio.hpp>
#include <torch/torch.h>

#include "core/error.h"
#include "runtime/frame_processor.h"
#include "runtime/frame_sink.h"
#include "runtime/frame_source.h"
#include "runtime/stream_runtime.h"

namespace sd::test {

// Runtime options without the periodic status line (the tests read the summary instead).
inline StreamOptions quiet(StreamOptions o = {}) {
  o.status_interval_s = 0;
  return o;
}

// A 4x4 grid of black/white cells = the 16 bits of `index` (bit 0 top-left), robust to JPEG compression.
inline cv::Mat index_frame(int index, int width, int height) {
  cv::Mat m(height, width, CV_8UC3, cv::Scalar(0, 0, 0));
  for (int b = 0; b < 16; ++b) {
    const int r = b / 4, c = b % 4;
    if ((index >> b) & 1)
      cv::rectangle(m, cv::Rect(c * width / 4, r * height / 4, width / 4, height / 4), cv::Scalar(255, 255, 255),
                    cv::FILLED);
  }
  return m;
}

// Reads the index back (cells averaged, threshold at mid-grey); `invert` for a processor that inverts colours.
inline int decode_index(const cv::Mat& m, bool invert = false) {
  int index = 0;
  for (int b = 0; b < 16; ++b) {
    const int r = b / 4, c = b % 4;
    // The centre half of the cell: away from compression ringing at the edges.
    const cv::Rect cell(c * m.cols / 4 + m.cols / 16, r * m.rows / 4 + m.rows / 16, m.cols / 8, m.rows / 8);
    const double v = cv::mean(m(cell))[0];
    if ((v > 128) != invert) index |= 1 << b;
  }
  return index;
}

// Writes an MJPG .avi of `n` index frames. Returns the path.
inline std::string write_index_video(const std::string& path, int n, int width = 64, int height = 64,
                                     double fps = 25) {
  cv::VideoWriter w(path, cv::CAP_FFMPEG, cv::VideoWriter::fourcc('M', 'J', 'P', 'G'), fps, cv::Size(width, height));
  if (!w.isOpened()) throw Error("test: cannot write " + path);
  for (int i = 0; i < n; ++i) w.write(index_frame(i, width, height));
  w.release();
  return path;
}

inline std::vector<cv::Mat> read_video(const std::string& path) {
  cv::VideoCapture cap(path, cv::CAP_FFMPEG);
  std::vector<cv::Mat> frames;
  cv::Mat f;
  while (cap.read(f)) frames.push_back(f.clone());
  return frames;
}

// A FrameProcessor that returns its input (optionally inverted) `latency` calls later, like StreamDiffusion with
// n = latency + 1: warm-up outputs are swallowed and flush() emits the frames in flight. Records the control
// commands with the index of the frame they were applied before; can sleep per frame (a slow model) and throw at a
// given frame (a model error).
class StubProcessor : public FrameProcessor {
 public:
  StubProcessor(int64_t latency, int64_t width = 0, int64_t height = 0, bool images = true)
      : latency_(latency), width_(width), height_(height), images_(images) {}

  std::chrono::milliseconds delay{0};
  int64_t throw_at = -1;
  bool invert = false;
  int64_t slow_at = -1;  // this frame takes slow_delay instead of delay (a stall)
  std::chrono::milliseconds slow_delay{0};

  int64_t width() const override { return width_; }
  int64_t height() const override { return height_; }
  bool takes_images() const override { return images_; }

  std::vector<Frame> process(Frame in) override {
    if (in.index == throw_at) throw InvalidArgument("stub model failure at frame " + std::to_string(in.index));
    if (in.index == slow_at)
      std::this_thread::sleep_for(slow_delay);
    else if (delay.count() > 0)
      std::this_thread::sleep_for(delay);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      processed_.push_back(in.index);
    }
    last_ = in;
    return step(std::move(in));
  }

  std::vector<Frame> flush() override {
    std::vector<Frame> outs;
    auto real_in_flight = [&] {
      for (const auto& f : in_flight_)
        if (f.index >= 0) return true;
      return false;
    };
    while (real_in_flight()) {
      Frame pad = last_;
      pad.index = -1;  // a padding frame: its own output is never emitted
      for (auto& o : step(pad)) outs.push_back(std::move(o));
    }
    return outs;
  }

  std::vector<Frame> apply(const ControlCommand& c) override {
    if (c.kind == ControlCommand::Kind::Guidance && c.number > 100) throw InvalidArgument("stub: guidance too large");
    std::lock_guard<std::mutex> lock(mutex_);
    applied_.push_back({processed_.size(), c.line});
    if (c.kind == ControlCommand::Kind::Guidance) guidance = c.number;
    return {};
  }

  int64_t latency_frames() const override { return latency_; }
  std::string describe() const override { return "stub (latency " + std::to_string(latency_) + ")"; }

  std::vector<int64_t> processed() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return processed_;
  }
  // (number of frames processed before the command, command line)
  std::vector<std::pair<size_t, std::string>> applied() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return applied_;
  }
  double guidance = 1.0;

 private:
  std::vector<Frame> step(Frame in) {
    Frame out = in;
    if (in.tensor.defined() && invert) out.tensor = 255 - in.tensor;
    in_flight_.push_back(std::move(out));
    std::vector<Frame> ready;
    if (static_cast<int64_t>(in_flight_.size()) > latency_) {
      Frame f = std::move(in_flight_.front());
      in_flight_.pop_front();
      if (f.index >= 0) {
        if (!f.tensor.defined()) f.tensor = torch::zeros({8, 8, 3}, torch::kUInt8);  // ticks
        ready.push_back(std::move(f));
      }
    }
    return ready;
  }

  int64_t latency_, width_, height_;
  bool images_;
  std::deque<Frame> in_flight_;
  Frame last_;
  mutable std::mutex mutex_;
  std::vector<int64_t> processed_;
  std::vector<std::pair<size_t, std::string>> applied_;
};

// An endless (or `count`-long) source of index frames, as fast as it is read, optionally flagged live.
class SyntheticSource : public FrameSource {
 public:
  SyntheticSource(int64_t count, bool live, int width = 64, int height = 64, double fps = 0)
      : count_(count), live_(live), width_(width), height_(height), pacer_(fps) {}
  bool read(cv::Mat& image, const std::atomic<bool>& stop) override {
    if (count_ >= 0 && n_ >= count_) return false;
    if (!pacer_.wait(stop)) return false;
    image = index_frame(static_cast<int>(n_++ % 65536), width_, height_);
    return true;
  }
  bool live() const override { return live_; }
  std::string describe() const override { return "synthetic"; }
  int64_t delivered() const { return n_; }

 private:
  int64_t count_;
  bool live_;
  int width_, height_;
  int64_t n_ = 0;
  FramePacer pacer_;
};

// Keeps the frames written; can fail at a given frame and be slow.
class MemorySink : public FrameSink {
 public:
  int64_t fail_at = -1;
  std::chrono::milliseconds delay{0};
  void write(const cv::Mat& image, const std::atomic<bool>&) override {
    if (static_cast<int64_t>(frames.size()) == fail_at) throw Error("memory sink: disk full (simulated)");
    if (delay.count() > 0) std::this_thread::sleep_for(delay);
    frames.push_back(image.clone());
  }
  void close() override { closed = true; }
  std::string describe() const override { return "memory"; }
  std::vector<cv::Mat> frames;
  bool closed = false;
};

}  // namespace sd::test
