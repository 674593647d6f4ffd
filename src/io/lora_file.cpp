#include "io/lora_file.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <algorithm>
#include <map>
#include <set>
#include <sstream>

#include <torch/torch.h>

#include "io/state_dict.h"
#include "core/error.h"
#include "core/text.h"
#include "io/model_folder.h"
#include "io/safetensors.h"

namespace sd {

namespace {



enum class Part { Down, Up, Alpha, Factor };

// Key parts of the methods beyond a down / up pair that are fused (LoraPair::factors; DoRA's magnitudes).
const char* const kFactorParts[] = {"lora_mid",  "hada_w1_a", "hada_w1_b",  "hada_w2_a", "hada_w2_b",
                                    "hada_t1",   "hada_t2",   "lokr_w1",    "lokr_w1_a", "lokr_w1_b",
                                    "lokr_w2",   "lokr_w2_a", "lokr_w2_b",  "lokr_t2",   "diff",
                                    "diff_b",    "dora_scale", "lora_magnitude_vector"};

// The factor part a key's tail names ("hada_w1_a", "lora_mid.weight", "lora_magnitude_vector.weight"), or "".
std::string factor_part(const std::string& tail) {
  std::string t = tail;
  if (ends_with(t, ".weight")) t.resize(t.size() - 7);
  for (const char* part : kFactorParts)
    if (t == part) return t;
  return "";
}

struct ParsedKey {
  Part part;
  std::string factor;  // Part::Factor: which one
  std::string component;  // "unet" | "text_encoder" | "text_encoder_2" | ""
  std::string module;
  bool underscored = false;
  const char* layout;
};

// What one key of a LoRA file is, or nullopt when no supported layout explains it.
std::optional<ParsedKey> parse_key(const std::string& key) {
  ParsedKey p;
  // kohya / A1111: lora_unet_<stem>.lora_down.weight | .lora_up.weight | .alpha
  // SDXL files name the two text encoders lora_te1_ / lora_te2_. SimpleTuner's LyCORIS files name UNet modules
  // lycoris_<stem>, which ComfyUI (comfy/lora.py, model_lora_keys_unet) maps like lora_unet_<stem> of the diffusers
  // module path; it has no text-encoder form.
  for (const auto& [prefix, component] : {std::pair<const char*, const char*>{"lora_unet_", "unet"},
                                          std::pair<const char*, const char*>{"lycoris_", "unet"},
                                          std::pair<const char*, const char*>{"lora_te_", "text_encoder"},
                                          std::pair<const char*, const char*>{"lora_te1_", "text_encoder"},
                                          std::pair<const char*, const char*>{"lora_te2_", "text_encoder_2"}}) {
    if (!starts_with(key, prefix)) continue;
    const auto dot = key.find('.');
    if (dot == std::string::npos) return std::nullopt;
    const std::string stem = key.substr(std::string(prefix).size(), dot - std::string(prefix).size());
    const std::string suffix = key.substr(dot);
    if (suffix == ".lora_down.weight")
      p.part = Part::Down;
    else if (suffix == ".lora_up.weight")
      p.part = Part::Up;
    else if (suffix == ".alpha")
      p.part = Part::Alpha;
    else if (!(p.factor = factor_part(suffix.substr(1))).empty())
      p.part = Part::Factor;
    else
      return std::nullopt;  // (IA)^3, OFT, GLoRA, ...: lora_method() refuses them
    if (stem.empty()) return std::nullopt;
    p.component = component;
    p.module = stem;
    p.underscored = true;
    p.layout = "kohya";
    return p;
  }

  // Dotted layouts: strip the PEFT wrapper and the component prefix.
  std::string rest = key;
  if (starts_with(rest, "base_model.model.")) rest = rest.substr(17);
  if (starts_with(rest, "unet.")) {
    p.component = "unet";
    while (starts_with(rest, "unet.")) rest = rest.substr(5);  // "unet.unet." of diffusers 0.24's training scripts
  } else if (starts_with(rest, "text_encoder.")) {
    p.component = "text_encoder";
    rest = rest.substr(13);
  } else if (starts_with(rest, "text_encoder_2.")) {  // SDXL's second encoder
    p.component = "text_encoder_2";
    rest = rest.substr(15);
  }
  struct Suffix {
    const char* text;
    Part part;
    const char* layout;
  };
  static const Suffix suffixes[] = {
      {".lora.down.weight", Part::Down, "diffusers"},
      {".lora.up.weight", Part::Up, "diffusers"},
      {".lora_linear_layer.down.weight", Part::Down, "diffusers"},
      {".lora_linear_layer.up.weight", Part::Up, "diffusers"},
      {".lora_A.weight", Part::Down, "peft"},
      {".lora_B.weight", Part::Up, "peft"},
      {".lora_down.weight", Part::Down, "kohya"},
      {".lora_up.weight", Part::Up, "kohya"},
      {".alpha", Part::Alpha, nullptr},
  };
  for (const auto& s : suffixes) {
    if (!ends_with(rest, s.text)) continue;
    // (Legacy processor keys end in "_lora.down.weight" and fall through to the loop below.)
    std::string module = rest.substr(0, rest.size() - std::string(s.text).size());
    if (module.empty()) return std::nullopt;
    p.part = s.part;
    p.module = module;
    p.layout = s.layout ? s.layout : (p.component.empty() ? "peft" : "diffusers");
    return p;
  }
  // LyCORIS / DoRA terms on a dotted module path (PEFT's lora_magnitude_vector[.weight] beside lora_A / lora_B).
  const auto dot = rest.rfind('.', ends_with(rest, ".weight") ? rest.size() - 8 : std::string::npos);
  if (dot != std::string::npos && dot > 0 && !(p.factor = factor_part(rest.substr(dot + 1))).empty()) {
    p.part = Part::Factor;
    p.module = rest.substr(0, dot);
    p.layout = p.component.empty() ? "peft" : "diffusers";
    return p;
  }
  // Legacy diffusers (< 0.21): <attn>.processor.to_{q,k,v,out}_lora.{down,up}.weight (UNet) and
  // <layer>.self_attn.to_{q,k,v,out}_lora.{down,up}.weight (text encoder).
  for (const char* half : {"down", "up"}) {
    for (const char* proj : {"to_q", "to_k", "to_v", "to_out"}) {
      const std::string tail = std::string(".") + proj + "_lora." + half + ".weight";
      if (!ends_with(rest, tail)) continue;
      std::string base = rest.substr(0, rest.size() - tail.size());
      p.part = std::string(half) == "down" ? Part::Down : Part::Up;
      p.layout = "diffusers_legacy";
      const std::string P = proj;
      if (ends_with(base, ".processor")) {
        base = base.substr(0, base.size() - 10);
        p.module = base + "." + (P == "to_out" ? std::string("to_out.0") : P);
        if (p.component.empty()) p.component = "unet";
      } else if (ends_with(base, ".self_attn")) {
        const std::string tr = P == "to_q" ? "q_proj" : P == "to_k" ? "k_proj" : P == "to_v" ? "v_proj" : "out_proj";
        p.module = base + "." + tr;
        if (p.component.empty()) p.component = "text_encoder";
      } else {
        return std::nullopt;
      }
      return p;
    }
  }
  return std::nullopt;
}

// LyCORIS methods without a fusion here (multiplicative or rotating ones). Their keys are recognised so that such a
// file is refused: fusing the rest of it alone would silently give other weights than the file was trained for.
struct Method {
  const char* name;     // for the error: the method and the key part that shows it
  const char* part;     // a key's last name part (before a trailing ".weight")
  bool prefix = false;  // `part` is a prefix (hada_w1_a, lokr_w2_b, ...)
};

// The method a key belongs to and the module stem it names, or nullptr.
const Method* lora_method(const std::string& key, std::string* stem) {
  static const Method methods[] = {
      {"LyCORIS (IA)^3 (on_input)", "on_input"},
      {"LyCORIS OFT (oft_blocks)", "oft_blocks"},
      {"LyCORIS GLoRA (a1 / a2 / b1 / b2)", "a1"},
      {"LyCORIS GLoRA (a1 / a2 / b1 / b2)", "a2"},
      {"LyCORIS GLoRA (a1 / a2 / b1 / b2)", "b1"},
      {"LyCORIS GLoRA (a1 / a2 / b1 / b2)", "b2"},
  };
  std::string rest = key;
  if (ends_with(rest, ".weight")) rest.resize(rest.size() - 7);
  const auto dot = rest.rfind('.');
  if (dot == std::string::npos || dot == 0) return nullptr;
  const std::string last = rest.substr(dot + 1);
  for (const Method& m : methods) {
    if (m.prefix ? !starts_with(last, m.part) : last != m.part) continue;
    *stem = rest.substr(0, dot);
    return &m;
  }
  return nullptr;
}

torch::Tensor checked_float(const SafeTensorsFile& f, const std::string& key) {
  torch::Tensor t = f.get(key);
  if (!t.is_floating_point())
    throw FormatError(f.path(), key + ": a LoRA factor must be a float tensor, got " +
                                    std::string(c10::toString(t.scalar_type())));
  t = t.to(torch::kFloat);
  if (t.numel() > 0 && !torch::isfinite(t).all().item<bool>())
    throw FormatError(f.path(), key + ": contains NaN or Inf values (a broken or overflowed LoRA; refusing to fuse it)");
  return t;
}

double parse_scale(const std::string& text, const std::string& arg, const std::string& option) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || end == text.c_str() || *end != '\0' || errno == ERANGE || !std::isfinite(v))
    throw InvalidArgument(option + " '" + arg + "': the scale '" + text + "' is not a finite number");
  return v;
}

