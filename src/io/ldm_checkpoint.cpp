#include "io/ldm_checkpoint.h"

#include <algorithm>
#include <set>
#include <sstream>

#include "io/state_dict.h"
#include "core/error.h"
#include "core/text.h"

namespace sd::convert {

namespace {

// A key's dot-separated parts, empty ones kept in place ("a..b" -> a, "", b).
std::vector<std::string> split(const std::string& s) { return sd::split(s, '.', /*keep_empty=*/true); }

std::string join(const std::vector<std::string>& v, size_t from) {
  std::string out;
  for (size_t i = from; i < v.size(); ++i) out += (i > from ? "." : "") + v[i];
  return out;
}

bool is_index(const std::string& s) {
  return s.size() < 7 && is_decimal(s);
}
int to_index(const std::string& s) { return std::stoi(s); }

[[noreturn]] void no_place(const std::string& component, const std::string& key) {
  throw InvalidArgument(component + " key '" + key +
                        "' has no place in the original (LDM) checkpoint layout (a feature LDM files do not have)");
}

// ---- UNet -------------------------------------------------------------------------------------------------------

// diffusers ResnetBlock2D names -> openaimodel ResBlock names.
std::string unet_resnet(const std::vector<std::string>& t, size_t from, const std::string& key) {
  static const std::map<std::string, std::string> m = {{"norm1", "in_layers.0"},        {"conv1", "in_layers.2"},
                                                       {"time_emb_proj", "emb_layers.1"}, {"norm2", "out_layers.0"},
                                                       {"conv2", "out_layers.3"},       {"conv_shortcut", "skip_connection"}};
  if (from >= t.size()) no_place("UNet", key);
  auto it = m.find(t[from]);
  if (it == m.end()) no_place("UNet", key);
  return it->second + "." + join(t, from + 1);
}

struct BlockShape {
  std::set<int> resnets, attentions;
  bool sampler = false;
};

}  // namespace

LdmTable unet_ldm_table(const std::vector<std::string>& keys, const std::string& prefix) {
  // The block structure from the keys themselves: resnets / attentions / samplers per down and up block.
  std::map<int, BlockShape> down, up;
  for (const auto& k : keys) {
    const auto t = split(k);
    if (t.size() < 4 || (t[0] != "down_blocks" && t[0] != "up_blocks") || !is_index(t[1])) continue;
    auto& b = (t[0] == "down_blocks" ? down : up)[to_index(t[1])];
    if ((t[2] == "resnets" || t[2] == "attentions") && is_index(t[3]))
      (t[2] == "resnets" ? b.resnets : b.attentions).insert(to_index(t[3]));
    else if (t[2] == "downsamplers" || t[2] == "upsamplers")
      b.sampler = true;
  }
  std::map<int, int> down_base, up_base;  // first input_blocks / output_blocks index of each block
  int next = 1;
  for (auto& [i, b] : down) {
    down_base[i] = next;
    next += static_cast<int>(b.resnets.size()) + (b.sampler ? 1 : 0);
  }
  next = 0;
  for (auto& [i, b] : up) {
    up_base[i] = next;
    next += static_cast<int>(b.resnets.size());
  }

  LdmTable table;
  for (const auto& k : keys) {
    const auto t = split(k);
    std::string ldm;
    if (starts_with(k, "conv_in.")) {
      ldm = "input_blocks.0.0." + join(t, 1);
    } else if (starts_with(k, "time_embedding.linear_1.")) {
      ldm = "time_embed.0." + join(t, 2);
    } else if (starts_with(k, "time_embedding.linear_2.")) {
      ldm = "time_embed.2." + join(t, 2);
    } else if (starts_with(k, "conv_norm_out.")) {
      ldm = "out.0." + join(t, 1);
    } else if (starts_with(k, "conv_out.")) {
      ldm = "out.2." + join(t, 1);
    } else if (starts_with(k, "add_embedding.linear_1.")) {
      ldm = "label_emb.0.0." + join(t, 2);
    } else if (starts_with(k, "add_embedding.linear_2.")) {
      ldm = "label_emb.0.2." + join(t, 2);
    } else if (t.size() >= 5 && t[0] == "down_blocks" && is_index(t[1])) {
      const int i = to_index(t[1]);
      const auto& b = down.at(i);
      if ((t[2] == "resnets" || t[2] == "attentions") && is_index(t[3])) {
        // Position of resnet j among the level's resnets (diffusers numbers them 0..L-1).
        const int j = to_index(t[3]);
        const std::string idx = std::to_string(down_base.at(i) + j);
        ldm = t[2] == "resnets" ? "input_blocks." + idx + ".0." + unet_resnet(t, 4, k)
                                : "input_blocks." + idx + ".1." + join(t, 4);
      } else if (t[2] == "downsamplers" && t[3] == "0" && t[4] == "conv") {
        ldm = "input_blocks." + std::to_string(down_base.at(i) + static_cast<int>(b.resnets.size())) + ".0.op." +
              join(t, 5);
      } else {
        no_place("UNet", k);
      }
    } else if (t.size() >= 4 && t[0] == "mid_block" && is_index(t[2])) {
      if (t[1] == "resnets" && (t[2] == "0" || t[2] == "1"))
        ldm = std::string("middle_block.") + (t[2] == "0" ? "0." : "2.") + unet_resnet(t, 3, k);
      else if (t[1] == "attentions" && t[2] == "0")
        ldm = "middle_block.1." + join(t, 3);
      else
        no_place("UNet", k);
    } else if (t.size() >= 5 && t[0] == "up_blocks" && is_index(t[1])) {
      const int i = to_index(t[1]);
      const auto& b = up.at(i);
      if ((t[2] == "resnets" || t[2] == "attentions") && is_index(t[3])) {
        const std::string idx = std::to_string(up_base.at(i) + to_index(t[3]));
        ldm = t[2] == "resnets" ? "output_blocks." + idx + ".0." + unet_resnet(t, 4, k)
                                : "output_blocks." + idx + ".1." + join(t, 4);
      } else if (t[2] == "upsamplers" && t[3] == "0" && t[4] == "conv") {
        const int idx = up_base.at(i) + static_cast<int>(b.resnets.size()) - 1;
        ldm = "output_blocks." + std::to_string(idx) + "." + (b.attentions.empty() ? "1" : "2") + ".conv." +
              join(t, 5);
      } else {
        no_place("UNet", k);
      }
    } else {
      no_place("UNet", k);
    }
    table.push_back({k, prefix + ldm, LdmEntry::Op::Copy, 0, 1});
  }
  return table;
}

// ---- VAE --------------------------------------------------------------------------------------------------------

namespace {
std::string vae_resnet(const std::vector<std::string>& t, size_t from, const std::string& key) {
  if (from >= t.size()) no_place("AutoencoderKL", key);
  if (t[from] == "conv_shortcut") return "nin_shortcut." + join(t, from + 1);
  if (t[from] == "norm1" || t[from] == "conv1" || t[from] == "norm2" || t[from] == "conv2") return join(t, from);
  no_place("AutoencoderKL", key);
}
}  // namespace

LdmTable vae_ldm_table(const std::vector<std::string>& keys, const std::string& prefix) {
  std::set<int> up_levels;
  for (const auto& k : keys) {
    const auto t = split(k);
    if (t.size() > 2 && t[0] == "decoder" && t[1] == "up_blocks" && is_index(t[2])) up_levels.insert(to_index(t[2]));
  }
  const int n = static_cast<int>(up_levels.size());
  LdmTable table;
  for (const auto& k : keys) {
    const auto t = split(k);
    std::string ldm;
    LdmEntry::Op op = LdmEntry::Op::Copy;
    if (starts_with(k, "quant_conv.") || starts_with(k, "post_quant_conv.")) {
      ldm = k;
    } else if (t.size() >= 3 && (t[0] == "encoder" || t[0] == "decoder")) {
      const std::string& side = t[0];
      if (t[1] == "conv_in" || t[1] == "conv_out") {
        ldm = k;
      } else if (t[1] == "conv_norm_out") {
        ldm = side + ".norm_out." + join(t, 2);
      } else if (t[1] == "down_blocks" && side == "encoder" && t.size() >= 6 && is_index(t[2])) {
        if (t[3] == "resnets" && is_index(t[4]))
          ldm = "encoder.down." + t[2] + ".block." + t[4] + "." + vae_resnet(t, 5, k);
        else if (t[3] == "downsamplers" && t[4] == "0" && t[5] == "conv")
          ldm = "encoder.down." + t[2] + ".downsample.conv." + join(t, 6);
        else
          no_place("AutoencoderKL", k);
      } else if (t[1] == "up_blocks" && side == "decoder" && t.size() >= 6 && is_index(t[2])) {
        const std::string level = std::to_string(n - 1 - to_index(t[2]));  // LDM numbers decoder levels upwards
        if (t[3] == "resnets" && is_index(t[4]))
          ldm = "decoder.up." + level + ".block." + t[4] + "." + vae_resnet(t, 5, k);
        else if (t[3] == "upsamplers" && t[4] == "0" && t[5] == "conv")
          ldm = "decoder.up." + level + ".upsample.conv." + join(t, 6);
        else
          no_place("AutoencoderKL", k);
      } else if (t[1] == "mid_block" && t.size() >= 5 && t[2] == "resnets" && (t[3] == "0" || t[3] == "1")) {
        ldm = side + ".mid.block_" + (t[3] == "0" ? "1." : "2.") + vae_resnet(t, 4, k);
      } else if (t[1] == "mid_block" && t.size() >= 6 && t[2] == "attentions" && t[3] == "0") {
        static const std::map<std::string, std::string> m = {
            {"group_norm", "norm"}, {"to_q", "q"}, {"to_k", "k"}, {"to_v", "v"}, {"to_out", "proj_out"}};
        auto it = m.find(t[4]);
        if (it == m.end()) no_place("AutoencoderKL", k);
        size_t rest = 5;
        if (t[4] == "to_out") {
          if (t[5] != "0") no_place("AutoencoderKL", k);
          rest = 6;
        }
        ldm = side + ".mid.attn_1." + it->second + "." + join(t, rest);
        if (t[4] != "group_norm" && t.back() == "weight") op = LdmEntry::Op::Conv1x1ToLinear;
      } else {
        no_place("AutoencoderKL", k);
      }
    } else {
      no_place("AutoencoderKL", k);
    }
    table.push_back({k, prefix + ldm, op, 0, 1});
  }
  return table;
}

// ---- text encoders ----------------------------------------------------------------------------------------------

LdmTable text_encoder_ldm_table(const std::vector<std::string>& keys, TextEncoderLayout layout,
                                const std::string& prefix_in) {
  const std::string prefix =
      !prefix_in.empty() ? prefix_in : (layout == TextEncoderLayout::HfClip ? kHfClipPrefix : kOpenClipPrefix);
  LdmTable table;
  for (const auto& k : keys) {
    if (layout == TextEncoderLayout::HfClip) {
      table.push_back({k, prefix + k, LdmEntry::Op::Copy, 0, 1});
      continue;
    }
    const auto t = split(k);
    std::string ldm;
    LdmEntry::Op op = LdmEntry::Op::Copy;
    int chunk = 0, chunks = 1;
    if (k == "text_model.embeddings.token_embedding.weight") {
      ldm = "token_embedding.weight";
    } else if (k == "text_model.embeddings.position_embedding.weight") {
      ldm = "positional_embedding";
    } else if (starts_with(k, "text_model.final_layer_norm.")) {
      ldm = "ln_final." + join(t, 2);
    } else if (k == "text_projection.weight") {
      // CLIPTextModelWithProjection (SDXL text_encoder_2): OpenCLIP stores the [hidden, proj] matrix it multiplies
      // from the right; diffusers' Linear weight is its transpose.
      ldm = "text_projection";
      op = LdmEntry::Op::Transpose;
    } else if (t.size() >= 6 && t[0] == "text_model" && t[1] == "encoder" && t[2] == "layers" && is_index(t[3])) {
      const std::string block = "transformer.resblocks." + t[3] + ".";
      const std::string& part = t[4];
      if (part == "self_attn" && t.size() == 7 && (t[5] == "q_proj" || t[5] == "k_proj" || t[5] == "v_proj")) {
        ldm = block + "attn.in_proj_" + t[6];
        op = LdmEntry::Op::Rows;
        chunk = t[5] == "q_proj" ? 0 : t[5] == "k_proj" ? 1 : 2;
        chunks = 3;
      } else if (part == "self_attn" && t[5] == "out_proj") {
        ldm = block + "attn.out_proj." + join(t, 6);
      } else if (part == "layer_norm1") {
        ldm = block + "ln_1." + join(t, 5);
      } else if (part == "layer_norm2") {
        ldm = block + "ln_2." + join(t, 5);
      } else if (part == "mlp" && t[5] == "fc1") {
        ldm = block + "mlp.c_fc." + join(t, 6);
      } else if (part == "mlp" && t[5] == "fc2") {
        ldm = block + "mlp.c_proj." + join(t, 6);
      } else {
        no_place("OpenCLIP text encoder", k);
      }
    } else {
      no_place("OpenCLIP text encoder", k);
    }
    table.push_back({k, prefix + ldm, op, chunk, chunks});
  }
  return table;
}

// ---- gather / scatter -------------------------------------------------------------------------------------------

std::map<std::string, torch::Tensor> gather_ldm(const SafeTensorsFile& file, const LdmTable& table,
                                                const std::string& component, const ShapeMap& expected) {
  std::map<std::string, torch::Tensor> out, cache;
  std::vector<std::string> missing, bad;
  for (const auto& e : table) {
    if (!file.contains(e.ldm)) {
      missing.push_back(e.ldm + " (-> " + e.diffusers + ")");
      continue;
    }
    auto it = cache.find(e.ldm);
    if (it == cache.end()) it = cache.emplace(e.ldm, file.get(e.ldm)).first;
    torch::Tensor t = it->second;
    switch (e.op) {
      case LdmEntry::Op::Copy: break;
      case LdmEntry::Op::Conv1x1ToLinear:
        if (t.dim() == 4 && t.size(2) == 1 && t.size(3) == 1) {
          t = t.reshape({t.size(0), t.size(1)});  // a view of the contiguous mapped tensor
        } else if (t.dim() != 2) {
          bad.push_back(e.ldm + ": " + shape_str(t.sizes()) + ", expected [C, C, 1, 1] (1x1 conv) or [C, C]");
          continue;
        }
        break;
      case LdmEntry::Op::Rows:
        if (t.dim() < 1 || t.size(0) % e.chunks != 0) {
          bad.push_back(e.ldm + ": " + shape_str(t.sizes()) + ", expected " + std::to_string(e.chunks) +
                        " equal row blocks (fused q/k/v)");
          continue;
        } else {
          const int64_t n = t.size(0) / e.chunks;
          t = t.narrow(0, e.chunk * n, n);  // a view: rows are contiguous
        }
        break;
      case LdmEntry::Op::Transpose:
        if (t.dim() != 2) {
          bad.push_back(e.ldm + ": " + shape_str(t.sizes()) +
                        ", expected a 2-D [hidden, projection] matrix (OpenCLIP text_projection)");
          continue;
        }
        t = t.t().contiguous();  // one small copy (hidden x projection)
        break;
    }
    if (const auto x = expected.find(e.diffusers); x != expected.end() && t.sizes() != at::IntArrayRef(x->second)) {
      bad.push_back(e.ldm + " (-> " + e.diffusers + "): " + shape_str(it->second.sizes()) + " in the file gives " +
                    shape_str(t.sizes()) + ", the model expects " + shape_str(x->second));
      continue;
    }
    out[e.diffusers] = t;
  }
  if (!missing.empty() || !bad.empty()) {
    std::ostringstream msg;
    msg << "the " << component << " of this original-layout (LDM) checkpoint is incomplete";
    if (!missing.empty()) {
      msg << "; " << missing.size() << " of " << table.size() << " tensors missing:";
      for (size_t i = 0; i < std::min<size_t>(missing.size(), 8); ++i) msg << "\n    " << missing[i];
      if (missing.size() > 8) msg << "\n    ... and " << missing.size() - 8 << " more";
    }
    if (!bad.empty()) {
      msg << "\n  wrong shapes:";
      for (size_t i = 0; i < std::min<size_t>(bad.size(), 8); ++i) msg << "\n    " << bad[i];
    }
    throw FormatError(file.path(), msg.str());
  }
  return out;
}

std::vector<std::pair<std::string, torch::Tensor>> scatter_ldm(const std::map<std::string, torch::Tensor>& diffusers,
                                                               const LdmTable& table) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  std::map<std::string, std::vector<torch::Tensor>> fused;  // ldm key -> row blocks in chunk order
  std::vector<std::string> fused_order;
  for (const auto& e : table) {
    auto it = diffusers.find(e.diffusers);
    if (it == diffusers.end()) throw InvalidArgument("scatter_ldm: no tensor '" + e.diffusers + "'");
    const torch::Tensor& t = it->second;
    switch (e.op) {
      case LdmEntry::Op::Copy: out.emplace_back(e.ldm, t); break;
      case LdmEntry::Op::Conv1x1ToLinear:
        out.emplace_back(e.ldm, t.dim() == 2 ? t.reshape({t.size(0), t.size(1), 1, 1}) : t);
        break;
      case LdmEntry::Op::Transpose: out.emplace_back(e.ldm, t.t().contiguous()); break;
      case LdmEntry::Op::Rows: {
        auto& v = fused[e.ldm];
        if (v.empty()) fused_order.push_back(e.ldm);
        if (static_cast<int>(v.size()) < e.chunks) v.resize(e.chunks);
        v[e.chunk] = t;
        break;
      }
    }
  }
  for (const auto& k : fused_order) {
    const auto& v = fused[k];
    for (const auto& t : v)
      if (!t.defined()) throw InvalidArgument("scatter_ldm: a row block of '" + k + "' is missing");
    out.emplace_back(k, torch::cat(v, 0));
  }
  return out;
}

