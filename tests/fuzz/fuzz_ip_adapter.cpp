// IP-Adapter files as load_ip_adapter_weights reads them (plain, Plus, full-face; FaceID refused) against a UNet of
// the tiny-sd15 layout (cross_attention_dim 32; four attn2, ip_adapter.{1,3,5,7}, of widths 32, 32, 32, 64) and an
// image encoder of projection_dim 8, hidden_size 16 and 17 tokens: the kind told from the keys, the sizes read from
// the shapes, every key checked, and the modules built from those sizes. The file comes from fuzz_util.h's FileImage
// (input = header JSON, NUL, data bytes; zeros pad the data region to 1 MiB). Every input must either load an
// adapter whose invariants hold (its sizes, project() giving [1, tokens, 32], the UNet taking the tokens once
// attached) or throw sd::FormatError naming the file.
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/error.h"
#include "core/shape_str.h"
#include "fuzz_torch.h"
#include "fuzz_util.h"
#include "models/ip_adapter.h"
#include "models/unet_2d_condition.h"

namespace {

constexpr int64_t kProjectionDim = 8, kHiddenSize = 16, kImageTokens = 17, kCrossDim = 32;

sd::UNet2DConditionModel make_unet() {
  // tiny-sd15's UNet config (the fixture the IP-Adapter goldens use); weights left as built: only shapes matter.
  const auto j = nlohmann::json::parse(R"({
    "attention_head_dim": 8, "block_out_channels": [32, 64], "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 8})");
  sd::UNet2DConditionModel unet(sd::UNet2DConditionConfig::from_json(j, "fuzz unet config"));
  torch::NoGradGuard ng;
  for (auto& p : unet->parameters()) p.normal_(0, 0.02);
  unet->eval();
  return unet;
}

[[noreturn]] void fail(const char* what, const std::string& detail) {
  std::fprintf(stderr, "accepted adapter: %s (%s)\n", what, detail.c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static sd::UNet2DConditionModel unet = make_unet();
  static sd::fuzz::FileImage image;
  const std::string& path = image.write(data, size, 1 << 20);
  torch::NoGradGuard ng;
  try {
    sd::IPAdapter adapter = sd::load_ip_adapter_weights(path, *unet, kProjectionDim, torch::kFloat, torch::kCPU,
                                                        kHiddenSize, kImageTokens);
    const int64_t t = adapter->num_tokens();
    if (t <= 0) fail("no tokens", std::to_string(t));
    if (adapter->cross_attention_dim() != kCrossDim)
      fail("cross_attention_dim", std::to_string(adapter->cross_attention_dim()));
    if (adapter->slots().size() != 4) fail("attn2 slots", std::to_string(adapter->slots().size()));
    if (adapter->full_face() && t != kImageTokens) fail("full-face tokens", std::to_string(t));
    const bool states = adapter->reads_hidden_states();
    if (adapter->image_embed_dim() != (states ? kHiddenSize : kProjectionDim))
      fail("image_embed_dim", std::to_string(adapter->image_embed_dim()));
    const torch::Tensor in =
        states ? torch::randn({1, kImageTokens, kHiddenSize}) : torch::randn({1, kProjectionDim});
    const torch::Tensor tokens = adapter->project(in);
    if (tokens.sizes() != torch::IntArrayRef{1, t, kCrossDim}) fail("project()", sd::shape_str(tokens.sizes()));
    // The UNet with the branches attached takes the text rows and the tokens (the adapter is detached again even
    // when a call throws, so the next input gets the plain UNet).
    adapter->attach();
    try {
      const auto ctx = torch::cat({torch::randn({1, 77, kCrossDim}), tokens}, 1);
      const auto out = unet->forward(torch::randn({1, 4, 8, 8}), torch::tensor({10}), ctx);
      if (out.sizes() != torch::IntArrayRef{1, 4, 8, 8}) fail("UNet output", sd::shape_str(out.sizes()));
    } catch (...) {
      adapter->detach();
      throw;
    }
    adapter->detach();
  } catch (const sd::FormatError& e) {
    sd::fuzz::expect_names_file(e, path);
  }
  return 0;
}
