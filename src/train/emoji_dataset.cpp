#include "train/emoji_dataset.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <random>

#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <torch/torch.h>

#include "core/error.h"
#include "io/json_config.h"

namespace fs = std::filesystem;

namespace sd::train {

namespace {
std::string lower_words(std::string s) {
  for (char& c : s) {
    if (c == '_' || c == '-') c = ' ';
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  // Collapse runs of spaces and trim.
  std::string out;
  for (char c : s) {
    if (c == ' ' && (out.empty() || out.back() == ' ')) continue;
    out += c;
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

std::string get_string_field(const nlohmann::json& e, const char* key, const std::string& file, size_t index,
                             bool required) {
  auto it = e.find(key);
  if (it == e.end() || it->is_null()) {
    if (required)
      throw FormatError(file, "entry " + std::to_string(index) + ": missing the string field \"" + key + "\"");
    return "";
  }
  if (!it->is_string())
    throw FormatError(file, "entry " + std::to_string(index) + ": field \"" + key + "\" must be a string, got " +
                                it->type_name());
  return it->get<std::string>();
}
}  // namespace

std::vector<EmojiEntry> read_emoji_json(const std::string& path, const std::string& style) {
  const nlohmann::json j = read_json_file(path);
  if (!j.is_array()) throw FormatError(path, std::string("expected a JSON array of emoji objects, got ") + j.type_name());
  std::vector<EmojiEntry> out;
  out.reserve(j.size());
  for (size_t i = 0; i < j.size(); ++i) {
    const auto& e = j[i];
    if (!e.is_object())
      throw FormatError(path, "entry " + std::to_string(i) + ": expected an object, got " + e.type_name());
    if (!style.empty()) {
      const std::string key = "has_img_" + style;
      auto it = e.find(key);
      if (it != e.end() && !it->is_null()) {
        if (!it->is_boolean())
          throw FormatError(path, "entry " + std::to_string(i) + ": field \"" + key + "\" must be a boolean");
        if (!it->get<bool>()) continue;
      }
    }
    EmojiEntry x;
    x.image = get_string_field(e, "image", path, i, true);
    const std::string short_name = get_string_field(e, "short_name", path, i, false);
    x.name = lower_words(get_string_field(e, "name", path, i, false));
    if (x.name.empty()) x.name = lower_words(short_name);
    if (x.name.empty())
      throw FormatError(path, "entry " + std::to_string(i) + ": neither \"name\" nor \"short_name\" is given");
    auto sn = e.find("short_names");
    if (sn != e.end() && !sn->is_null()) {
      if (!sn->is_array())
        throw FormatError(path, "entry " + std::to_string(i) + ": field \"short_names\" must be an array of strings");
      for (const auto& s : *sn) {
        if (!s.is_string())
          throw FormatError(path, "entry " + std::to_string(i) + ": field \"short_names\" must be an array of strings");
        x.short_names.push_back(lower_words(s.get<std::string>()));
      }
    } else if (!short_name.empty()) {
      x.short_names.push_back(lower_words(short_name));
    }
    x.category = lower_words(get_string_field(e, "category", path, i, false));
    x.subcategory = lower_words(get_string_field(e, "subcategory", path, i, false));
    out.push_back(std::move(x));
  }
  if (out.empty()) throw FormatError(path, "no emoji entries" + (style.empty() ? "" : " with an image for " + style));
  return out;
}

std::vector<std::string> emoji_captions(const EmojiEntry& e, const std::string& style) {
  std::vector<std::string> c{e.name};
  for (const auto& s : e.short_names)
    if (std::find(c.begin(), c.end(), s) == c.end()) c.push_back(s);
  if (!e.subcategory.empty()) c.push_back(e.name + ", " + e.subcategory);
  c.push_back(e.name + " emoji");
  if (!style.empty() && style != "google")
    for (auto& s : c) s += ", " + style + " style";
  return c;
}

std::string default_emoji_data_dir() {
  if (const char* d = std::getenv("SD_EMOJI_DATA"); d && *d) return d;
  std::string cache;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) {
    cache = x;
  } else if (const char* h = std::getenv("HOME"); h && *h) {
    cache = std::string(h) + "/.cache";
  } else {
    cache = ".cache";
  }
  return cache + "/streamdiffusion/emoji";
}

std::string emoji_package_dir(const std::string& data_dir, const std::string& style) {
  return (fs::path(data_dir) / "node_modules" / ("emoji-datasource-" + style)).string();
}

bool emoji_data_available(const std::string& data_dir, const std::string& style) {
  const fs::path p(emoji_package_dir(data_dir, style));
  return fs::is_regular_file(p / "emoji.json") && fs::is_directory(p / "img" / style / "64");
}

torch::Tensor load_emoji_image(const std::string& png_path, int64_t size) {
  cv::Mat m = cv::imread(png_path, cv::IMREAD_UNCHANGED);
  if (m.empty()) throw FormatError(png_path, "cannot read the image (missing or not a PNG)");
  if (m.depth() != CV_8U) m.convertTo(m, CV_8U, m.depth() == CV_16U ? 1.0 / 257 : 1.0);
  cv::Mat rgb;
  if (m.channels() == 4) {
    // Composite onto white: c = c * a + 255 * (1 - a).
    cv::Mat f;
    m.convertTo(f, CV_32FC4, 1.0 / 255);
    std::vector<cv::Mat> ch;
    cv::split(f, ch);
    for (int c = 0; c < 3; ++c) ch[c] = ch[c].mul(ch[3]) + (1.0f - ch[3]);
    cv::Mat bgr;
    cv::merge(std::vector<cv::Mat>{ch[0], ch[1], ch[2]}, bgr);
    cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  } else if (m.channels() == 3) {
    cv::cvtColor(m, rgb, cv::COLOR_BGR2RGB);
    rgb.convertTo(rgb, CV_32FC3, 1.0 / 255);
  } else if (m.channels() == 1) {
    cv::cvtColor(m, rgb, cv::COLOR_GRAY2RGB);
    rgb.convertTo(rgb, CV_32FC3, 1.0 / 255);
  } else {
    throw FormatError(png_path, "unsupported channel count " + std::to_string(m.channels()));
  }
  if (rgb.rows != size || rgb.cols != size)
    cv::resize(rgb, rgb, cv::Size(static_cast<int>(size), static_cast<int>(size)), 0, 0, cv::INTER_AREA);
  rgb = rgb.clone();
  auto t = torch::from_blob(rgb.data, {size, size, 3}, torch::kFloat32).clone();  // [H, W, 3] in [0, 1]
  return t.permute({2, 0, 1}).contiguous().clamp(0, 1) * 2 - 1;                 // [3, H, W] in [-1, 1]
}

torch::Tensor EmojiDataset::batch(const torch::Tensor& idx) const {
  return images.index_select(0, idx).to(torch::kFloat32).div(127.5).sub(1.0);
}

std::vector<std::string> EmojiDataset::captions(int64_t i) const {
  return emoji_captions(entries.at(static_cast<size_t>(i)), styles.at(static_cast<size_t>(i)));
}

EmojiDataset load_emoji_dataset(const std::string& data_dir, const std::vector<std::string>& styles,
                                int64_t image_size, int64_t limit) {
  if (styles.empty()) throw InvalidArgument("load_emoji_dataset: no styles given (e.g. google)");
  EmojiDataset d;
  std::vector<torch::Tensor> imgs;
  for (const auto& style : styles) {
    const fs::path pkg(emoji_package_dir(data_dir, style));
    if (!fs::is_regular_file(pkg / "emoji.json"))
      throw FormatError(pkg.string(), "no emoji.json: the emoji data is not installed (run scripts/fetch-emoji-data.sh)");
    auto entries = read_emoji_json((pkg / "emoji.json").string(), style);
    if (limit > 0 && static_cast<int64_t>(entries.size()) > limit) entries.resize(static_cast<size_t>(limit));
    for (auto& e : entries) {
      const auto img = load_emoji_image((pkg / "img" / style / "64" / e.image).string(), image_size);
      imgs.push_back(((img + 1) * 127.5).round().clamp(0, 255).to(torch::kUInt8));
      d.entries.push_back(std::move(e));
      d.styles.push_back(style);
    }
  }
  d.images = torch::stack(imgs);  // [N, 3, S, S]
  return d;
}

std::vector<std::pair<int64_t, int64_t>> adherence_pairs(int64_t n) {
  std::vector<std::pair<int64_t, int64_t>> out;
  if (n < 2) return out;
  const int64_t k = std::max<int64_t>(1, n / 50);
  std::mt19937_64 rng(12345);
  for (int64_t i = 0; i < n && out.size() < 50; i += k) {
    int64_t other = i;
    while (other == i) other = static_cast<int64_t>(rng() % static_cast<uint64_t>(n));
    out.emplace_back(i, other);
  }
  return out;
}

}  // namespace sd::train
