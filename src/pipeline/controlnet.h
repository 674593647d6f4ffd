#pragma once
// A ControlNet loaded for a model set: from a diffusers folder or a single file (original control_*.safetensors
// layout, converted at load by io/ldm_checkpoint), checked against the set's UNet (family, widths), cast to the
// set's dtype and device. Immutable after load and shareable by several streams; StreamDiffusion runs it on every
// UNet call (stream_diffusion.h: set_controlnets).
#include <memory>
#include <string>

#include <torch/types.h>

#include "models/control_residuals.h"
#include "pipeline/diffusion_models.h"

namespace sd {

struct ControlNetConfig;
class ControlNetModelImpl;

class ControlNet {
 public:
  // InvalidArgument / FormatError naming the path: no such file, a pickle, not a ControlNet, a ControlNet for
  // another family or another UNet (e.g. SD 2.x on SD 1.5: the cross-attention widths differ). A diffusers folder
  // loads the models' variant (LoadOptions::variant) when it has it, else its plain weights.
  static std::shared_ptr<const ControlNet> load(const std::string& path, const DiffusionModels& models);

  // Residuals for one UNet call: the same sample / timesteps / text rows (and SDXL added conditioning) as the UNet,
  // image [B, C, H, W] in [0, 1] at the output size (rows broadcast from 1), multiplied by `scale`.
  ControlResiduals residuals(const torch::Tensor& sample, const torch::Tensor& timesteps,
                             const torch::Tensor& encoder_hidden_states, const AddedConditioning& added,
                             const torch::Tensor& image, double scale) const;

  const std::string& path() const { return path_; }
  std::string name() const;      // file stem or folder name
  std::string describe() const;  // path, layout, parameters
  const ControlNetConfig& config() const;
  // The control image is this many times the latent size (8 for every published ControlNet).
  int64_t image_scale() const;

 private:
  ControlNet() = default;
  std::shared_ptr<ControlNetModelImpl> model_;
  std::string path_, layout_;
  int64_t parameters_ = 0;
};

// What ControlNet::load checks against the model's UNet (InvalidArgument naming `path` and both families or the
// differing widths): cross-attention width and added conditioning (the family), block_out_channels,
// layers_per_block, in_channels, pooled text width.
void check_controlnet_fits(const ControlNetConfig& controlnet, const UNet2DConditionConfig& unet,
                           const std::string& path);

// The name of a UNet family from its cross-attention width, for errors: "SD 1.x" (768), "SD 2.x" (1024), "SDXL"
// (2048 with added conditioning), else "a UNet with cross_attention_dim N".
std::string unet_family_name(int64_t cross_attention_dim, bool text_time);

}  // namespace sd
