#include "io/lora_file.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <algorithm>
#include <map>
#include <set>
#include <sstream>

#include <torch/torch.h>

#include "io/state_dict.h"
#include "core/error.h"
#include "io/model_folder.h"
#include "io/safetensors.h"

namespace sd {

namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}


enum class Part { Down, Up, Alpha };

struct ParsedKey {
  Part part;
  std::string component;  // "unet" | "text_encoder" | "text_encoder_2" | ""
  std::string module;
  bool underscored = false;
  const char* layout;
};

// What one key of a LoRA file is, or nullopt when no supported layout explains it.
std::optional<ParsedKey> parse_key(const std::string& key) {
  ParsedKey p;
  // kohya / A1111: lora_unet_<stem>.lora_down.weight | .lora_up.weight | .alpha
  // SDXL files name the two text encoders lora_te1_ / lora_te2_.
  for (const auto& [prefix, component] : {std::pair<const char*, const char*>{"lora_unet_", "unet"},
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
    else
      return std::nullopt;  // LyCORIS (hada_*, lokr_*, lora_mid), DoRA scales, ...: lora_method() refuses them
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

// LoRA methods whose files carry terms beyond a down / up pair (a magnitude, a mid factor, other factorisations,
// full differences). Their keys are recognised so that such a file is refused: fusing its plain pairs alone (DoRA and
// Tucker LoCon files have them) would silently give other weights than the file was trained for.
struct Method {
  const char* name;     // for the error: the method and the key part that shows it
  const char* part;     // a key's last name part (before a trailing ".weight")
  bool prefix = false;  // `part` is a prefix (hada_w1_a, lokr_w2_b, ...)
};

// The method a key belongs to and the module stem it names, or nullptr.
const Method* lora_method(const std::string& key, std::string* stem) {
  static const Method methods[] = {
      {"DoRA (dora_scale)", "dora_scale"},
      {"DoRA (lora_magnitude_vector)", "lora_magnitude_vector"},
      {"LyCORIS Tucker LoCon (lora_mid)", "lora_mid"},
      {"LyCORIS LoHa (hada_*)", "hada_", true},
      {"LyCORIS LoKr (lokr_*)", "lokr_", true},
      {"LyCORIS full weight differences (diff / diff_b)", "diff"},
      {"LyCORIS full weight differences (diff / diff_b)", "diff_b"},
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
  o << layout << ", " << module_count("unet") << " UNet + " << module_count("text_encoder") + module_count("text_encoder_2")
    << " text-encoder modules, rank";
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
    std::string& slot = parsed->part == Part::Down ? g.down_key : parsed->part == Part::Up ? g.up_key : g.alpha_key;
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
                                "; only plain LoRA (down / up pairs, optional alpha) is fused, and fusing the rest of "
                                "the file without these terms would give other weights than it was trained for "
                                "(diffusers 0.24 refuses such keys too)");
  }

  std::vector<Pending*> ordered;
  for (auto& kv : groups) ordered.push_back(&kv.second);
  std::sort(ordered.begin(), ordered.end(), [](const Pending* a, const Pending* b) { return a->order < b->order; });
  for (Pending* g : ordered) {
    if (g->down_key.empty() || g->up_key.empty()) {
      for (const std::string* k : {&g->down_key, &g->up_key, &g->alpha_key})
        if (!k->empty()) out.unparsed.push_back(*k);
      continue;
    }
    LoraPair p = g->pair;
    p.down_key = g->down_key;
    p.up_key = g->up_key;
    p.alpha_key = g->alpha_key;
    p.down = checked_float(f, p.down_key);
    p.up = checked_float(f, p.up_key);
    const auto nd = p.down.dim(), nu = p.up.dim();
    if ((nd != 2 && nd != 4) || (nu != 2 && nu != 4))
      throw FormatError(path, p.down_key + " / " + p.up_key + ": LoRA factors must be 2-D (linear) or 4-D (conv), got " +
                                  shape_str(p.down.sizes()) + " and " + shape_str(p.up.sizes()));
    if (p.down.size(0) < 1 || p.up.size(1) != p.down.size(0))
      throw FormatError(path, p.down_key + " " + shape_str(p.down.sizes()) + " and " + p.up_key + " " +
                                  shape_str(p.up.sizes()) + ": the ranks (down dim 0, up dim 1) differ");
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