bool is_number(const std::string& text) {
  if (text.empty()) return false;
  char* end = nullptr;
  errno = 0;
  std::strtod(text.c_str(), &end);
  return end != text.c_str() && *end == '\0';
}

}  // namespace

std::string LoraReport::summary() const {
  std::ostringstream o;
  o << layout;
  for (size_t i = 0; i < methods.size(); ++i)
    o << (i ? ", " : " (") << methods[i] << (i + 1 == methods.size() ? ")" : "");
  o << ", " << module_count("unet") << " UNet + " << module_count("text_encoder") + module_count("text_encoder_2")
    << " text-encoder modules";
  if (!ranks.empty()) o << ", rank";
  for (size_t i = 0; i < ranks.size(); ++i) o << (i ? "/" : " ") << ranks[i];
  o << ", scale " << scale;
  if (!unmatched.empty()) o << ", " << unmatched.size() << " unmatched keys";
  return o.str();
}

LoraSpec parse_lora_spec(const std::string& arg, const std::string& option) {
  LoraSpec s;
  if (arg.empty()) throw InvalidArgument(option + ": empty argument (expected FILE or FILE:SCALE)");
  if (is_file(arg)) {
    s.path = arg;
    return s;
  }
  const auto colon = arg.rfind(':');
  if (colon != std::string::npos) {
    const std::string path = arg.substr(0, colon), scale = arg.substr(colon + 1);
    if (is_number(scale)) {
      if (path.empty()) throw InvalidArgument(option + " '" + arg + "': no file before the scale");
      s.scale = parse_scale(scale, arg, option);
      if (!is_file(path)) throw InvalidArgument(option + " '" + arg + "': LoRA file '" + path + "' not found");
      s.path = path;
      return s;
    }
    if (scale.empty() && !path.empty() && is_file(path))
      throw InvalidArgument(option + " '" + arg + "': nothing after ':' (give FILE or FILE:SCALE, e.g. " + path +
                            ":0.7)");
  }
  if (is_directory(arg))
    throw InvalidArgument(option + " '" + arg + "': a folder; give the LoRA's .safetensors file");
  throw InvalidArgument(option + " '" + arg + "': no such file (give FILE or FILE:SCALE, e.g. lora.safetensors:0.7)");
}

