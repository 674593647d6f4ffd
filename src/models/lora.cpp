#include "models/lora.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <set>
#include <sstream>

#include "io/ldm_checkpoint.h"
#include "io/state_dict.h"
#include "core/error.h"
#include "core/device.h"
#include "core/log.h"
#include "models/layers.h"

namespace sd {

namespace {


std::string underscored(std::string s) {
  std::replace(s.begin(), s.end(), '.', '_');
  return s;
}

// The LoRA-able leaves (Linear, Conv2d) of one component by dotted path, and the kohya spelling of each path.
struct ModuleIndex {
  struct Leaf {
    std::string path;
    nn::LinearImpl* linear = nullptr;
    nn::Conv2dImpl* conv = nullptr;
    torch::Tensor& weight() const { return linear ? linear->weight : conv->weight; }
    torch::Tensor& bias() const { return linear ? linear->bias : conv->bias; }
  };
  std::map<std::string, Leaf> leaves;
  std::set<std::string> others;                 // every other module path (to tell "not a Linear/Conv2d")
  std::map<std::string, std::string> kohya;     // underscored -> dotted ("" when two paths collide)

  ModuleIndex(torch::nn::Module& root, const std::string& component) {
    for (const auto& item : root.named_modules("", /*include_self=*/false)) {
      Leaf leaf;
      leaf.path = item.key();
      leaf.linear = dynamic_cast<nn::LinearImpl*>(item.value().get());
      leaf.conv = dynamic_cast<nn::Conv2dImpl*>(item.value().get());
      if (!leaf.linear && !leaf.conv) {
        others.insert(item.key());
        continue;
      }
      const std::string u = underscored(item.key());
      auto it = kohya.find(u);
      if (it == kohya.end())
        kohya[u] = item.key();
      else
        it->second.clear();  // ambiguous: such a stem matches nothing
      leaves.emplace(item.key(), std::move(leaf));
    }
    if (component == "unet") add_ldm_aliases();
  }

