#pragma once
// What the stream runtime drives on its model thread: anything that turns input frames into output frames with a
// fixed pipeline delay (StreamDiffusion has n−1 calls of latency, spec §3.3), controllable between frames.
//
// Threads: preprocess() runs on the pre-process thread and postprocess() on the post-process thread, concurrently
// with process()/flush()/apply() on the model thread — they must not touch the state process() changes.
#include <cstdint>
#include <string>
#include <vector>

#include <torch/types.h>

#include "runtime/control_command.h"
#include "runtime/frame.h"

namespace sd {

class FrameProcessor {
 public:
  virtual ~FrameProcessor() = default;

  // Frame size the model works at; the runtime resizes captured frames to it. 0 = any size (no resize).
  virtual int64_t width() const = 0;
  virtual int64_t height() const = 0;
  // False for a generator (txt2img): input frames are ticks without pixels.
  virtual bool takes_images() const { return true; }
  // True when process() uses Frame::image_prompt_rgb (an IP-Adapter): the runtime then accepts an image-prompt source.
  virtual bool takes_image_prompts() const { return false; }

  // Pre-process thread: uint8 RGB [H, W, 3] -> whatever process() takes (default: unchanged).
  virtual torch::Tensor preprocess(const torch::Tensor& rgb_u8) { return rgb_u8; }

  // Pre-process thread: the control images of one frame (frame.controls), from the fitted input frame and the second
  // source's frame (uint8 RGB [H, W, 3]; either undefined when absent); a processor that leaves some out may keep
  // their source in frame.control_source for process(). Default: none.
  virtual void preprocess_controls(Frame& frame, const torch::Tensor& input_rgb_u8,
                                   const torch::Tensor& control_rgb_u8) {}

  // Model thread: one input frame (tensor = preprocess() output, and nothing may still be writing it on a device
  // stream: a processor may read it on a side stream at once, as StreamDiffusionProcessor does; undefined for
  // ticks). Returns the outputs that became ready, oldest first — none during warm-up, usually one per call
  // afterwards — each carrying the index and capture time of the input it belongs to, in input order.
  virtual std::vector<Frame> process(Frame in) = 0;

  // Model thread, end of input: the outputs of every frame still in flight, so that every input has produced exactly
  // one output (lossless streaming). The processor is left ready for a new input sequence.
  virtual std::vector<Frame> flush() { return {}; }

  // Post-process thread: process() output tensor -> uint8 RGB [H, W, 3] (default: unchanged).
  virtual torch::Tensor postprocess(const torch::Tensor& out) { return out; }

  // Model thread, for each output of process() / flush() / apply() as it is handed on: may start the post-process
  // there by setting Frame::postprocessed (which the post-process thread then calls instead of postprocess()), so that
  // on a GPU the frame's pixels leave behind its own kernels, not behind those the model thread queues next.
  // Default: nothing.
  virtual void begin_postprocess(Frame& out) {}

  // Model thread, between two frames. Throws sd::InvalidArgument, and only that, when it refuses the command (a bad
  // value, a file the command names that cannot be read): the processor is then unchanged and the stream goes on.
  // Any other exception is the processor failing (a model call while flushing) and stops the stream. May return
  // outputs that had to be produced first (a change that restarts the stream flushes the frames in flight).
  virtual std::vector<Frame> apply(const ControlCommand& command) = 0;

  // Frames answered without running the model (similarity filter) so far.
  virtual int64_t skipped() const { return 0; }
  // Frames of delay between an input and its output (for reports).
  virtual int64_t latency_frames() const { return 0; }
  virtual std::string describe() const = 0;
};

}  // namespace sd
