#pragma once
// --controlnet and friends turned into ControlNets with their preprocessors (stream, txt2img, img2img, serve). Apart
// from pipeline_options because the preprocessors live in the runtime (OpenCV), which engine-only builds leave out.
#include <memory>
#include <vector>

#include "apps/cli/pipeline_options.h"
#include "runtime/control_preprocessor.h"

namespace sd::cli {

// The ControlNets of --controlnet (loaded for `models`, scales from FILE:SCALE, default 1) with the preprocessor of
// each: --control-preprocessor given once applies to all, else one per ControlNet; without it `passthrough` when a
// control input is given, `canny` when the stream has input frames, else InvalidArgument (txt2img needs a control
// input or `feedback`). Empty without --controlnet; InvalidArgument for preprocessors without ControlNets.
struct ControlNetSetup {
  std::vector<ControlNetUnit> units;
  std::vector<std::shared_ptr<const ControlPreprocessor>> preprocessors;  // one per unit
};
ControlNetSetup load_controlnets(const PipelineOptions& o, const DiffusionModels& models, bool has_input_frames);

}  // namespace sd::cli