void name_loras(std::vector<LoraSpec>& specs) {
  std::map<std::string, int> seen;
  for (auto& s : specs) {
    if (s.name.empty()) {
      std::filesystem::path p(s.path);
      s.name = p.stem().string();
      if (s.name.empty()) s.name = "lora";
    }
    // a, a -> a, a_2; a name already taken (a_2 given too) gets the next free suffix.
    if (seen.count(s.name)) {
      const std::string stem = s.name;
      int n = seen[stem];
      do s.name = stem + "_" + std::to_string(++n); while (seen.count(s.name));
      seen[stem] = n;
    }
    seen.emplace(s.name, 1);
  }
}

std::vector<std::string> LoraPair::keys() const {
  std::vector<std::string> out;
  for (const std::string* k : {&down_key, &up_key, &alpha_key, &magnitude_key})
    if (!k->empty()) out.push_back(*k);
  for (const auto& kv : factor_keys) out.push_back(kv.second);
  return out;
}

std::string LoraPair::first_key() const {
  if (!down_key.empty()) return down_key;
  for (const char* part : kFactorParts)
    if (factor_keys.count(part)) return factor_keys.at(part);
  return magnitude_key.empty() ? alpha_key : magnitude_key;
}

std::string LoraPair::method_name() const {
  std::string m = method == "loha"   ? "LoHa"
                  : method == "lokr" ? "LoKr"
                  : method == "full" ? "full"
                  : has("lora_mid")  ? "Tucker LoCon"
                                     : "LoRA";
  return magnitude.defined() ? m + " + DoRA" : m;
}