  // kohya's SDXL trainer (and some SD 1.x ones) name UNet modules as the original (LDM / sgm) layout does:
  // lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q, ..._middle_block_2_emb_layers_1. Those are the names
  // of single-file checkpoints, so the single-file key table built from this UNet's own modules gives them for any
  // config (levels, resnets per level, attention-less levels, transformer depths); diffusers 0.24 renames such files
  // with _maybe_map_sgm_blocks_to_diffusers to the same modules.
  void add_ldm_aliases() {
    // The table has a place for every module of these; modules beside them (an LCM UNet's time_embedding.cond_proj,
    // class embeddings) have none in LDM files, hence no alias.
    static const char* const mapped[] = {"conv_in.",     "time_embedding.linear_", "add_embedding.linear_",
                                         "down_blocks.", "mid_block.",             "up_blocks.",
                                         "conv_out."};
    std::vector<std::string> keys;
    for (const auto& [path, leaf] : leaves) {
      const std::string key = path + ".weight";
      for (const char* prefix : mapped)
        if (key.rfind(prefix, 0) == 0) {
          keys.push_back(key);
          break;
        }
    }
    convert::LdmTable table;
    try {
      table = convert::unet_ldm_table(keys, "");
    } catch (const InvalidArgument& e) {  // a block type the original layout has no place for: diffusers names only
      log::debug("LoRA: no original-layout UNet names for this UNet ({})", e.what());
      return;
    }
    std::map<std::string, std::string> aliases;
    for (const auto& e : table) {
      const std::string path = e.diffusers.substr(0, e.diffusers.size() - 7);  // less ".weight"
      const std::string alias = underscored(e.ldm.substr(0, e.ldm.size() - 7));
      auto [it, fresh] = aliases.emplace(alias, path);
      if (!fresh && it->second != path) it->second.clear();
    }
    for (const auto& [alias, path] : aliases) {
      auto [it, fresh] = kohya.emplace(alias, path);
      if (!fresh && it->second != path) it->second.clear();  // a diffusers stem of another module: ambiguous
    }
  }
};

struct Match {
  size_t pair;
  std::string component;
  ModuleIndex::Leaf leaf;  // a copy: the index lives only as long as match_impl
};

// PEFT / diffusers name DoRA's magnitude lora_magnitude_vector; kohya / LyCORIS dora_scale. The two differ in axis
// rule and in how the user's scale enters (LoraSet::fuse_target).
bool peft_magnitude(const LoraPair& p) { return p.magnitude_key.find("lora_magnitude_vector") != std::string::npos; }

// Which axis DoRA's magnitude scales for weight `w`: 0 per output channel, 1 per input channel, -1 when its shape
// fits neither. PEFT's lora_magnitude_vector is always per output channel: [out] for a Linear, [out] or, as
// _DoraConvNdLayer stores it (weight.norm(dim=(1, 2, 3), keepdim=True).transpose(1, 0)), [1, out, 1, 1] for a
// Conv2d - so its [1, X, 1, 1] must not be read as per input channel. For kohya / LyCORIS dora_scale the shape
// decides, as ComfyUI's weight_decompose does: [out, 1(, 1, 1)] (wd_on_output) or [1, in(, 1, 1)] (LyCORIS'
// original convention).
int dora_axis(const LoraPair& p, const torch::Tensor& m, const torch::Tensor& w) {
  const auto s = m.sizes();
  auto ones_from = [&](size_t i) {
    for (; i < s.size(); ++i)
      if (s[i] != 1) return false;
    return true;
  };
  if (peft_magnitude(p)) {
    if (s.size() == 1 && s[0] == w.size(0)) return 0;
    if (w.dim() == 4 && s.size() == 4 && s[0] == 1 && s[1] == w.size(0) && ones_from(2)) return 0;
    return -1;
  }
  if (s.empty() || s.size() > static_cast<size_t>(w.dim())) return -1;
  if (s[0] == w.size(0) && ones_from(1)) return 0;
  if (s.size() >= 2 && s[0] == 1 && s[1] == w.size(1) && ones_from(2)) return 1;
  return -1;
}

// DoRA's magnitude shaped to broadcast against weight `w` ([out, 1, ..] or [1, in, ..]).
torch::Tensor dora_magnitude(const LoraPair& p, const torch::Tensor& w) {
  std::vector<int64_t> shape(w.dim(), 1);
  const int axis = dora_axis(p, p.magnitude, w);
  shape[axis] = w.size(axis);
  return p.magnitude.reshape(shape);
}

// ||merged|| + eps over the axes magnitude m is 1 on. A channel of finite but huge values (past ~1.8e19) has an
// infinite float32 norm, and m / inf would zero it silently: NaN there instead, which the fuse's finiteness check
// refuses.
torch::Tensor dora_norm(const torch::Tensor& merged, const torch::Tensor& m) {
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < merged.dim(); ++d)
    if (m.size(d) == 1) dims.push_back(d);
  torch::Tensor norm = merged.norm(2, dims, /*keepdim=*/true).add_(std::numeric_limits<float>::epsilon());
  return norm.masked_fill_(torch::isinf(norm), std::numeric_limits<float>::quiet_NaN());
}

// The running weight `w` (float32) after a DoRA term with difference `delta` (W's shape), magnitude `m` (shaped by
// dora_magnitude) at user scale s (lora.h): PEFT's rule (lora_magnitude_vector) scales the difference before the
// norm, m * (W + s dW) / ||W + s dW||; ComfyUI's (dora_scale) blends W + s * (m * (W + dW) / ||W + dW|| - W).
// Out of place: `w` is left alone.
torch::Tensor dora_apply(const torch::Tensor& w, const torch::Tensor& delta, const torch::Tensor& m, double s,
                         bool peft) {
  torch::Tensor merged = peft && s != 1 ? w + delta * s : w + delta;
  merged.mul_(m / dora_norm(merged, m));
  if (peft || s == 1) return merged;
  merged.sub_(w).mul_(s);
  return merged.add_(w);
}

// Why the pair's shapes do not fit the leaf's weight, or "" when they do. Linear W [out, in]: down [r, in],
// up [out, r]. Conv2d W [out, in, kh, kw]: down [r, in, kh, kw], up [out, r, 1, 1] (diffusers' LoRAConv2dLayer).
// Other methods: the weight difference they make (LoraPair::delta_shape) is W's shape, or [out, in * kh * kw] for a
// convolution; a full module's diff_b is the bias's shape; a DoRA magnitude is one per output or input channel.
std::string shape_problem(const LoraPair& p, const ModuleIndex::Leaf& leaf) {
  if (leaf.conv) leaf.conv->restore_dense();  // a matched convolution's weight is read (and fused) from here on
  const torch::Tensor& w = leaf.weight();
  const std::string layer = std::string(leaf.linear ? "Linear" : "Conv2d") + " weight " + shape_str(w.sizes());
  if (p.method == "lora" && !p.has("lora_mid")) {
    bool ok;
    std::string want;
    if (leaf.linear) {
      ok = p.down.dim() == 2 && p.up.dim() == 2 && p.down.size(1) == w.size(1) && p.up.size(0) == w.size(0);
      want = "a Linear LoRA needs down [r, " + std::to_string(w.size(1)) + "] and up [" +
             std::to_string(w.size(0)) + ", r]";
    } else {
      ok = p.down.dim() == 4 && p.up.dim() == 4 && p.down.size(1) == w.size(1) && p.down.size(2) == w.size(2) &&
           p.down.size(3) == w.size(3) && p.up.size(0) == w.size(0) && p.up.size(2) == 1 && p.up.size(3) == 1;
      want = "a Conv2d LoRA needs down [r, " + std::to_string(w.size(1)) + ", " + std::to_string(w.size(2)) + ", " +
             std::to_string(w.size(3)) + "] and up [" + std::to_string(w.size(0)) + ", r, 1, 1]";
    }
    if (!ok)
      return p.down_key + " " + shape_str(p.down.sizes()) + " / " + p.up_key + " " + shape_str(p.up.sizes()) +
             " vs the model's " + leaf.path + " (" + layer + "; " + want + ")";
  } else if (!p.delta_shape.empty()) {
    const auto& d = p.delta_shape;
    const bool ok = d.size() == 4 ? w.sizes().vec() == d
                                  : d.size() == 2 && d[0] == w.size(0) && d[0] * d[1] == w.numel();
    if (!ok) {
      std::string keys;
      for (const auto& [part, key] : p.factor_keys)
        if (part != "diff_b") keys += (keys.empty() ? "" : " / ") + key + " " + shape_str(p.factor(part).sizes());
      if (!p.down_key.empty())
        keys = p.down_key + " " + shape_str(p.down.sizes()) + " / " + p.up_key + " " + shape_str(p.up.sizes()) +
               " / " + keys;
      std::string want = shape_str(w.sizes());
      if (leaf.conv) want += " (or [" + std::to_string(w.size(0)) + ", " + std::to_string(w.numel() / w.size(0)) + "])";
      return keys + " make a " + p.method_name() + " weight difference of " + shape_str(d) + " vs the model's " +
             leaf.path + " (" + layer + "; it needs " + want + ")";
    }
  }
  if (p.has("diff_b")) {
    const torch::Tensor& b = leaf.bias();
    const torch::Tensor& db = p.factor("diff_b");
    if (!b.defined())
      return p.factor_keys.at("diff_b") + " " + shape_str(db.sizes()) + " vs the model's " + leaf.path +
             ", which has no bias";
    if (db.sizes() != b.sizes())
      return p.factor_keys.at("diff_b") + " " + shape_str(db.sizes()) + " vs the model's " + leaf.path + " (bias " +
             shape_str(b.sizes()) + "; diff_b needs " + shape_str(b.sizes()) + ")";
  }
  if (p.magnitude.defined() && dora_axis(p, p.magnitude, w) < 0) {
    const std::string out = std::to_string(w.size(0));
    const std::string want =
        peft_magnitude(p)
            ? "a PEFT DoRA magnitude (lora_magnitude_vector) is per output channel: [" + out + "]" +
                  (w.dim() == 4 ? " or [1, " + out + ", 1, 1]" : "")
            : "a DoRA magnitude needs [" + out + "] or [" + out + ", 1" + (w.dim() == 4 ? ", 1, 1" : "") +
                  "] (per output channel) or [1, " + std::to_string(w.size(1)) + (w.dim() == 4 ? ", 1, 1" : "") +
                  "] (per input channel)";
    return p.magnitude_key + " " + shape_str(p.magnitude.sizes()) + " vs the model's " + leaf.path + " (" + layer +
           "; " + want + ")";
  }
  return "";
}

LoraReport match_impl(const LoraFile& file, const LoraComponents& components, std::vector<Match>* matches) {
  std::map<std::string, std::unique_ptr<ModuleIndex>> index;
  for (const auto& [name, module] : components)
    if (module) index[name] = std::make_unique<ModuleIndex>(*module, name);

  LoraReport r;
  r.path = file.path;
  r.layout = file.layout;
  r.keys = file.keys;
  std::set<std::string> unmatched(file.unparsed.begin(), file.unparsed.end());
  std::vector<std::string> bad_shapes;
  std::set<int64_t> ranks;
  std::set<std::string> methods;
  std::set<std::string> seen;  // component|module: one pair per module
  // A file whose UNet pairs all miss while its text-encoder pairs match is half a LoRA (UNet names of another layout
  // or another model): refused below rather than applied to the text encoders alone.
  size_t unet_pairs = 0, unet_matched = 0, text_matched = 0;
  std::string unet_missed;  // the first UNet pair's down key that names no module
  for (size_t i = 0; i < file.pairs.size(); ++i) {
    const LoraPair& p = file.pairs[i];
    std::string component = p.component;
    if (component.empty()) component = p.module.rfind("text_model.", 0) == 0 ? "text_encoder" : "unet";
    const ModuleIndex::Leaf* leaf = nullptr;
    auto ix = index.find(component);
    const bool unet = component == "unet" && ix != index.end();
    unet_pairs += unet;
    if (ix != index.end()) {
      std::string path = p.module;
      if (p.underscored) {
        auto k = ix->second->kohya.find(p.module);
        path = k == ix->second->kohya.end() ? "" : k->second;
      }
      auto l = ix->second->leaves.find(path);
      if (l != ix->second->leaves.end()) leaf = &l->second;
    }
    if (!leaf || !seen.insert(component + "|" + leaf->path).second) {
      for (const std::string& k : p.keys()) unmatched.insert(k);
      if (unet && unet_missed.empty()) unet_missed = p.first_key();
      continue;
    }
    const std::string problem = shape_problem(p, *leaf);
    if (!problem.empty()) {
      bad_shapes.push_back(problem);
      continue;
    }
    (unet ? unet_matched : text_matched) += 1;
    r.modules[component].push_back(leaf->path);
    r.matched_keys += p.keys().size();
    if (p.rank() > 0) ranks.insert(p.rank());
    if (!p.plain()) {
      const std::string name = p.method_name();
      const auto plus = name.find(" + DoRA");
      if (plus != std::string::npos) methods.insert("DoRA");
      if (name.substr(0, plus) != "LoRA") methods.insert(name.substr(0, plus));
    }
    if (matches) matches->push_back({i, component, *leaf});
  }
  if (!bad_shapes.empty()) {
    std::ostringstream msg;
    msg << "this LoRA does not fit the model (a LoRA for another model family, e.g. SD 2.x on SD 1.5?): "
        << bad_shapes.size() << " module" << (bad_shapes.size() == 1 ? " has" : "s have") << " other shapes";
    for (size_t i = 0; i < std::min<size_t>(bad_shapes.size(), 8); ++i) msg << "\n  " << bad_shapes[i];
    if (bad_shapes.size() > 8) msg << "\n  ... and " << bad_shapes.size() - 8 << " more";
    throw FormatError(file.path, msg.str());
  }
  if (unet_pairs > 0 && unet_matched == 0 && text_matched > 0)
    throw FormatError(file.path, "its text-encoder pairs patch this model but none of its " +
                                     std::to_string(unet_pairs) + " UNet pairs does (e.g. " + unet_missed +
                                     ": no UNet module of that name, in diffusers' or the original LDM / sgm "
                                     "layout's names); refusing to apply the text-encoder half alone (a LoRA for "
                                     "another model family?)");
  // File order for the unmatched list.
  for (const auto& name : file.unparsed)
    if (unmatched.erase(name)) r.unmatched.push_back(name);
  for (const auto& p : file.pairs)
    for (const std::string& k : p.keys())
      if (unmatched.erase(k)) r.unmatched.push_back(k);
  r.ranks.assign(ranks.begin(), ranks.end());
  r.methods.assign(methods.begin(), methods.end());
  if (r.matched_keys == 0) {
    std::ostringstream msg;
    msg << "none of its " << file.keys << " keys patches a module of this model (layout " << file.layout << ")";
    for (size_t i = 0; i < std::min<size_t>(r.unmatched.size(), 5); ++i) msg << (i ? ", " : ": ") << r.unmatched[i];
    if (r.unmatched.size() > 5) msg << ", ...";
    msg << "; not a LoRA for this model (or not a LoRA at all)?";
    throw FormatError(file.path, msg.str());
  }
  return r;
}

}  // namespace

