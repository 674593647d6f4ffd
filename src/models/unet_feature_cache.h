#pragma once
// Temporal reuse of the UNet's deep features (DeepCache, Ma et al. 2023, applied across the frames of a stream).
//
// A full UNet call stores the input of the last up block: everything the levels below the first computed (the down
// path past the first level, the mid block, every up block but the last). A later call that reuses it runs only the
// first level — conv_in, the first down block's layers (not its downsampler) for the skip tensors, and the last up
// block on the stored features — and skips the deep part. In a stream, row i of a call always carries the same
// timestep, so a reused call feeds each row the deep features that row had at the last full call: the previous
// frames' at the same denoising step, which is close while the picture changes slowly. The stream decides when to
// reuse (StreamDiffusion::set_deep_cache_every); the UNet only follows `reuse`.
#include <torch/types.h>

namespace sd {

struct UNetFeatureCache {
  bool reuse = false;  // in: run the shallow path on `deep` (which must be set and match the batch)
  torch::Tensor deep;  // out of full calls: [B, C, h, w] the last up block's input (latent size h × w)
};

}  // namespace sd
