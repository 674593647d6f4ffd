#pragma once
// Where a ControlNet's control image comes from, frame by frame (issue 15): a ControlPreprocessor turns a source
// frame — the stream's input frame, or the frame of a second source (`--control-input`) — into the control image.
//
//   canny[:LOW:HIGH]   OpenCV Canny edges (thresholds default 100, 200 as controlnet_aux's CannyDetector; white
//                      edges on black, 3 channels), for lllyasviel/control_v11p_sd15_canny and the like
//   gray               the luminance, 3 channels (tile / recolor style ControlNets)
//   passthrough        the frame as it is (a second source that already is a control video: depth, pose renders)
//   feedback           the stream's previous OUTPUT frame (feedback loops); the source frame is not used
//
// Depth and pose need models of their own (MiDaS / DPT / Depth-Anything for depth, OpenPose / DWPose for pose, HED /
// lineart for soft edges): they plug in through register_control_preprocessor() with a factory that loads the model,
// without touching the stream. Preprocessors run on the pre-process thread (off the model thread), except feedback,
// whose image only exists on the model thread, and the image of a frame preprocessed while its ControlNet did not run
// and that runs by the frame's call (StreamDiffusionProcessor makes it on the model thread): apply() is const and may
// run on either thread.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/types.h>

namespace sd {

class ControlPreprocessor {
 public:
  virtual ~ControlPreprocessor() = default;
  // The spec it was made from, normalised ("canny:100:200").
  virtual std::string name() const = 0;
  // uint8 RGB [H, W, 3] -> uint8 RGB [H, W, 3] of the same size. Thread-safe (const, no state).
  virtual torch::Tensor apply(const torch::Tensor& rgb_u8) const = 0;
  // True for `feedback`: the control image is the previous output, apply() is not called on a source frame.
  virtual bool feedback() const { return false; }
};

// "name" or "name:arg:arg..."; InvalidArgument naming the spec and listing the known names for anything else.
std::shared_ptr<const ControlPreprocessor> make_control_preprocessor(const std::string& spec);
// The registered names, sorted (canny, feedback, gray, passthrough and whatever was registered).
std::vector<std::string> control_preprocessor_names();

// The seam for preprocessors with models of their own (depth, pose, ...): `factory` gets the arguments after the
// name (split on ':') and returns the preprocessor or throws InvalidArgument. Replaces a registration of that name.
using ControlPreprocessorFactory =
    std::function<std::shared_ptr<const ControlPreprocessor>(const std::vector<std::string>& args)>;
void register_control_preprocessor(const std::string& name, ControlPreprocessorFactory factory);

}  // namespace sd