LoraReport match_lora(const LoraFile& file, const LoraComponents& components) {
  return match_impl(file, components, nullptr);
}

LoraSet::LoraSet(LoraComponents components, bool keep_base)
    : components_(std::move(components)), keep_base_(keep_base) {}

LoraSet::~LoraSet() = default;

const LoraReport& LoraSet::add(const LoraSpec& spec, bool strict) {
  if (!std::isfinite(spec.scale)) throw InvalidArgument("LoRA " + spec.path + ": the scale must be a finite number");
  for (const auto& r : reports_)
    if (r.name == spec.name) throw InvalidArgument("two LoRAs named '" + spec.name + "'");
  const LoraFile file = read_lora_file(spec.path);
  std::vector<Match> matches;
  LoraReport report = match_impl(file, components_, &matches);
  report.name = spec.name;
  report.scale = spec.scale;
  if (!report.unmatched.empty()) {
    std::ostringstream names;
    for (size_t i = 0; i < std::min<size_t>(report.unmatched.size(), 5); ++i)
      names << (i ? ", " : "") << report.unmatched[i];
    if (report.unmatched.size() > 5) names << ", ...";
    const std::string msg = std::to_string(report.unmatched.size()) + " of its " + std::to_string(report.keys) +
                            " keys patch nothing in this model: " + names.str();
    if (strict) throw FormatError(spec.path, msg + " (--strict-lora)");
    log::warn("LoRA {}: {} (ignored; --strict-lora makes this an error)", spec.name, msg);
  }

  torch::NoGradGuard no_grad;
  // Finite factors and alpha can still make an infinite up' (alpha 3e38), or a product of other methods' factors
  // overflow: checked before anything is changed.
  for (const Match& m : matches) {
    const LoraPair& p = file.pairs[m.pair];
    if (p.plain()) {
      if (p.alpha && !torch::isfinite(p.up.flatten(1).mul(*p.alpha).div(p.rank())).all().item<bool>())
        throw FormatError(spec.path, p.up_key + ": alpha " + std::to_string(*p.alpha) + " / rank " +
                                         std::to_string(p.rank()) + " times this up factor overflows float32 (" +
                                         m.component + " " + m.leaf.path + ")");
      continue;
    }
    torch::Tensor d;
    try {
      d = lora_delta(p);
    } catch (const c10::Error& e) {  // shapes the reader's checks let through that a product still refuses
      throw FormatError(spec.path, p.first_key() + ": the " + p.method_name() + " factors do not make a weight "
                                       "difference (" + e.what_without_backtrace() + ")");
    }
    if (d.defined() && !torch::isfinite(d).all().item<bool>())
      throw FormatError(spec.path, p.first_key() + ": the " + p.method_name() +
                                       " weight difference these factors (and alpha) make overflows float32 (" +
                                       m.component + " " + m.leaf.path + ")");
    // DoRA divides a finite magnitude by a norm that may be tiny: m / (||W + dW|| + eps) can overflow although every
    // term is finite. Checked on the module's weight as it is now, at this LoRA's scale.
    if (p.magnitude.defined() && d.defined() && spec.scale != 0) {
      const torch::Tensor w = m.leaf.weight().detach().to(torch::kFloat);
      const torch::Tensor fused =
          dora_apply(w, d.reshape(w.sizes()), dora_magnitude(p, w), spec.scale, peft_magnitude(p));
      if (!torch::isfinite(fused).all().item<bool>())
        throw FormatError(spec.path, p.magnitude_key + ": this DoRA magnitude " + shape_str(p.magnitude.sizes()) +
                                         " over the norm of " + m.component + " " + m.leaf.path + " + its " +
                                         p.method_name() + " weight difference overflows float32 (a magnitude too "
                                         "large for a near-zero norm?)");
    }
  }
  const size_t lora = reports_.size();
  std::vector<size_t> touched;
  // The target of a module's weight (or, for a full module's diff_b, its bias), made on first use.
  auto target = [&](const Match& m, bool bias) -> size_t {
    const std::string id = m.component + "|" + m.leaf.path + (bias ? "|bias" : "");
    auto it = target_index_.find(id);
    if (it == target_index_.end()) {
      Target t;
      t.component = m.component;
      t.module = m.leaf.path;
      t.weight = bias ? m.leaf.bias() : m.leaf.weight();
      // A separate handle to the loaded storage: set_data() on the parameter later leaves it alone.
      t.base = t.weight.detach();
      if (!bias) {
        t.linear = m.leaf.linear;
        t.conv = m.leaf.conv;
        if (t.conv) t.conv->restore_dense();
        t.repack = t.conv && t.conv->prepacked();
      } else {
        t.bias_linear = m.leaf.linear;
        t.bias_conv = m.leaf.conv;
      }
      targets_.push_back(std::move(t));
      it = target_index_.emplace(id, targets_.size() - 1).first;
    }
    touched.push_back(it->second);
    return it->second;
  };
  for (const Match& m : matches) {
    const LoraPair& p = file.pairs[m.pair];
    const bool weight = p.plain() || !p.delta_shape.empty();
    const size_t ti = weight ? target(m, false) : target(m, true);
    Target& t = targets_[ti];
    const auto dev = t.weight.device();
    Term term;
    term.lora = lora;
    if (p.plain()) {
      torch::Tensor up = p.up.flatten(1);
      // diffusers: w_up = w_up * network_alpha / rank (two float32 operations, in this order).
      if (p.alpha) up = up.mul(*p.alpha).div(p.rank());
      term.up = up.to(dev).contiguous();
      term.down = p.down.flatten(1).to(dev).contiguous();
      t.terms.push_back(std::move(term));
      continue;
    }
    auto module = std::make_shared<LoraPair>(p);
    if (module->down.defined()) module->down = module->down.to(dev);
    if (module->up.defined()) module->up = module->up.to(dev);
    for (auto& kv : module->factors) kv.second = kv.second.to(dev);
    if (module->magnitude.defined()) {
      term.magnitude = dora_magnitude(p, t.base).to(dev);
      term.peft_dora = peft_magnitude(p);
      module->magnitude = torch::Tensor();  // the reshaped copy above is the one read
    }
    term.module = module;
    if (weight) {
      t.terms.push_back(term);
      if (p.has("diff_b")) {
        Term b = term;
        b.bias = true;
        targets_[target(m, true)].terms.push_back(std::move(b));
      }
    } else {
      term.bias = true;
      t.terms.push_back(std::move(term));
    }
  }
  std::sort(touched.begin(), touched.end());
  touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
  reports_.push_back(std::move(report));
  lora_targets_.push_back(std::move(touched));
  return reports_.back();
}

