#include "apps/cli/controlnet_options.h"

#include "core/error.h"
#include "pipeline/control_guidance.h"
#include "pipeline/controlnet.h"

namespace sd::cli {

ControlNetSetup load_controlnets(const PipelineOptions& o, const DiffusionModels& models, bool has_input_frames) {
  ControlNetSetup s;
  if (o.controlnets.empty()) {
    if (!o.control_preprocessors.empty()) throw InvalidArgument("--control-preprocessor needs --controlnet");
    if (!o.control_guidance_start.empty()) throw InvalidArgument("--control-guidance-start needs --controlnet");
    if (!o.control_guidance_end.empty()) throw InvalidArgument("--control-guidance-end needs --controlnet");
    if (!o.control_input.empty()) throw InvalidArgument("--control-input needs --controlnet");
    return s;
  }
  if (o.controlnet_every < 1) throw InvalidArgument("--controlnet-every must be >= 1");
  const size_t n = o.controlnets.size();
  if (o.control_preprocessors.size() > 1 && o.control_preprocessors.size() != n)
    throw InvalidArgument("--control-preprocessor given " + std::to_string(o.control_preprocessors.size()) +
                          " times for " + std::to_string(n) + " --controlnet: give it once (for all) or once each");
  // One value for all, or one per ControlNet.
  const auto per_net = [&](const std::vector<double>& v, const char* flag, double fallback, size_t i) {
    if (v.size() > 1 && v.size() != n)
      throw InvalidArgument(std::string(flag) + " given " + std::to_string(v.size()) + " times for " +
                            std::to_string(n) + " --controlnet: give it once (for all) or once each");
    return v.empty() ? fallback : v.size() == 1 ? v[0] : v[i];
  };
  for (size_t i = 0; i < n; ++i) {
    const auto [path, scale] = parse_controlnet_spec(o.controlnets[i]);
    const double start = per_net(o.control_guidance_start, "--control-guidance-start", 0.0, i);
    const double end = per_net(o.control_guidance_end, "--control-guidance-end", 1.0, i);
    if (!valid_control_guidance(start, end))
      throw InvalidArgument("--controlnet " + o.controlnets[i] + ": --control-guidance-start " +
                            std::to_string(start) + " and --control-guidance-end " + std::to_string(end) +
                            " must satisfy " + kControlGuidanceRule);
    std::string spec;
    if (!o.control_preprocessors.empty())
      spec = o.control_preprocessors.size() == 1 ? o.control_preprocessors[0] : o.control_preprocessors[i];
    else if (!o.control_input.empty())
      spec = "passthrough";
    else if (has_input_frames)
      spec = "canny";
    else
      throw InvalidArgument("--controlnet " + o.controlnets[i] +
                            ": txt2img has no input frames to preprocess; give --control-input or "
                            "--control-preprocessor feedback");
    auto pre = make_control_preprocessor(spec);
    if (!pre->feedback() && !has_input_frames && o.control_input.empty())
      throw InvalidArgument("--control-preprocessor " + spec +
                            " needs frames: txt2img has none, give --control-input (or use feedback)");
    ControlNetUnit unit{ControlNet::load(path, models), scale};
    unit.guidance_start = start;
    unit.guidance_end = end;
    s.units.push_back(std::move(unit));
    s.preprocessors.push_back(std::move(pre));
  }
  return s;
}

}  // namespace sd::cli
