#pragma once
// Upper bounds every component config is validated against: far above any published model (UNets of 4 levels, 1280
// channels and 10 transformer layers; CLIP bigG: 1280 wide, 32 layers, a vocabulary of 49408), they keep the shape
// arithmetic in range and turn a corrupt or hand-edited config.json into an error naming the file and the field,
// instead of a module whose allocation of hundreds of gigabytes fails naming nothing (or swaps for minutes).
#include <cstdint>

namespace sd::config_limits {

constexpr int64_t kMaxChannels = int64_t{1} << 16;      // channels, hidden widths, groups, image sizes
constexpr int64_t kMaxEmbeddingDim = int64_t{1} << 20;  // embedding / feed-forward widths, vocabularies
constexpr int64_t kMaxLayers = 256;                     // layers per model, resnets / blocks per level

}  // namespace sd::config_limits