torch::Tensor LoraSet::fused_weight(const Target& t, Overflow* overflow) const {
  torch::Tensor w = t.base.to(torch::kFloat);  // aliases base for float32: the first sum is out of place
  const auto finite = [](const torch::Tensor& x) { return torch::isfinite(x).all().item<bool>(); };
  if (overflow && !finite(w)) {
    overflow->what = Overflow::kBase;
    return w;
  }
  bool changed = false;
  for (const Term& term : t.terms) {
    const double s = reports_[term.lora].scale;
    if (s == 0) continue;
    Overflow::What what = Overflow::kDifference;
    if (!term.module) {
      // diffusers: fused = w_orig + lora_scale * (up' @ down), the conv product reshaped to W's shape (the same
      // float32 operations in the same order; in place where the tensor is our own).
      torch::Tensor delta = torch::mm(term.up, term.down).reshape(t.base.sizes());
      delta.mul_(s);
      if (changed)
        w.add_(delta);
      else
        w = w + delta;
    } else {
      torch::Tensor delta = term.bias ? term.module->factor("diff_b") : lora_delta(*term.module);
      delta = delta.reshape(t.base.sizes());
      if (term.magnitude.defined()) {
        // Naming only: the difference (at PEFT's scale, or ComfyUI's blend at a large one), the norm of what DoRA
        // normalises, or the magnitude over that norm. PEFT's rule normalises W + s dW; ComfyUI's
        // W_d = m (W + dW) / ||W + dW|| is then blended by s.
        if (overflow) {
          const torch::Tensor merged = term.peft_dora ? w + delta * s : w + delta;
          if (finite(merged))
            what = !finite(dora_norm(merged, term.magnitude)) ? Overflow::kNorm
                   : !finite(dora_apply(w, delta, term.magnitude, term.peft_dora ? s : 1.0, term.peft_dora))
                       ? Overflow::kMagnitude
                       : Overflow::kDifference;
        }
        // DoRA on the running weight, s by PEFT's rule or ComfyUI's (dora_apply, lora.h).
        w = dora_apply(w, delta, term.magnitude, s, term.peft_dora);
      } else {
        delta = delta.mul(s);  // out of place: a full module's diff_b is the kept factor itself
        if (changed)
          w.add_(delta);
        else
          w = w + delta;
      }
    }
    changed = true;
    if (overflow && !finite(w)) {
      overflow->term = &term;
      overflow->what = what;
      break;
    }
  }
  return changed ? w : torch::Tensor();
}

