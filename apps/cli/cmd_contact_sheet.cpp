// `streamdiffusion contact-sheet`: one PNG showing what a model does - prompts (columns) against txt2img with 1, 2
// and 4 stream steps, the reference emoji and each generated image's retrieval rank when the emoji data is
// installed, and a row of img2img on synthetic drawings (OpenCV shapes). Used for docs/emoji-contact-sheet.png (scripts/train-emoji.sh); works on any model.
#include <iostream>

#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <torch/torch.h>

#include "apps/cli/commands.h"
#include "apps/cli/pipeline_options.h"
#include "core/device.h"
#include "core/error.h"
#include "core/text.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/image.h"
#include "pipeline/stream_diffusion.h"
#include "train/emoji_dataset.h"
#include "train/emoji_eval.h"

namespace {

struct SheetOptions {
  std::string model, out = "docs/emoji-contact-sheet.png", data, size;  // size "" = the model's native size
  std::string variant;  // --variant
  std::string prompts =
      "grinning face;red apple;cat face;heavy black heart;pile of poo;rocket;christmas tree;"
      "smiling face with sunglasses;fire;banana";
  std::string img2img_prompts = "red apple;grinning face;christmas tree;blue heart;sun with face";
  int tile = 128;
  uint64_t seed = 2;
  int threads = 0;
};

// [3, H, W] in [-1, 1] (RGB) -> BGR tile of tile x tile (nearest: pixels stay visible).
cv::Mat to_tile(const torch::Tensor& img, int tile) {
  const auto u8 = sd::tensor_to_image(img.unsqueeze(0))[0].contiguous();  // [H, W, 3] RGB
  cv::Mat rgb(static_cast<int>(u8.size(0)), static_cast<int>(u8.size(1)), CV_8UC3, u8.data_ptr<uint8_t>());
  cv::Mat bgr, big;
  cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
  cv::resize(bgr, big, cv::Size(tile, tile), 0, 0, cv::INTER_NEAREST);
  return big;
}

// Synthetic drawings for img2img: simple shapes a child might draw, 64 x 64 RGB in [-1, 1].
torch::Tensor drawing(int which, int64_t w, int64_t h) {
  cv::Mat m(static_cast<int>(h), static_cast<int>(w), CV_8UC3, cv::Scalar(255, 255, 255));
  const cv::Point c(static_cast<int>(w / 2), static_cast<int>(h / 2));
  const int r = static_cast<int>(std::min(w, h) * 3 / 8);
  switch (which % 5) {
    case 0:  // red disc with a stalk
      cv::circle(m, c + cv::Point(0, r / 6), r, cv::Scalar(40, 40, 220), cv::FILLED, cv::LINE_AA);
      cv::line(m, c - cv::Point(0, r), c - cv::Point(-r / 4, r + r / 3), cv::Scalar(30, 80, 60), 3, cv::LINE_AA);
      break;
    case 1:  // yellow face
      cv::circle(m, c, r, cv::Scalar(40, 210, 250), cv::FILLED, cv::LINE_AA);
      cv::circle(m, c + cv::Point(-r / 3, -r / 4), r / 8, cv::Scalar(40, 40, 40), cv::FILLED, cv::LINE_AA);
      cv::circle(m, c + cv::Point(r / 3, -r / 4), r / 8, cv::Scalar(40, 40, 40), cv::FILLED, cv::LINE_AA);
      cv::ellipse(m, c + cv::Point(0, r / 6), cv::Size(r / 2, r / 3), 0, 0, 180, cv::Scalar(40, 40, 40), 2,
                  cv::LINE_AA);
      break;
    case 2: {  // green triangle on a brown trunk
      std::vector<cv::Point> tri{c + cv::Point(0, -r), c + cv::Point(-r, r / 2), c + cv::Point(r, r / 2)};
      cv::fillConvexPoly(m, tri, cv::Scalar(50, 160, 40), cv::LINE_AA);
      cv::rectangle(m, c + cv::Point(-r / 6, r / 2), c + cv::Point(r / 6, r), cv::Scalar(30, 70, 120), cv::FILLED);
      break;
    }
    case 3: {  // blue heart from two discs and a triangle
      const cv::Scalar blue(220, 120, 40);
      cv::circle(m, c + cv::Point(-r / 2, -r / 4), r / 2, blue, cv::FILLED, cv::LINE_AA);
      cv::circle(m, c + cv::Point(r / 2, -r / 4), r / 2, blue, cv::FILLED, cv::LINE_AA);
      std::vector<cv::Point> tri{c + cv::Point(-r, -r / 8), c + cv::Point(r, -r / 8), c + cv::Point(0, r)};
      cv::fillConvexPoly(m, tri, blue, cv::LINE_AA);
      break;
    }
    default:  // orange sun with rays
      for (int k = 0; k < 8; ++k) {
        const double a = k * CV_PI / 4;
        cv::line(m, c, c + cv::Point(static_cast<int>(r * 1.2 * std::cos(a)), static_cast<int>(r * 1.2 * std::sin(a))),
                 cv::Scalar(30, 170, 250), 3, cv::LINE_AA);
      }
      cv::circle(m, c, r * 2 / 3, cv::Scalar(40, 200, 250), cv::FILLED, cv::LINE_AA);
      break;
  }
  cv::Mat rgb;
  cv::cvtColor(m, rgb, cv::COLOR_BGR2RGB);
  auto t = torch::from_blob(rgb.data, {h, w, 3}, torch::kUInt8).clone();
  return sd::image_to_tensor(t)[0];  // [3, H, W]
}

void put_text_lines(cv::Mat& canvas, const std::string& text, cv::Rect box, double scale) {
  // Greedy word wrap into the box width.
  std::vector<std::string> lines;
  std::string cur;
  for (const auto& w : sd::split(text, ' ')) {
    const std::string cand = cur.empty() ? w : cur + " " + w;
    int base = 0;
    if (cv::getTextSize(cand, cv::FONT_HERSHEY_SIMPLEX, scale, 1, &base).width > box.width - 4 && !cur.empty()) {
      lines.push_back(cur);
      cur = w;
    } else {
      cur = cand;
    }
  }
  if (!cur.empty()) lines.push_back(cur);
  int y = box.y + static_cast<int>(18 * scale / 0.45);
  for (const auto& l : lines) {
    cv::putText(canvas, l, cv::Point(box.x + 3, y), cv::FONT_HERSHEY_SIMPLEX, scale, cv::Scalar(20, 20, 20), 1,
                cv::LINE_AA);
    y += static_cast<int>(16 * scale / 0.45);
  }
}

sd::cli::Runner setup_contact_sheet(CLI::App& app) {
  auto o = std::make_shared<SheetOptions>();
  app.add_option("--model", o->model, "diffusers model folder (default: the shipped models/emoji-tiny)");
  sd::cli::add_variant_option(app, o->variant, o->model);
  app.add_option("--out", o->out, "output PNG")->capture_default_str();
  app.add_option("--prompts", o->prompts, "txt2img prompts, separated by ';'")->capture_default_str();
  app.add_option("--img2img-prompts", o->img2img_prompts, "prompts for the img2img row (one per drawing, ';')")
      ->capture_default_str();
  app.add_option("--data", o->data, "emoji cache for the reference row (default: the fetch script's folder)");
  app.add_option("--size", o->size, "generation size WIDTHxHEIGHT (default: the model's native size)");
  app.add_option("--tile", o->tile, "tile size in the sheet (pixels)")
      ->check(CLI::Range(8, 4096))  // as montage's: checked before the model loads and the sheet is generated
      ->capture_default_str();
  app.add_option("--seed", o->seed, "noise seed")->capture_default_str();
  app.add_option("--threads", o->threads, "libtorch threads (0 = all cores)")
      ->check(CLI::Range(0, 1024))  // more is a typo that would hang the command making threads
      ->capture_default_str();
  return [o] {
    if (o->model.empty()) o->model = sd::cli::default_model_dir();
    sd::LoadOptions lo;
    lo.threads = o->threads;
    lo.variant = o->variant;
    const auto models = sd::load_pipeline(o->model, lo);
    sd::cli::PipelineOptions size_only;
    size_only.model = o->model;
    size_only.size = o->size;
    const sd::StreamConfig sized = sd::cli::stream_config(size_only, true);
    const int64_t w = sized.width, h = sized.height;
    const auto prompts = sd::split(o->prompts, ';');
    const auto i2i = sd::split(o->img2img_prompts, ';');
    const int T = o->tile, label_w = 150, head_h = 44;

    // Reference emoji by name (when the data is installed).
    std::vector<cv::Mat> refs;
    // With the data, each generated tile also gets its retrieval rank (train/emoji_eval.h: L2 at 32 x 32 RGB among
    // all emoji; 1 = the named emoji is the closest), the measure of `streamdiffusion eval`.
    const std::string data = o->data.empty() ? sd::train::default_emoji_data_dir() : o->data;
    sd::train::EmojiDataset ds;
    sd::train::RetrievalFeatures gallery;
    std::vector<int64_t> prompt_index(prompts.size(), -1);  // the prompt's emoji in ds, -1 = not an emoji name
    if (sd::train::emoji_data_available(data, "google")) {
      ds = sd::train::load_emoji_dataset(data, {"google"}, 64);
      gallery = sd::train::retrieval_features(ds.batch(torch::arange(ds.size(), torch::kInt64)));
      for (size_t k = 0; k < prompts.size(); ++k) {
        cv::Mat tile(T, T, CV_8UC3, cv::Scalar(235, 235, 235));
        for (int64_t i = 0; i < ds.size(); ++i)
          if (ds.entries[static_cast<size_t>(i)].name == prompts[k]) {
            tile = to_tile(ds.batch(torch::tensor({i}, torch::kInt64))[0], T);
            prompt_index[k] = i;
            break;
          }
        refs.push_back(tile);
      }
    }
    auto rank_of = [&](size_t k, const torch::Tensor& img) -> int64_t {  // img [3, H, W]; -1 = no emoji name
      if (prompt_index[k] < 0) return -1;
      const auto q = sd::train::retrieval_features(img.unsqueeze(0).to(torch::kCPU, torch::kFloat32));
      const auto r = sd::train::retrieval_ranks(q.rgb, gallery.rgb, torch::tensor({prompt_index[k]}, torch::kInt64));
      return r[0].item<int64_t>();
    };

    struct Row {
      std::string label;
      std::vector<cv::Mat> tiles;
      std::vector<int64_t> ranks;  // retrieval rank of each tile (-1 = none)
    };
    std::vector<Row> rows;
    if (!refs.empty()) rows.push_back({"reference emoji (training data)", refs, {}});
    const std::vector<std::pair<std::string, std::vector<int64_t>>> settings = {
        {"txt2img 1 step (t 999)", {0}}, {"txt2img 2 steps (999, 99)", {0, 45}},
        {"txt2img 4 steps (999, 679, 359, 99)", {0, 16, 32, 45}}};
    for (const auto& [label, list] : settings) {
      Row r{label, {}, {}};
      for (size_t k = 0; k < prompts.size(); ++k) {
        sd::StreamConfig c;
        c.width = w;
        c.height = h;
        c.t_index_list = list;
        c.cfg_type = sd::CfgType::None;
        c.use_denoising_batch = false;
        c.seed = o->seed;
        sd::StreamDiffusion s(models, c);
        s.prepare(prompts[k]);
        const auto img = s.txt2img()[0];
        r.tiles.push_back(to_tile(img, T));
        r.ranks.push_back(rank_of(k, img));
      }
      rows.push_back(r);
    }
    Row in{"img2img input (drawings)", {}, {}}, outr{"img2img 2 steps (679, 359), cfg self", {}, {}};
    for (size_t k = 0; k < i2i.size(); ++k) {
      const auto img = drawing(static_cast<int>(k), w, h);
      sd::StreamConfig c;
      c.width = w;
      c.height = h;
      c.t_index_list = {16, 32};
      c.cfg_type = sd::CfgType::Self;
      c.guidance_scale = 1.2;
      c.use_denoising_batch = false;
      c.seed = o->seed;
      sd::StreamDiffusion s(models, c);
      s.prepare(i2i[k]);
      in.tiles.push_back(to_tile(img, T));
      outr.tiles.push_back(to_tile(s.img2img(img)[0], T));
    }
    rows.push_back(in);
    rows.push_back(outr);

    const int cols = static_cast<int>(std::max(prompts.size(), i2i.size()));
    cv::Mat sheet(head_h + static_cast<int>(rows.size()) * (T + 22), label_w + cols * (T + 4), CV_8UC3,
                  cv::Scalar(255, 255, 255));
    for (int k = 0; k < static_cast<int>(prompts.size()); ++k)
      put_text_lines(sheet, prompts[k], cv::Rect(label_w + k * (T + 4), 0, T + 4, head_h), 0.42);
    for (size_t r = 0; r < rows.size(); ++r) {
      const int y = head_h + static_cast<int>(r) * (T + 22);
      put_text_lines(sheet, rows[r].label, cv::Rect(0, y + T / 3, label_w, T), 0.42);
      for (size_t k = 0; k < rows[r].tiles.size(); ++k) {
        rows[r].tiles[k].copyTo(sheet(cv::Rect(label_w + static_cast<int>(k) * (T + 4), y, T, T)));
        const std::string caption = rows[r].label.rfind("img2img 2", 0) == 0 ? i2i[k]
                                    : k < rows[r].ranks.size() && rows[r].ranks[k] > 0
                                        ? "rank " + std::to_string(rows[r].ranks[k]) + " / " + std::to_string(ds.size())
                                        : std::string();
        if (!caption.empty())
          put_text_lines(sheet, caption, cv::Rect(label_w + static_cast<int>(k) * (T + 4), y + T - 4, T + 4, 22), 0.38);
      }
    }
    for (size_t k = 0; k < prompts.size(); ++k) {
      if (prompt_index[k] < 0) continue;
      std::cout << "retrieval rank of '" << prompts[k] << "' (1, 2, 4 steps):";
      for (const auto& r : rows)
        if (k < r.ranks.size()) std::cout << " " << r.ranks[k];
      std::cout << " of " << ds.size() << "\n";
    }
    if (!cv::imwrite(o->out, sheet)) throw sd::FormatError(o->out, "cannot write the PNG");
    std::cout << "wrote " << o->out << " (" << sheet.cols << "x" << sheet.rows << ", " << rows.size() << " rows, "
              << cols << " columns)\n";
    return 0;
  };
}

REGISTER_COMMAND("contact-sheet", "a PNG of prompts vs generated images (txt2img 1/2/4 steps, img2img)", 85,
                 setup_contact_sheet);

}  // namespace