namespace {

// Tucker rebuild of LyCORIS (lycoris/functional/general.py rebuild_tucker, ComfyUI tucker_weight):
// out[p, q, k, l] = sum_ij t[i, j, k, l] a[i, p] b[j, q], with a [r, out] and b [r', in].
torch::Tensor tucker(const torch::Tensor& t, const torch::Tensor& a, const torch::Tensor& b) {
  return torch::einsum("ijkl,jq,ip->pqkl", {t, b, a});
}

double alpha_scale(const LoraPair& p) { return p.alpha && p.delta_rank > 0 ? *p.alpha / p.delta_rank : 1.0; }

torch::Tensor lokr_w1(const LoraPair& p) {
  return p.has("lokr_w1") ? p.factor("lokr_w1") : torch::mm(p.factor("lokr_w1_a"), p.factor("lokr_w1_b"));
}

torch::Tensor lokr_w2(const LoraPair& p) {
  if (p.has("lokr_w2")) return p.factor("lokr_w2");
  if (p.has("lokr_t2")) return tucker(p.factor("lokr_t2"), p.factor("lokr_w2_a"), p.factor("lokr_w2_b"));
  return torch::mm(p.factor("lokr_w2_a"), p.factor("lokr_w2_b").flatten(1));
}

}  // namespace

torch::Tensor lora_delta(const LoraPair& p) {
  torch::NoGradGuard no_grad;
  torch::Tensor d;
  if (p.method == "lora") {
    if (p.has("lora_mid"))
      d = tucker(p.factor("lora_mid"), p.up.flatten(1).t(), p.down.flatten(1));
    else
      d = torch::mm(p.up.flatten(1), p.down.flatten(1));
  } else if (p.method == "loha") {
    if (p.has("hada_t1"))
      d = tucker(p.factor("hada_t1"), p.factor("hada_w1_a"), p.factor("hada_w1_b")) *
          tucker(p.factor("hada_t2"), p.factor("hada_w2_a"), p.factor("hada_w2_b"));
    else
      d = torch::mm(p.factor("hada_w1_a"), p.factor("hada_w1_b").flatten(1)) *
          torch::mm(p.factor("hada_w2_a"), p.factor("hada_w2_b").flatten(1));
  } else if (p.method == "lokr") {
    torch::Tensor w1 = lokr_w1(p), w2 = lokr_w2(p);
    if (w2.dim() == 4) w1 = w1.reshape({w1.size(0), w1.size(1), 1, 1});
    d = torch::kron(w1.contiguous(), w2.contiguous());  // libtorch 1.13's kron views its inputs: contiguous only
  } else {
    if (!p.has("diff")) return torch::Tensor();
    return p.factor("diff").clone();
  }
  const double scale = alpha_scale(p);
  if (scale != 1.0) d.mul_(scale);
  return d;
}