// Every fuse checks its result: a scale (the user's, or one a file's factors make extreme) can overflow float32 in
// any method's sum, DoRA divides by a norm that may vanish, and a float32 result can pass the run dtype's range on the
// cast (float16's 65504). A weight that is not finite would turn every frame into NaN with no word of why. Once a
// value is not finite the rest of the sum keeps it so (inf + x, inf - inf, DoRA's inf / inf; dora_apply turns an
// infinite norm into NaN), so one test of the result suffices and the sum is only run again, term by term, to name
// the first term that overflows.
std::string LoraSet::fuse_target(Target& t, bool apply) {
  torch::NoGradGuard no_grad;
  if (!t.base.defined())
    throw InvalidArgument("this model was loaded without live LoRA scale changes (the unfused weights were not kept)");
  const torch::Tensor w32 = fused_weight(t, nullptr);
  torch::Tensor w = w32.defined() ? w32.to(t.base.scalar_type()) : t.base;
  if (w32.defined() && !torch::isfinite(w).all().item<bool>()) {
    Overflow o;
    fused_weight(t, &o);
    return overflow_message(t, o);
  }
  if (apply) put(t, w);
  return {};
}

void LoraSet::put(Target& t, const torch::Tensor& w) {
  t.weight.set_data(w);
  ++weight_changes_;
  // An int8 copy is made again now, from the weight just set: its own check (storage and version) would notice at
  // the next call, but a copy made now cannot go stale in between.
  if (t.linear && t.linear->quantized()) t.linear->quantize_int8();
  if (t.bias_linear && t.bias_linear->quantized()) t.bias_linear->quantize_int8();
  if (t.bias_conv && t.bias_conv->quantized()) t.bias_conv->quantize_int8();
  if (t.conv && t.conv->quantized()) {
    t.conv->quantize_int8();  // the int8 copy is what it reads; no float packed copy to make
  } else if (t.conv && t.repack) {
    t.conv->prepack();
    // The fused weight is re-made from base + terms on the next fuse, so the packed copy can be its only one.
    if (sd::nn::fast_path().one_conv_copy) t.conv->release_dense();
  }
}