// ---- inspection -------------------------------------------------------------------------------------------------

const char* family_name(LdmFamily f) {
  switch (f) {
    case LdmFamily::SD1: return "SD 1.x";
    case LdmFamily::SD2: return "SD 2.x";
    case LdmFamily::SDXL: return "SDXL";
    default: return "unknown";
  }
}

const std::vector<std::string>& ddpm_buffer_names() {
  static const std::vector<std::string> n = {"betas",
                                             "alphas_cumprod",
                                             "alphas_cumprod_prev",
                                             "sqrt_alphas_cumprod",
                                             "sqrt_one_minus_alphas_cumprod",
                                             "log_one_minus_alphas_cumprod",
                                             "sqrt_recip_alphas_cumprod",
                                             "sqrt_recipm1_alphas_cumprod",
                                             "posterior_variance",
                                             "posterior_log_variance_clipped",
                                             "posterior_mean_coef1",
                                             "posterior_mean_coef2"};
  return n;
}

namespace {

struct Shapes {
  const SafeTensorsFile& f;
  bool has(const std::string& k) const { return f.contains(k); }
  std::vector<int64_t> of(const std::string& k) const {
    if (!f.contains(k)) throw FormatError(f.path(), "expected tensor '" + k + "' is missing");
    return f.info(k).shape;
  }
  int64_t dim(const std::string& k, size_t i) const {
    const auto s = of(k);
    if (i >= s.size())
      throw FormatError(f.path(), "tensor '" + k + "' has shape " + shape_str(s) + ", expected at least " +
                                      std::to_string(i + 1) + " dimensions");
    return s[i];
  }
  bool any_prefix(const std::string& p) const {
    for (const auto& t : f.tensors())
      if (starts_with(t.name, p)) return true;
    return false;
  }
  // Distinct integer indices right after `p` ("p{N}.").
  std::set<int> indices(const std::string& p) const {
    std::set<int> out;
    for (const auto& t : f.tensors()) {
      if (!starts_with(t.name, p)) continue;
      const auto dot = t.name.find('.', p.size());
      const std::string s = t.name.substr(p.size(), dot == std::string::npos ? std::string::npos : dot - p.size());
      if (is_index(s)) out.insert(to_index(s));
    }
    return out;
  }
};

nlohmann::json int_or_list(const std::vector<int64_t>& v) {
  if (!v.empty() && std::all_of(v.begin(), v.end(), [&](int64_t x) { return x == v[0]; })) return v[0];
  return v;
}

// `P`: the UNet's prefix (a ControlNet's encoder copy has no out.* and no output_blocks).
nlohmann::json infer_unet(const Shapes& s, LdmFamily family, const std::string& pred,
                          const std::string& P = kUNetPrefix) {
  nlohmann::json c;
  c["_class_name"] = "UNet2DConditionModel";
  const auto conv_in = s.of(P + "input_blocks.0.0.weight");
  if (conv_in.size() != 4) throw FormatError(s.f.path(), P + "input_blocks.0.0.weight: expected a 4-D conv weight");
  c["in_channels"] = conv_in[1];
  c["conv_in_kernel"] = conv_in[2];
  if (s.has(P + "out.2.weight")) {
    c["out_channels"] = s.dim(P + "out.2.weight", 0);
    c["conv_out_kernel"] = s.dim(P + "out.2.weight", 2);
  }
  // Walk input_blocks: resnets (in_layers), attentions (.1.proj_in), downsamplers (.0.op) close a level.
  const auto inputs = s.indices(P + "input_blocks.");
  std::vector<int64_t> channels, layers;
  std::vector<bool> attention;
  std::vector<int64_t> transformer_depth;  // per level (1 for levels without attention)
  int64_t cur_layers = 0, cur_channels = -1;
  bool cur_attn = false;
  int64_t depth = 1;  // of the current level
  int64_t cross_dim = -1;
  bool linear_proj = false;
  for (int i : inputs) {
    if (i == 0) continue;
    const std::string b = P + "input_blocks." + std::to_string(i) + ".";
    if (s.has(b + "0.op.weight")) {
      channels.push_back(cur_channels);
      layers.push_back(cur_layers);
      attention.push_back(cur_attn);
      transformer_depth.push_back(depth);
      cur_layers = 0;
      cur_channels = -1;
      cur_attn = false;
      depth = 1;
      continue;
    }
    if (!s.has(b + "0.in_layers.2.weight"))
      throw FormatError(s.f.path(), "input block " + b + " is neither a resnet (0.in_layers) nor a downsampler (0.op)");
    if (cur_channels < 0) cur_channels = s.dim(b + "0.out_layers.3.weight", 0);
    ++cur_layers;
    if (s.has(b + "1.proj_in.weight")) {
      cur_attn = true;
      linear_proj = s.of(b + "1.proj_in.weight").size() == 2;
      depth = static_cast<int64_t>(s.indices(b + "1.transformer_blocks.").size());
      if (cross_dim < 0) cross_dim = s.dim(b + "1.transformer_blocks.0.attn2.to_k.weight", 1);
    }
  }
  if (cur_layers == 0) throw FormatError(s.f.path(), "the UNet's last level has no resnets");
  channels.push_back(cur_channels);
  layers.push_back(cur_layers);
  attention.push_back(cur_attn);
  transformer_depth.push_back(depth);
  const bool mid_attn = s.has(P + "middle_block.1.proj_in.weight");
  if (cross_dim < 0 && mid_attn) cross_dim = s.dim(P + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", 1);
  if (mid_attn) linear_proj = s.of(P + "middle_block.1.proj_in.weight").size() == 2;
  const size_t n = channels.size();
  c["block_out_channels"] = channels;
  c["layers_per_block"] = int_or_list(layers);
  std::vector<std::string> down, up;
  for (size_t i = 0; i < n; ++i) down.push_back(attention[i] ? "CrossAttnDownBlock2D" : "DownBlock2D");
  for (size_t i = 0; i < n; ++i) up.push_back(attention[n - 1 - i] ? "CrossAttnUpBlock2D" : "UpBlock2D");
  c["down_block_types"] = down;
  c["up_block_types"] = up;
  if (!s.any_prefix(P + "middle_block."))
    c["mid_block_type"] = nullptr;
  else
    c["mid_block_type"] = "UNetMidBlock2DCrossAttn";
  if (cross_dim > 0) c["cross_attention_dim"] = cross_dim;
  c["use_linear_projection"] = linear_proj;
  // Transformer blocks per level from the key counts (SDXL base: [1, 2, 10]; the mid block uses the last level's).
  if (std::any_of(transformer_depth.begin(), transformer_depth.end(), [](int64_t d) { return d > 1; }))
    c["transformer_layers_per_block"] = int_or_list(transformer_depth);
  // Not in the weights: heads (SD 1.x: 8 per block; SD 2.x and SDXL: head_dim 64), GroupNorm 32 / eps 1e-5.
  if (family == LdmFamily::SD2 || family == LdmFamily::SDXL) {
    std::vector<int64_t> heads;
    for (auto ch : channels) heads.push_back(std::max<int64_t>(1, ch / 64));
    c["attention_head_dim"] = heads;
  } else {
    c["attention_head_dim"] = 8;
  }
  c["norm_num_groups"] = 32;
  c["norm_eps"] = 1e-5;
  const int64_t temb = s.dim(P + "time_embed.0.weight", 0);
  if (temb != 4 * channels[0]) c["time_embedding_dim"] = temb;
  const bool v768 = family == LdmFamily::SD2 && pred == "v_prediction";
  c["upcast_attention"] = v768;  // diffusers sets it for SD 2.x 768-v
  c["sample_size"] = family == LdmFamily::SDXL ? 128 : v768 ? 96 : 64;  // SDXL: 1024 px (base; turbo is 512)
  if (s.has(P + "label_emb.0.0.weight")) {
    // SDXL's added conditioning: label_emb.0 = add_embedding over pooled text + 6 x addition_time_embed_dim (256 in
    // every SDXL UNet; the sinusoidal time projection has no weights: inspect_ldm_checkpoint derives it from
    // text_encoder_2's projection_dim when the file has one).
    c["addition_embed_type"] = "text_time";
    c["addition_time_embed_dim"] = 256;
    c["projection_class_embeddings_input_dim"] = s.dim(P + "label_emb.0.0.weight", 1);
  }
  c["flip_sin_to_cos"] = true;
  c["freq_shift"] = 0;
  return c;
}

nlohmann::json infer_vae_ldm(const Shapes& s, const std::string& P, int64_t sample_size, bool sdxl = false) {
  nlohmann::json c;
  c["_class_name"] = "AutoencoderKL";
  const auto levels = s.indices(P + "encoder.down.");
  if (levels.empty()) throw FormatError(s.f.path(), "no " + P + "encoder.down.N blocks: not an AutoencoderKL");
  std::vector<int64_t> channels;
  for (int i : levels) channels.push_back(s.dim(P + "encoder.down." + std::to_string(i) + ".block.0.conv1.weight", 0));
  c["block_out_channels"] = channels;
  c["layers_per_block"] = static_cast<int64_t>(s.indices(P + "encoder.down.0.block.").size());
  c["down_block_types"] = std::vector<std::string>(channels.size(), "DownEncoderBlock2D");
  c["up_block_types"] = std::vector<std::string>(channels.size(), "UpDecoderBlock2D");
  c["in_channels"] = s.dim(P + "encoder.conv_in.weight", 1);
  c["out_channels"] = s.dim(P + "decoder.conv_out.weight", 0);
  c["latent_channels"] = s.dim(P + "decoder.conv_in.weight", 1);
  c["use_quant_conv"] = s.has(P + "quant_conv.weight");
  c["use_post_quant_conv"] = s.has(P + "post_quant_conv.weight");
  c["mid_block_add_attention"] = s.has(P + "encoder.mid.attn_1.q.weight");
  c["act_fn"] = "silu";
  c["norm_num_groups"] = 32;   // not in the weights (LDM hard-codes 32)
  c["scaling_factor"] = sdxl ? 0.13025 : 0.18215;  // not in the weights (yaml scale_factor)
  if (sdxl) c["force_upcast"] = true;  // the SDXL VAE overflows in fp16 (diffusers runs it in float32)
  c["sample_size"] = sample_size;
  return c;
}

nlohmann::json infer_vae_diffusers(const Shapes& s) {
  nlohmann::json c;
  c["_class_name"] = "AutoencoderKL";
  const auto levels = s.indices("encoder.down_blocks.");
  std::vector<int64_t> channels;
  for (int i : levels)
    channels.push_back(s.dim("encoder.down_blocks." + std::to_string(i) + ".resnets.0.conv1.weight", 0));
  c["block_out_channels"] = channels;
  c["layers_per_block"] = static_cast<int64_t>(s.indices("encoder.down_blocks.0.resnets.").size());
  c["down_block_types"] = std::vector<std::string>(channels.size(), "DownEncoderBlock2D");
  c["up_block_types"] = std::vector<std::string>(channels.size(), "UpDecoderBlock2D");
  c["in_channels"] = s.dim("encoder.conv_in.weight", 1);
  c["out_channels"] = s.dim("decoder.conv_out.weight", 0);
  c["latent_channels"] = s.dim("decoder.conv_in.weight", 1);
  c["use_quant_conv"] = s.has("quant_conv.weight");
  c["use_post_quant_conv"] = s.has("post_quant_conv.weight");
  // VAEs saved before diffusers ~0.14 name it "query" (converted at load by io/checkpoint_convert).
  c["mid_block_add_attention"] =
      s.has("encoder.mid_block.attentions.0.to_q.weight") || s.has("encoder.mid_block.attentions.0.query.weight");
  c["act_fn"] = "silu";
  c["norm_num_groups"] = 32;
  c["scaling_factor"] = 0.18215;
  c["sample_size"] = 512;
  return c;
}

// `sdxl`: SDXL's text encoders (published configs: bos 0 / eos 2; text_encoder_2 uses every OpenCLIP layer and its
// text_projection, as CLIPTextModelWithProjection).
nlohmann::json infer_text_encoder(const Shapes& s, TextEncoderLayout layout, const std::string& P, bool sdxl = false) {
  nlohmann::json c;
  c["architectures"] = {"CLIPTextModel"};
  c["model_type"] = "clip_text_model";
  int64_t vocab = 0, hidden = 0, inner = 0, positions = 0, layers = 0;
  if (layout == TextEncoderLayout::HfClip) {
    vocab = s.dim(P + "text_model.embeddings.token_embedding.weight", 0);
    hidden = s.dim(P + "text_model.embeddings.token_embedding.weight", 1);
    positions = s.dim(P + "text_model.embeddings.position_embedding.weight", 0);
    layers = static_cast<int64_t>(s.indices(P + "text_model.encoder.layers.").size());
    inner = s.dim(P + "text_model.encoder.layers.0.mlp.fc1.weight", 0);
    c["hidden_act"] = "quick_gelu";  // CLIP ViT-L/14 (not in the weights)
    c["num_attention_heads"] = hidden == 768 ? 12 : std::max<int64_t>(1, hidden / 64);
    c["bos_token_id"] = sdxl ? 0 : 49406;
    c["eos_token_id"] = sdxl ? 2 : 49407;
  } else if (sdxl) {
    vocab = s.dim(P + "token_embedding.weight", 0);
    hidden = s.dim(P + "token_embedding.weight", 1);
    positions = s.dim(P + "positional_embedding", 0);
    layers = static_cast<int64_t>(s.indices(P + "transformer.resblocks.").size());  // SDXL uses every layer
    if (layers < 1) throw FormatError(s.f.path(), "SDXL text_encoder_2 (" + P + "*) has no transformer.resblocks.N");
    inner = s.dim(P + "transformer.resblocks.0.mlp.c_fc.weight", 0);
    const auto proj = s.of(P + "text_projection");
    if (proj.size() != 2 || proj[0] != hidden || proj[1] <= 0)
      throw FormatError(s.f.path(), "tensor '" + P + "text_projection' has shape " + shape_str(proj) +
                                        ", expected [hidden " + std::to_string(hidden) +
                                        ", projection_dim] (OpenCLIP's pooled-output projection of SDXL's text_encoder_2)");
    c["architectures"] = {"CLIPTextModelWithProjection"};
    c["projection_dim"] = proj[1];
    c["hidden_act"] = "gelu";  // OpenCLIP ViT-bigG/14 (not in the weights)
    c["num_attention_heads"] = std::max<int64_t>(1, hidden / 64);  // 20 for bigG's 1280
    c["bos_token_id"] = 0;  // stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json
    c["eos_token_id"] = 2;
  } else {
    vocab = s.dim(P + "token_embedding.weight", 0);
    hidden = s.dim(P + "token_embedding.weight", 1);
    positions = s.dim(P + "positional_embedding", 0);
    // SD 2.x conditions on the penultimate OpenCLIP layer: the last stored resblock is not used.
    const int64_t stored = static_cast<int64_t>(s.indices(P + "transformer.resblocks.").size());
    if (stored < 2) throw FormatError(s.f.path(), "OpenCLIP text encoder with " + std::to_string(stored) +
                                                       " resblocks; SD 2.x needs at least 2 (it uses the penultimate)");
    layers = stored - 1;
    inner = s.dim(P + "transformer.resblocks.0.mlp.c_fc.weight", 0);
    c["hidden_act"] = "gelu";  // OpenCLIP ViT-H/14 (not in the weights)
    c["num_attention_heads"] = std::max<int64_t>(1, hidden / 64);
    c["bos_token_id"] = 0;  // stabilityai/stable-diffusion-2 text_encoder/config.json
    c["eos_token_id"] = 2;
  }
  c["vocab_size"] = vocab;
  c["hidden_size"] = hidden;
  c["intermediate_size"] = inner;
  c["max_position_embeddings"] = positions;
  c["num_hidden_layers"] = layers;
  c["layer_norm_eps"] = 1e-5;
  c["pad_token_id"] = 1;
  return c;
}

}  // namespace

bool is_ldm_checkpoint(const SafeTensorsFile& file) { return Shapes{file}.any_prefix(kUNetPrefix); }

// ---- ControlNet -------------------------------------------------------------------------------------------------

LdmTable controlnet_ldm_table(const std::vector<std::string>& keys, const std::string& prefix) {
  // The encoder copy maps like a UNet's; the conditioning embedding, the zero convs and the mid zero conv are
  // ControlNet's own. LDM's input_hint_block is one Sequential of convs and SiLUs: convs at 0, 2, 4, ...
  std::vector<std::string> encoder;
  int hint_blocks = 0;
  for (const auto& k : keys) {
    const auto t = split(k);
    if (t.size() >= 4 && t[0] == "controlnet_cond_embedding" && t[1] == "blocks" && is_index(t[2]))
      hint_blocks = std::max(hint_blocks, to_index(t[2]) + 1);
  }
  LdmTable table;
  for (const auto& k : keys) {
    const auto t = split(k);
    std::string ldm;
    if (t[0] == "controlnet_cond_embedding" && t.size() >= 3) {
      if (t[1] == "conv_in")
        ldm = "input_hint_block.0." + join(t, 2);
      else if (t[1] == "blocks" && t.size() >= 4 && is_index(t[2]))
        ldm = "input_hint_block." + std::to_string(2 * (to_index(t[2]) + 1)) + "." + join(t, 3);
      else if (t[1] == "conv_out")
        ldm = "input_hint_block." + std::to_string(2 * (hint_blocks + 1)) + "." + join(t, 2);
      else
        no_place("ControlNet", k);
    } else if (t[0] == "controlnet_down_blocks" && t.size() >= 3 && is_index(t[1])) {
      ldm = "zero_convs." + t[1] + ".0." + join(t, 2);
    } else if (t[0] == "controlnet_mid_block" && t.size() >= 2) {
      ldm = "middle_block_out.0." + join(t, 1);
    } else {
      encoder.push_back(k);
      continue;
    }
    table.push_back({k, prefix + ldm, LdmEntry::Op::Copy, 0, 1});
  }
  const auto enc = unet_ldm_table(encoder, prefix);
  table.insert(table.end(), enc.begin(), enc.end());
  return table;
}

bool is_ldm_controlnet(const SafeTensorsFile& file) {
  const Shapes s{file};
  return s.any_prefix(std::string(kControlNetPrefix) + "input_hint_block.") || s.any_prefix("input_hint_block.");
}

ControlNetFileInfo inspect_controlnet_file(const SafeTensorsFile& file) {
  const Shapes s{file};
  ControlNetFileInfo info;
  info.path = file.path();
  if (s.any_prefix(std::string(kControlNetPrefix) + "input_hint_block."))
    info.prefix = kControlNetPrefix;
  else if (!s.any_prefix("input_hint_block."))
    throw FormatError(file.path(), "not a ControlNet: no 'control_model.input_hint_block.*' or 'input_hint_block.*' "
                                   "tensors (expected the original ControlNet layout: input_hint_block, "
                                   "input_blocks, middle_block, zero_convs, middle_block_out; or a diffusers "
                                   "ControlNetModel folder)");
  const std::string P = info.prefix;
  // Family from the cross-attention width (768 SD 1.x, 1024 SD 2.x) or SDXL's label_emb.
  int64_t cross = 0;
  for (const auto& t : file.tensors())
    if (starts_with(t.name, P + "input_blocks.") && t.name.find("attn2.to_k.weight") != std::string::npos &&
        t.shape.size() == 2) {
      cross = t.shape[1];
      break;
    }
  info.family = s.has(P + "label_emb.0.0.weight") ? LdmFamily::SDXL
                : cross == 1024                    ? LdmFamily::SD2
                : cross == 768                     ? LdmFamily::SD1
                                                   : LdmFamily::Unknown;
  nlohmann::json c = infer_unet(s, info.family, "epsilon", P);
  c["_class_name"] = "ControlNetModel";
  for (const char* k : {"out_channels", "conv_out_kernel", "up_block_types", "sample_size"}) c.erase(k);
  c["upcast_attention"] = false;
  // input_hint_block: conv_in, then pairs (c_i -> c_i, c_i -> c_{i+1} stride 2), then conv_out (the last conv).
  std::vector<int> convs;
  for (int i : s.indices(P + "input_hint_block."))
    if (s.has(P + "input_hint_block." + std::to_string(i) + ".weight")) convs.push_back(i);
  if (convs.size() < 2 || convs.size() % 2 != 0)
    throw FormatError(file.path(), "input_hint_block has " + std::to_string(convs.size()) +
                                       " convolutions; expected conv_in, pairs of convs and conv_out (an even count "
                                       ">= 2)");
  for (size_t i = 0; i < convs.size(); ++i)
    if (convs[i] != static_cast<int>(2 * i))
      throw FormatError(file.path(), "input_hint_block convolutions must sit at indices 0, 2, 4, ... (SiLU between "
                                     "them); found one at " + std::to_string(convs[i]));
  const std::string H = P + "input_hint_block.";
  std::vector<int64_t> outs{s.dim(H + "0.weight", 0)};
  for (size_t i = 2; i + 1 < convs.size(); i += 2) outs.push_back(s.dim(H + std::to_string(convs[i]) + ".weight", 0));
  c["conditioning_channels"] = s.dim(H + "0.weight", 1);
  c["conditioning_embedding_out_channels"] = outs;
  c["controlnet_conditioning_channel_order"] = "rgb";
  c["global_pool_conditions"] = false;
  info.config = c;
  return info;
}

LdmCheckpointInfo inspect_ldm_checkpoint(const SafeTensorsFile& file, const std::string& prediction_type) {
  const Shapes s{file};
  LdmCheckpointInfo info;
  info.path = file.path();
  for (const auto& t : file.tensors()) info.dtypes[safetensors::dtype_name(t.dtype)] += static_cast<int64_t>(t.numel());
  info.has_unet = s.any_prefix(kUNetPrefix);
  if (!info.has_unet) {
    std::string hint;
    if (s.any_prefix("down_blocks.") || s.any_prefix("unet.")) hint = " (it looks like diffusers UNet weights: pass "
                                                                    "the diffusers model folder instead)";
    else if (s.any_prefix("encoder.down.") || s.any_prefix("encoder.down_blocks.")) hint = " (it looks like a VAE: use --vae)";
    else if (s.any_prefix("lora_unet_") || s.any_prefix("lora_te_")) hint = " (it looks like a LoRA)";
    throw FormatError(file.path(), "unknown checkpoint layout: no 'model.diffusion_model.*' tensors, so this is not "
                                   "an original (CompVis / Stability) Stable Diffusion single file" + hint +
                                   "; expected model.diffusion_model.* (UNet), first_stage_model.* (VAE) and "
                                   "cond_stage_model.transformer.* (SD 1.x) or cond_stage_model.model.* (SD 2.x)");
  }
  info.has_vae = s.any_prefix(kVaePrefix);
  if (s.any_prefix(kHfClipPrefix)) {
    info.has_text_encoder = true;
    info.text_layout = TextEncoderLayout::HfClip;
    info.text_prefix = kHfClipPrefix;
    info.family = LdmFamily::SD1;
  } else if (s.any_prefix(kOpenClipPrefix)) {
    info.has_text_encoder = true;
    info.text_layout = TextEncoderLayout::OpenClip;
    info.text_prefix = kOpenClipPrefix;
    info.family = LdmFamily::SD2;
  } else if (s.any_prefix("conditioner.embedders.") || s.has(std::string(kUNetPrefix) + "label_emb.0.0.weight")) {
    // SDXL (Stability's sgm layout): CLIP ViT-L in HF names + OpenCLIP bigG. The refiner's single encoder sits at
    // embedders.0.model (OpenCLIP) and is not this layout.
    if (s.any_prefix("conditioner.embedders.0.model."))
      throw FormatError(file.path(), "an SDXL refiner-style checkpoint (conditioner.embedders.0.model.*: one OpenCLIP "
                                     "text encoder) is not supported; expected SDXL base / turbo with "
                                     "conditioner.embedders.0.transformer.* (CLIP ViT-L) and "
                                     "conditioner.embedders.1.model.* (OpenCLIP bigG)");
    info.family = LdmFamily::SDXL;
    info.text_layout = TextEncoderLayout::HfClip;
    info.text_prefix = kSdxlClipPrefix;
    info.has_text_encoder = s.any_prefix(kSdxlClipPrefix);
    info.text_encoder_2_prefix = kSdxlOpenClipPrefix;
    info.has_text_encoder_2 = s.any_prefix(kSdxlOpenClipPrefix);
  }
  // Family from the cross-attention width when the text encoder does not tell (768 SD 1.x, 1024 SD 2.x).
  if (info.family == LdmFamily::Unknown) {
    for (const auto& t : file.tensors()) {
      if (starts_with(t.name, kUNetPrefix) && t.name.find("attn2.to_k.weight") != std::string::npos &&
          t.shape.size() == 2) {
        if (t.shape[1] == 768) info.family = LdmFamily::SD1;
        if (t.shape[1] == 1024) info.family = LdmFamily::SD2;
        break;
      }
    }
  }
  if (!prediction_type.empty() && prediction_type != "epsilon" && prediction_type != "v_prediction")
    throw InvalidArgument("prediction type '" + prediction_type + "': expected epsilon or v_prediction");
  if (!prediction_type.empty()) {
    info.prediction_type = prediction_type;
    info.prediction_type_note = "given";
  } else {
    info.prediction_type = "epsilon";
    info.prediction_type_note =
        info.family == LdmFamily::SD2
            ? "assumed (cannot be read from the weights: SD 2.x 768-v models such as SD 2.1-768 need "
              "--prediction-type v_prediction; SD 2.1-base and sd-turbo are epsilon)"
        : info.family == LdmFamily::SDXL ? "assumed (SDXL base and sdxl-turbo are epsilon)"
                                         : "assumed (SD 1.x default)";
  }
  info.unet_config = infer_unet(s, info.family, info.prediction_type);
  const bool v768 = info.family == LdmFamily::SD2 && info.prediction_type == "v_prediction";
  const bool sdxl = info.family == LdmFamily::SDXL;
  if (info.has_vae) info.vae_config = infer_vae_ldm(s, kVaePrefix, sdxl ? 1024 : v768 ? 768 : 512, sdxl);
  if (info.has_text_encoder)
    info.text_encoder_config = infer_text_encoder(s, info.text_layout, info.text_prefix, sdxl);
  if (info.has_text_encoder_2) {
    info.text_encoder_2_config =
        infer_text_encoder(s, TextEncoderLayout::OpenClip, info.text_encoder_2_prefix, /*sdxl=*/true);
    // label_emb.0.0 takes the pooled text (projection_dim) + 6 embedded time ids: the time embedding width follows
    // from the two (SDXL: (2816 - 1280) / 6 = 256, the published value, kept when they do not divide).
    auto& u = info.unet_config;
    if (u.contains("projection_class_embeddings_input_dim")) {
      const int64_t rest = u["projection_class_embeddings_input_dim"].get<int64_t>() -
                           info.text_encoder_2_config["projection_dim"].get<int64_t>();
      if (rest > 0 && rest % 6 == 0) u["addition_time_embed_dim"] = rest / 6;
    }
  }
  if (sdxl)
    info.sample_size_note = "UNet sample_size 128 (1024 px, SDXL base) is assumed: the weights cannot tell; "
                            "sdxl-turbo single files are 512 px models and need --size 512x512 or --config DIR "
                            "(a diffusers sdxl-turbo folder of configs)";
  info.scheduler_config = {{"_class_name", "LCMScheduler"},       {"beta_start", 0.00085},
                           {"beta_end", 0.012},                    {"beta_schedule", "scaled_linear"},
                           {"num_train_timesteps", 1000},          {"prediction_type", info.prediction_type},
                           {"set_alpha_to_one", false},            {"steps_offset", 1},
                           {"clip_sample", false}};
  return info;
}

VaeFileInfo inspect_vae_file(const SafeTensorsFile& file) {
  const Shapes s{file};
  VaeFileInfo v;
  if (s.any_prefix(std::string(kVaePrefix) + "encoder.down.")) {
    v.layout = VaeFileLayout::Ldm;
    v.prefix = kVaePrefix;
    v.config = infer_vae_ldm(s, v.prefix, 512);
  } else if (s.any_prefix("encoder.down.")) {
    v.layout = VaeFileLayout::Ldm;
    v.config = infer_vae_ldm(s, "", 512);
  } else if (s.any_prefix("encoder.down_blocks.")) {
    v.layout = VaeFileLayout::Diffusers;
    v.config = infer_vae_diffusers(s);
  } else {
    throw FormatError(file.path(), "not an AutoencoderKL file: expected diffusers keys (encoder.down_blocks.*), "
                                   "original keys (encoder.down.*) or a full checkpoint's first_stage_model.*");
  }
  return v;
}

UnusedKeys unused_ldm_keys(const SafeTensorsFile& file, const std::vector<const LdmTable*>& tables) {
  std::set<std::string> used;
  for (const auto* t : tables)
    for (const auto& e : *t) used.insert(e.ldm);
  const std::set<std::string> ddpm(ddpm_buffer_names().begin(), ddpm_buffer_names().end());
  // SD 2.x conditions on the penultimate OpenCLIP layer: only the last stored resblock is unused. Any other resblock a
  // table does not read is a layer the text encoder's config has no place for (a --config with fewer layers).
  const std::string resblocks = std::string(kOpenClipPrefix) + "transformer.resblocks.";
  const std::set<int> stored = Shapes{file}.indices(resblocks);
  const std::string last_resblock = stored.empty() ? "" : resblocks + std::to_string(*stored.rbegin()) + ".";
  UnusedKeys out;
  for (const auto& t : file.tensors()) {
    const std::string& k = t.name;
    if (used.count(k)) continue;
    const bool known = ddpm.count(k) || starts_with(k, "model_ema.") ||
                       k == std::string(kHfClipPrefix) + "text_model.embeddings.position_ids" ||
                       k == std::string(kOpenClipPrefix) + "text_projection" ||
                       k == std::string(kOpenClipPrefix) + "logit_scale" ||
                       k == std::string(kSdxlClipPrefix) + "text_model.embeddings.position_ids" ||
                       k == std::string(kSdxlOpenClipPrefix) + "logit_scale" ||
                       (!last_resblock.empty() && starts_with(k, last_resblock)) ||
                       starts_with(k, std::string(kVaePrefix) + "loss.") || starts_with(k, "loss.");
    (known ? out.known : out.unknown).push_back(k);
  }
  return out;
}

std::vector<std::string> check_unread_ldm_keys(const SafeTensorsFile& file, const std::vector<const LdmTable*>& tables,
                                               const std::vector<std::string>& prefixes,
                                               const std::string& config_note) {
  std::vector<std::string> unread, others;
  for (auto& k : unused_ldm_keys(file, tables).unknown) {
    const bool loaded = std::any_of(prefixes.begin(), prefixes.end(),
                                    [&](const std::string& p) { return starts_with(k, p); });
    (loaded ? unread : others).push_back(std::move(k));
  }
  if (!unread.empty()) {
    std::string first;
    for (size_t i = 0; i < unread.size() && i < 5; ++i) first += (i ? ", " : "") + unread[i];
    throw FormatError(file.path(), std::to_string(unread.size()) + " tensor" + (unread.size() == 1 ? "" : "s") +
                                       " of the components loaded from this file fit no layer of the models built "
                                       "from " + config_note + " (" + first + (unread.size() > 5 ? ", ..." : "") +
                                       "): a config that does not match the file (--config of another model?), or "
                                       "layers this loader does not know; they would be dropped");
  }
  return others;
}

}  // namespace sd::convert
