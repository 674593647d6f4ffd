#pragma once
// A made-up IP-Adapter Plus file (h94/IP-Adapter's original layout, random seeded weights) for a UNet: no fixture
// holds one. Its image_proj reads the tiny fixture image encoder's hidden states (E = 16) and gives 16 tokens of the
// UNet's cross_attention_dim (C: 32 for tiny-sd15, kPlusC). tests/models/test_ip_adapter_plus.cpp checks the
// Resampler against it, tests/pipeline the stream with it.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "models/ip_adapter.h"

namespace sd::test {

constexpr int64_t kPlusE = 16, kPlusC = 32, kPlusD = 24, kPlusQ = 16, kPlusDepth = 2, kPlusHeads = 2, kPlusDh = 64,
                  kPlusF = 4 * kPlusD;

// The UNet's branches of an adapter: ip_adapter.{k}.to_k_ip / to_v_ip [inner, C] for every attn2 of `unet`.
inline void add_ip_branches(std::map<std::string, torch::Tensor>& t, torch::nn::Module& unet) {
  for (const auto& s : ip_adapter_cross_attentions(unet)) {
    const int64_t w = s.attention->options.heads * s.attention->options.dim_head;
    const int64_t c = s.attention->options.cross_attention_dim;
    t["ip_adapter." + std::to_string(s.key_id) + ".to_k_ip.weight"] = torch::randn({w, c}) * 0.2;
    t["ip_adapter." + std::to_string(s.key_id) + ".to_v_ip.weight"] = torch::randn({w, c}) * 0.2;
  }
}

// The file's tensors: image_proj.* (D = 24, two blocks of two 64-channel heads, feed-forward 4 D) and the UNet's
// branches (add_ip_branches).
inline std::map<std::string, torch::Tensor> plus_tensors(torch::nn::Module& unet, uint64_t seed = 7) {
  torch::manual_seed(seed);
  const auto r = [](std::vector<int64_t> s, double scale = 0.2) { return torch::randn(s) * scale; };
  const int64_t c = ip_adapter_cross_attentions(unet).at(0).attention->options.cross_attention_dim;
  std::map<std::string, torch::Tensor> t;
  t["image_proj.latents"] = r({1, kPlusQ, kPlusD}, 1.0);
  t["image_proj.proj_in.weight"] = r({kPlusD, kPlusE});
  t["image_proj.proj_in.bias"] = r({kPlusD});
  t["image_proj.proj_out.weight"] = r({c, kPlusD});
  t["image_proj.proj_out.bias"] = r({c});
  t["image_proj.norm_out.weight"] = 1 + r({c});
  t["image_proj.norm_out.bias"] = r({c});
  const int64_t inner = kPlusHeads * kPlusDh;
  for (int64_t i = 0; i < kPlusDepth; ++i) {
    const std::string b = "image_proj.layers." + std::to_string(i) + ".";
    for (const char* n : {"0.norm1.", "0.norm2.", "1.0."}) {
      t[b + n + "weight"] = 1 + r({kPlusD});
      t[b + n + "bias"] = r({kPlusD});
    }
    t[b + "0.to_q.weight"] = r({inner, kPlusD});
    t[b + "0.to_kv.weight"] = r({2 * inner, kPlusD});
    t[b + "0.to_out.weight"] = r({kPlusD, inner});
    t[b + "1.1.weight"] = r({kPlusF, kPlusD});
    t[b + "1.3.weight"] = r({kPlusD, kPlusF});
  }
  add_ip_branches(t, unet);
  return t;
}

}  // namespace sd::test