std::string LoraSet::overflow_message(const Target& t, const Overflow& o) const {
  const bool bias = t.bias_linear || t.bias_conv;
  const std::string where = t.component + " " + t.module + (bias ? " bias" : "");
  std::ostringstream msg;
  if (o.what == Overflow::kBase) {
    msg << "the model's own " << where << " is not finite (NaN or inf in the loaded weights)";
    return msg.str();
  }
  if (!o.term) {  // finite in float32, not in the run dtype
    msg << "the fused weight of " << where << " is finite in float32 but overflows " << dtype_name(t.base.scalar_type())
        << ", the weights' dtype, at these scales (";
    bool first = true;
    for (const Term& x : t.terms)
      if (reports_[x.lora].scale != 0) {
        msg << (first ? "" : ", ") << "'" << reports_[x.lora].name << "' " << reports_[x.lora].scale;
        first = false;
      }
    msg << "; --dtype fp32 would hold it)";
    return msg.str();
  }
  const Term& bad = *o.term;
  msg << reports_[bad.lora].path << ": ";
  if (o.what == Overflow::kNorm) {
    msg << bad.module->magnitude_key << ": the norm DoRA divides by overflows float32: " << where << " + its "
        << bad.module->method_name() << " weight difference is too large at these scales (an earlier LoRA's scale?)";
  } else if (o.what == Overflow::kMagnitude) {
    msg << bad.module->magnitude_key << ": this DoRA magnitude over the norm of " << where << " + its "
        << bad.module->method_name() << " weight difference overflows float32 at that scale (a magnitude too large "
        << "for a near-zero norm?)";
  } else {  // a difference too large at its scale, or one pushing a sum already near float32's limit past it
    if (!bad.module)
      msg << "its LoRA";
    else if (bad.bias)
      msg << bad.module->factor_keys.at("diff_b") << ": its bias";
    else
      msg << bad.module->first_key() << ": its " << bad.module->method_name();
    msg << " weight difference on " << where << " overflows float32 at that scale";
  }
  return msg.str();
}

