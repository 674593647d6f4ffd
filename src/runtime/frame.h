#pragma once
// One frame travelling through the stream runtime (capture -> pre-process -> model -> post-process -> sink).
// Pixels are OpenCV BGR 8UC3 on the I/O side (sources decode into it, sinks encode from it) and a torch tensor on
// the model side; each stage fills the field the next one needs and drops the one it no longer needs.
#include <chrono>
#include <cstdint>
#include <functional>
#include <vector>

#include <opencv2/core/mat.hpp>
#include <torch/types.h>

namespace sd {

using StreamClock = std::chrono::steady_clock;

struct Frame {
  int64_t index = -1;               // capture order, 0-based (an output carries the index of its input)
  StreamClock::time_point t_capture;  // when the source delivered it (latency is measured from here to the sink)
  cv::Mat image;                    // BGR 8UC3: the captured frame (source side) or the frame to write (sink side)
  torch::Tensor tensor;             // model side: FrameProcessor::preprocess() output, then process() output
  bool tick = false;                // no pixels (txt2img streaming): the source only sets the pace
  cv::Mat control;                  // BGR 8UC3 from the second source (--control-input), captured with this frame
  // Model side: one control image per ControlNet, uint8 RGB [H, W, 3] (FrameProcessor::preprocess_controls());
  // undefined = this frame brings none (the previous one stays, or the model thread supplies it: feedback).
  std::vector<torch::Tensor> controls;
  // Model side: what the control images are made from (the control source's frame, else the input's; uint8 RGB
  // [H, W, 3]), kept by a processor that left out some (StreamDiffusionProcessor: of ControlNets that did not run
  // when the frame was preprocessed): should one run by the frame's model call (turned on meanwhile), process()
  // makes its image from it then.
  torch::Tensor control_source;
  // A new IP-Adapter image prompt from the image-prompt source (--image-prompt-input), on the frames it is read with:
  // BGR 8UC3 on the source side, then uint8 RGB [H, W, 3] at its own size (the image encoder resizes and crops).
  cv::Mat image_prompt;
  torch::Tensor image_prompt_rgb;
  // Model side: a post-process the processor started on the model thread (FrameProcessor::begin_postprocess, e.g. the
  // pixels' copy to the host queued behind the frame's kernels); the post-process thread calls it instead of
  // postprocess(tensor).
  std::function<torch::Tensor()> postprocessed;
};

}  // namespace sd
