#pragma once
// ControlNet residuals for one UNet call (diffusers' down_block_additional_residuals / mid_block_additional_residual),
// in a header of its own so the pipeline interface (DiffusionModels) can pass them without the module headers.
#include <vector>

#include <torch/types.h>

namespace sd {

// One tensor per UNet skip tensor (conv_in output, every down-block resnet/attention output and downsampler output)
// and one for the mid-block output, already multiplied by the conditioning scale. Empty = no ControlNet.
struct ControlResiduals {
  std::vector<torch::Tensor> down;
  torch::Tensor mid;
  bool defined() const { return !down.empty(); }
  // Element-wise sum (several ControlNets on one UNet call); an empty side is the identity.
  ControlResiduals& operator+=(const ControlResiduals& other);
};

}  // namespace sd