void LoraSet::fuse() {
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < targets_.size(); ++i) {
    Target& t = targets_[i];
    const std::string bad = fuse_target(t, true);
    if (!bad.empty()) {
      if (keep_base_)
        for (size_t j = 0; j < i; ++j) put(targets_[j], targets_[j].base);  // the model as loaded
      throw InvalidArgument("LoRAs not fused (" + scales() + "): " + bad);
    }
    if (!keep_base_) {  // one-shot: neither the unfused weights nor the factors are needed again (freed as it goes:
      t.base = torch::Tensor();  // a reduced-precision model's base is a copy of its own, as large as the fused one)
      t.terms.clear();
      t.terms.shrink_to_fit();
    }
  }
  fused_ = true;
  fuse_s_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string LoraSet::scales() const {
  std::ostringstream s;
  for (size_t i = 0; i < reports_.size(); ++i)
    s << (i ? ", " : "") << "'" << reports_[i].name << "' " << reports_[i].scale;
  return s.str();
}

void LoraSet::set_scale(const std::string& name, double scale) {
  if (!std::isfinite(scale)) throw InvalidArgument("LoRA scale must be a finite number");
  size_t lora = reports_.size();
  std::string names;
  for (size_t i = 0; i < reports_.size(); ++i) {
    if (reports_[i].name == name) lora = i;
    names += (i ? ", " : "") + reports_[i].name;
  }
  if (lora == reports_.size())
    throw InvalidArgument("no LoRA named '" + name + "'" + (names.empty() ? " (none loaded)" : " (loaded: " + names + ")"));
  if (!keep_base_ && fused_)
    throw InvalidArgument("this model was loaded without live LoRA scale changes (the unfused weights were not kept)");
  const auto t0 = std::chrono::steady_clock::now();
  const double before = reports_[lora].scale;
  reports_[lora].scale = scale;
  // Fused target by target (no second copy of the weights); the first that overflows puts the scale back and
  // re-fuses the targets already done, bit-identical to before (fused_weight is deterministic in base and terms).
  // Before the first fuse() only the check runs: fuse() makes the weights.
  const std::vector<size_t>& targets = lora_targets_[lora];
  const auto fuse_back = [&](size_t n) {  // the first n targets, at the scale put back
    reports_[lora].scale = before;
    if (fused_)
      for (size_t j = 0; j < n; ++j)
        if (const std::string bad = fuse_target(targets_[targets[j]], true); !bad.empty())
          throw Error("LoRA '" + name + "': fusing back at scale " + std::to_string(before) + " failed: " + bad);
  };
  size_t done = 0;
  std::string bad;
  try {
    for (; done < targets.size() && bad.empty(); ++done) bad = fuse_target(targets_[targets[done]], fused_);
  } catch (...) {  // not an overflow (out of memory, say): the same state as before, as far as it can be made
    try {
      fuse_back(std::min(done + 1, targets.size()));
    } catch (...) {  // some weights may stay at the new scale: cached prompt embeddings must not be trusted
      if (reports_[lora].patches("text_encoder") || reports_[lora].patches("text_encoder_2")) ++text_encoder_version_;
    }
    throw;
  }
  if (!bad.empty()) {
    fuse_back(done - 1);
    std::ostringstream msg;
    msg << "LoRA '" << name << "': scale " << scale << " refused (it stays " << before << ", no weight changed): "
        << bad;
    throw InvalidArgument(msg.str());
  }
  if (reports_[lora].patches("text_encoder") || reports_[lora].patches("text_encoder_2")) ++text_encoder_version_;
  fuse_s_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace sd