namespace {

std::string key_shape(const LoraPair& p, const std::string& part) {
  return p.factor_keys.at(part) + " " + shape_str(p.factor(part).sizes());
}

// The factors of a LyCORIS module chain into one weight difference: its shape and rank, or a FormatError naming each
// key with its shape and what was expected.
void check_factors(const std::string& path, LoraPair& p) {
  auto fail = [&](const std::vector<std::string>& parts, const std::string& want) {
    std::string keys;
    for (const auto& part : parts) keys += (keys.empty() ? "" : " / ") + key_shape(p, part);
    throw FormatError(path, keys + ": " + want);
  };
  auto dims = [&](const std::string& part, std::initializer_list<int64_t> allowed, const std::string& what) {
    const auto d = p.factor(part).dim();
    for (int64_t a : allowed)
      if (d == a) return;
    fail({part}, "a " + p.method_name() + " " + what);
  };
  auto S = [](int64_t v) { return std::to_string(v); };
  // An empty factor (rank 0, or any other zero dimension) makes an all-zero difference from a module that names a
  // method: refused like a plain pair's rank 0, rather than fused as a patch that changes nothing.
  for (const auto& [part, t] : p.factors)
    if (t.numel() == 0) fail({part}, "an empty " + p.method_name() + " factor (rank 0 or a zero dimension)");
  for (const auto* f : {&p.down, &p.up})
    if (f->defined() && f->numel() == 0)
      throw FormatError(path, (f == &p.down ? p.down_key : p.up_key) + " " + shape_str(f->sizes()) + ": an empty " +
                                  p.method_name() + " factor (rank 0 or a zero dimension)");
  if (p.method == "lora") {  // Tucker LoCon: down [r, in, 1, 1], mid [r, r, kh, kw], up [out, r, 1, 1]
    const torch::Tensor &mid = p.factor("lora_mid"), &d = p.down, &u = p.up;
    const bool ok = mid.dim() == 4 && d.dim() == 4 && u.dim() == 4 && d.size(2) == 1 && d.size(3) == 1 &&
                    u.size(2) == 1 && u.size(3) == 1 && mid.size(0) == u.size(1) && mid.size(1) == d.size(0);
    if (!ok)
      throw FormatError(path, p.down_key + " " + shape_str(d.sizes()) + " / " + key_shape(p, "lora_mid") + " / " +
                                  p.up_key + " " + shape_str(u.sizes()) +
                                  ": a Tucker LoCon needs down [r, in, 1, 1], mid [r, r, kh, kw] and up [out, r, 1, 1]"
                                  " (mid dim 0 = up dim 1, mid dim 1 = down dim 0)");
    p.delta_shape = {u.size(0), d.size(1), mid.size(2), mid.size(3)};
    p.delta_rank = d.size(0);
  } else if (p.method == "loha") {
    const bool tk = p.has("hada_t1");
    const torch::Tensor &w1a = p.factor("hada_w1_a"), &w1b = p.factor("hada_w1_b"), &w2a = p.factor("hada_w2_a"),
                        &w2b = p.factor("hada_w2_b");
    for (const char* part : {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
      dims(part, {2}, tk ? "factor beside hada_t1 / hada_t2 must be 2-D" : "factor must be 2-D");
    if (tk) {  // t [r, r, kh, kw], w_a [r, out], w_b [r, in]
      dims("hada_t1", {4}, "Tucker core must be 4-D [r, r, kh, kw]");
      dims("hada_t2", {4}, "Tucker core must be 4-D [r, r, kh, kw]");
      const torch::Tensor &t1 = p.factor("hada_t1"), &t2 = p.factor("hada_t2");
      if (t1.size(0) != w1a.size(0) || t1.size(1) != w1b.size(0))
        fail({"hada_t1", "hada_w1_a", "hada_w1_b"}, "with Tucker, hada_w1_a must be [" + S(t1.size(0)) +
                                                        ", out] and hada_w1_b [" + S(t1.size(1)) + ", in]");
      if (t2.size(0) != w2a.size(0) || t2.size(1) != w2b.size(0))
        fail({"hada_t2", "hada_w2_a", "hada_w2_b"}, "with Tucker, hada_w2_a must be [" + S(t2.size(0)) +
                                                        ", out] and hada_w2_b [" + S(t2.size(1)) + ", in]");
      p.delta_shape = {w1a.size(1), w1b.size(1), t1.size(2), t1.size(3)};
      const std::vector<int64_t> second = {w2a.size(1), w2b.size(1), t2.size(2), t2.size(3)};
      if (second != p.delta_shape)
        fail({"hada_t1", "hada_t2"}, "the two Tucker products must have one shape, got " +
                                         shape_str(p.delta_shape) + " and " + shape_str(second));
    } else {  // w_a [out, r], w_b [r, in(*kh*kw)]
      const int64_t in1 = w1b.flatten(1).size(1), in2 = w2b.flatten(1).size(1);
      if (w1a.size(1) != w1b.size(0))
        fail({"hada_w1_a", "hada_w1_b"}, "hada_w1_b must be [" + S(w1a.size(1)) + ", in] (hada_w1_a's rank)");
      if (w2a.size(1) != w2b.size(0))
        fail({"hada_w2_a", "hada_w2_b"}, "hada_w2_b must be [" + S(w2a.size(1)) + ", in] (hada_w2_a's rank)");
      if (w2a.size(0) != w1a.size(0) || in2 != in1)
        fail({"hada_w2_a", "hada_w2_b"}, "w2_a @ w2_b must be [" + S(w1a.size(0)) + ", " + S(in1) +
                                             "] like w1_a @ w1_b, got [" + S(w2a.size(0)) + ", " + S(in2) + "]");
      p.delta_shape = {w1a.size(0), in1};
    }
    p.delta_rank = w1b.size(0);
  } else if (p.method == "lokr") {
    int64_t a, b;
    if (p.has("lokr_w1")) {
      dims("lokr_w1", {2}, "w1 must be 2-D");
      a = p.factor("lokr_w1").size(0);
      b = p.factor("lokr_w1").size(1);
    } else {
      dims("lokr_w1_a", {2}, "w1_a must be 2-D");
      dims("lokr_w1_b", {2}, "w1_b must be 2-D");
      const torch::Tensor &x = p.factor("lokr_w1_a"), &y = p.factor("lokr_w1_b");
      if (x.size(1) != y.size(0))
        fail({"lokr_w1_a", "lokr_w1_b"}, "lokr_w1_b must be [" + S(x.size(1)) + ", b] (lokr_w1_a's rank)");
      a = x.size(0);
      b = y.size(1);
      p.delta_rank = y.size(0);
    }
    std::vector<int64_t> w2;
    if (p.has("lokr_w2")) {
      dims("lokr_w2", {2, 4}, "w2 must be 2-D or 4-D");
      w2 = p.factor("lokr_w2").sizes().vec();
    } else if (p.has("lokr_t2")) {
      dims("lokr_t2", {4}, "Tucker core must be 4-D [r, r, kh, kw]");
      dims("lokr_w2_a", {2}, "w2_a beside lokr_t2 must be 2-D [r, out2]");
      dims("lokr_w2_b", {2}, "w2_b beside lokr_t2 must be 2-D [r, in2]");
      const torch::Tensor &t = p.factor("lokr_t2"), &x = p.factor("lokr_w2_a"), &y = p.factor("lokr_w2_b");
      if (t.size(0) != x.size(0) || t.size(1) != y.size(0))
        fail({"lokr_t2", "lokr_w2_a", "lokr_w2_b"}, "with Tucker, lokr_w2_a must be [" + S(t.size(0)) +
                                                        ", out2] and lokr_w2_b [" + S(t.size(1)) + ", in2]");
      w2 = {x.size(1), y.size(1), t.size(2), t.size(3)};
      p.delta_rank = y.size(0);
    } else {
      dims("lokr_w2_a", {2}, "w2_a must be 2-D");
      dims("lokr_w2_b", {2, 4}, "w2_b must be 2-D or 4-D");
      const torch::Tensor &x = p.factor("lokr_w2_a"), &y = p.factor("lokr_w2_b");
      if (x.size(1) != y.size(0))
        fail({"lokr_w2_a", "lokr_w2_b"}, "lokr_w2_b must be [" + S(x.size(1)) + ", d] (lokr_w2_a's rank)");
      w2 = {x.size(0), y.flatten(1).size(1)};
      p.delta_rank = y.size(0);
    }
    // Products of finite factors' dimensions can still pass int64 (LoKr multiplies them): checked below too.
    int64_t rows, cols;
    if (__builtin_mul_overflow(a, w2[0], &rows) || __builtin_mul_overflow(b, w2[1], &cols))
      fail({p.has("lokr_w1") ? "lokr_w1" : "lokr_w1_b", p.has("lokr_w2") ? "lokr_w2" : "lokr_w2_b"},
           "the LoKr weight difference's dimensions overflow int64");
    p.delta_shape = {rows, cols};
    if (w2.size() == 4) {
      p.delta_shape.push_back(w2[2]);
      p.delta_shape.push_back(w2[3]);
    }
  } else {  // full
    if (p.has("diff")) {
      dims("diff", {2, 4}, "diff must be 2-D or 4-D (the weight's shape)");
      p.delta_shape = p.factor("diff").sizes().vec();
    }
    if (p.has("diff_b")) dims("diff_b", {1}, "diff_b must be 1-D [out] (the bias's shape)");
  }
  // The difference's element count is compared with a weight's (models/lora.cpp): it must be an int64 too.
  int64_t n = 1;
  for (int64_t d : p.delta_shape)
    if (__builtin_mul_overflow(n, d, &n))
      throw FormatError(path, p.first_key() + ": the " + p.method_name() + " weight difference " +
                                  shape_str(p.delta_shape) + " has more elements than int64 counts");
}

// Which method a module's keys make, its terms moved from `parts` (part -> key) into the pair, or a FormatError for
// an incomplete or mixed module.
void assemble_module(const std::string& path, LoraPair& p, const std::map<std::string, std::string>& parts,
                     const std::function<torch::Tensor(const std::string&)>& read) {
  std::set<std::string> methods;
  for (const auto& [part, key] : parts) {
    if (part.rfind("hada_", 0) == 0) methods.insert("loha");
    else if (part.rfind("lokr_", 0) == 0) methods.insert("lokr");
    else if (part == "diff" || part == "diff_b") methods.insert("full");
    else if (part == "lora_mid") methods.insert("lora");
  }
  if (!p.down_key.empty() || !p.up_key.empty()) methods.insert("lora");
  auto any_key = [&]() { return p.down_key.empty() ? (p.up_key.empty() ? parts.begin()->second : p.up_key)
                                                   : p.down_key; };
  if (methods.size() > 1) {
    std::string names;
    for (const auto& m : methods) names += (names.empty() ? "" : ", ") + m;
    throw FormatError(path, any_key() + ": this module mixes the terms of several methods (" + names +
                                "); a module is patched by one method");
  }
  const std::string magnitude_part = parts.count("dora_scale") ? "dora_scale" : "lora_magnitude_vector";
  if (methods.empty()) {
    const std::string key = parts.count(magnitude_part) ? parts.at(magnitude_part) : parts.begin()->second;
    throw FormatError(path, key + ": a DoRA magnitude without the factors it scales (no lora_down / lora_up, "
                                  "lora_A / lora_B, hada_* or lokr_* keys for this module)");
  }
  p.method = *methods.begin();
  // The module's key stem, to name a missing key in full.
  const std::string& some_part = parts.begin()->first;  // (not a structured binding: C++17 lambdas can't capture one)
  const std::string& some_key = parts.begin()->second;
  const std::string stem = some_key.substr(0, some_key.rfind("." + some_part));
  auto need = [&](std::initializer_list<const char*> required, const std::string& what) {
    for (const char* part : required)
      if (!parts.count(part))
        throw FormatError(path, some_key + ": " + what + " needs " + part + " too (" + stem + "." + part +
                                    " is missing)");
  };
  if (p.method == "lora") {
    if (p.down_key.empty() || p.up_key.empty())
      throw FormatError(path, some_key + ": " + (parts.count("lora_mid") ? "a Tucker LoCon" : "a DoRA") +
                                  " module needs both halves of its pair (" +
                                  (p.down_key.empty() ? "the down factor" : "the up factor") + " is missing)");
  } else if (p.method == "loha") {
    need({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, "a LoHa module");
    if (parts.count("hada_t1") != parts.count("hada_t2"))
      need({"hada_t1", "hada_t2"}, "a Tucker LoHa module");
  } else if (p.method == "lokr") {
    if (!parts.count("lokr_w1")) need({"lokr_w1_a", "lokr_w1_b"}, "a LoKr module without lokr_w1");
    if (!parts.count("lokr_w2")) need({"lokr_w2_a", "lokr_w2_b"}, "a LoKr module without lokr_w2");
  }
  for (const auto& [part, key] : parts) {
    if (part == "dora_scale" || part == "lora_magnitude_vector") {
      if (p.method == "full")
        throw FormatError(path, key + ": a DoRA magnitude on a full weight difference (diff) is not a method");
      if (p.magnitude.defined())
        throw FormatError(path, key + ": a second DoRA magnitude for this module (" + p.magnitude_key + ")");
      p.magnitude = read(key);
      p.magnitude_key = key;
      continue;
    }
    p.factors[part] = read(key);
    p.factor_keys[part] = key;
  }
  // Parts of a method that the chosen variant does not use (lokr_w1 beside lokr_w1_a) would be silently ignored.
  if (p.method == "lokr") {
    for (const char* n : {"1", "2"}) {
      const std::string full = std::string("lokr_w") + n;
      if (p.has(full) && (p.has(full + "_a") || p.has(full + "_b")))
        throw FormatError(path, p.factor_keys.at(full) + ": both a full " + full + " and its factors " + full +
                                    "_a / " + full + "_b");
    }
    if (p.has("lokr_t2") && p.has("lokr_w2"))
      throw FormatError(path, p.factor_keys.at("lokr_t2") + ": a Tucker core beside a full lokr_w2");
  }
  if (p.method == "lora" && p.magnitude.defined() && p.magnitude.dim() > 4)
    throw FormatError(path, p.magnitude_key + ": a DoRA magnitude must be 1-D, 2-D or 4-D");
}

}  // namespace

LoraFile read_lora_file(const std::string& path) {
  const std::string lower = std::filesystem::path(path).extension().string();
  for (const char* pickle : {".ckpt", ".bin", ".pt", ".pth", ".pkl"})
    if (lower == pickle)
      throw FormatError(path, std::string("a pickled ") + pickle +
                                  " file: pickles can run arbitrary code when loaded and are never read; convert it "
                                  "to .safetensors first (python: safetensors.torch.save_file(torch.load(f), out))");
  const SafeTensorsFile f = SafeTensorsFile::open(path);
  LoraFile out;
  out.path = path;
  out.keys = f.tensors().size();

  struct Pending {
    LoraPair pair;
    std::string down_key, up_key, alpha_key;
    std::map<std::string, std::string> parts;  // other terms: part -> key
    size_t order = 0;
  };
  std::map<std::string, Pending> groups;  // (component | module | underscored) -> halves seen
  std::set<std::string> layouts;
  size_t order = 0;
  const Method* method = nullptr;  // the first one in file order, its first key and the modules using it
  std::string method_key;
  std::set<std::string> method_stems;
  for (const auto& info : f.tensors()) {
    const std::string& key = info.name;
    auto parsed = parse_key(key);
    if (!parsed) {
      std::string stem;
      if (const Method* m = lora_method(key, &stem)) {
        if (!method) {
          method = m;
          method_key = key;
        }
        if (std::string(m->name) == method->name) method_stems.insert(stem);
      }
      out.unparsed.push_back(key);
      continue;
    }
    const std::string id = parsed->component + "|" + parsed->module + "|" + (parsed->underscored ? "_" : ".");
    auto& g = groups[id];
    if (g.pair.module.empty()) {
      g.pair.component = parsed->component;
      g.pair.module = parsed->module;
      g.pair.underscored = parsed->underscored;
      g.order = order++;
    }
    std::string& slot = parsed->part == Part::Down   ? g.down_key
                        : parsed->part == Part::Up   ? g.up_key
                        : parsed->part == Part::Alpha ? g.alpha_key
                                                      : g.parts[parsed->factor];
    if (!slot.empty()) {
      // Two keys for one half (e.g. a file mixing lora.down and lora_A names for one module): keep the first.
      out.unparsed.push_back(key);
      continue;
    }
    slot = key;
    if (parsed->part != Part::Alpha) layouts.insert(parsed->layout);
  }

  if (method) {
    const size_t more = method_stems.size() - 1;
    throw FormatError(path, std::string(method->name) + " is not supported: " + method_key +
                                (more ? " (and " + std::to_string(more) + " more module" + (more == 1 ? "" : "s") + ")"
                                      : "") +
                                "; LoRA, LoCon (also Tucker), LoHa, LoKr, full differences and DoRA are fused, and "
                                "fusing the rest of the file without these terms would give other weights than it "
                                "was trained for");
  }

  std::vector<Pending*> ordered;
  for (auto& kv : groups) ordered.push_back(&kv.second);
  std::sort(ordered.begin(), ordered.end(), [](const Pending* a, const Pending* b) { return a->order < b->order; });
  const auto read_float = [&](const std::string& key) { return checked_float(f, key); };
  for (Pending* g : ordered) {
    LoraPair p = g->pair;
    if (g->parts.empty() && (g->down_key.empty() || g->up_key.empty())) {
      for (const std::string* k : {&g->down_key, &g->up_key, &g->alpha_key})
        if (!k->empty()) out.unparsed.push_back(*k);
      continue;
    }
    p.down_key = g->down_key;
    p.up_key = g->up_key;
    p.alpha_key = g->alpha_key;
    if (!g->parts.empty()) assemble_module(path, p, g->parts, read_float);
    if (p.method == "lora") {
      p.down = checked_float(f, p.down_key);
      p.up = checked_float(f, p.up_key);
      const auto nd = p.down.dim(), nu = p.up.dim();
      if ((nd != 2 && nd != 4) || (nu != 2 && nu != 4))
        throw FormatError(path, p.down_key + " / " + p.up_key +
                                    ": LoRA factors must be 2-D (linear) or 4-D (conv), got " +
                                    shape_str(p.down.sizes()) + " and " + shape_str(p.up.sizes()));
      if (p.down.size(0) < 1 || p.up.size(1) != p.down.size(0))
        throw FormatError(path, p.down_key + " " + shape_str(p.down.sizes()) + " and " + p.up_key + " " +
                                    shape_str(p.up.sizes()) + ": the ranks (down dim 0, up dim 1) differ");
    }
    if (!p.plain()) {
      if (p.method == "lora" && !p.has("lora_mid")) {
        p.delta_shape = {p.up.size(0), p.down.flatten(1).size(1)};
        p.delta_rank = p.down.size(0);
      } else {
        check_factors(path, p);
      }
    }
    if (!p.alpha_key.empty()) {
      // kohya writes an integer alpha (torch.tensor(rank)) when none was set; diffusers takes any dtype via .item().
      const torch::Tensor raw = f.get(p.alpha_key);
      const torch::Tensor a = raw.is_floating_point() ? checked_float(f, p.alpha_key) : raw.to(torch::kFloat);
      if (a.numel() != 1)
        throw FormatError(path, p.alpha_key + ": an alpha must be one number, got shape " + shape_str(a.sizes()));
      // diffusers reads it with .item() (float16 / float32 -> Python float, exact).
      p.alpha = static_cast<double>(a.reshape({}).item<float>());
    }
    out.pairs.push_back(std::move(p));
  }

  // Legacy files renamed only the attention pairs; their other modules carry the current names.
  if (layouts.count("diffusers_legacy")) layouts.erase("diffusers");
  if (layouts.empty())
    out.layout = "none";
  else if (layouts.size() == 1)
    out.layout = *layouts.begin();
  else {
    std::string s = "mixed (";
    for (const auto& l : layouts) s += (s.back() == '(' ? "" : ", ") + l;
    out.layout = s + ")";
  }
  return out;
}

}  // namespace sd
