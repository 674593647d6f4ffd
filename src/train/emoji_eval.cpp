#include "train/emoji_eval.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/error.h"
#include "io/state_dict.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/stream_diffusion.h"

namespace sd::train {

namespace {

torch::Tensor unit(const torch::Tensor& x) {  // [-1, 1] -> [0, 1], float32 on the CPU
  return (x.detach().to(torch::kCPU, torch::kFloat32).clamp(-1, 1) + 1) / 2;
}

void check_images(const torch::Tensor& x, const char* what) {
  if (x.dim() != 4 || x.size(1) != 3)
    throw InvalidArgument(std::string(what) + ": expected images [B, 3, H, W], got " + shape_str(x.sizes()));
}

void check_pair(const torch::Tensor& a, const torch::Tensor& b, const char* what) {
  check_images(a, what);
  if (a.sizes() != b.sizes())
    throw InvalidArgument(std::string(what) + ": the images differ in shape: " + shape_str(a.sizes()) + " vs " +
                          shape_str(b.sizes()));
}

double median(std::vector<int64_t> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? static_cast<double>(v[m]) : (v[m - 1] + v[m]) / 2.0;
}

double share_at_most(const std::vector<int64_t>& ranks, int64_t k) {
  if (ranks.empty()) return 0;
  return static_cast<double>(std::count_if(ranks.begin(), ranks.end(), [k](int64_t r) { return r <= k; })) /
         static_cast<double>(ranks.size());
}

std::vector<int64_t> to_vector(const torch::Tensor& t) {
  const auto c = t.to(torch::kCPU, torch::kInt64).contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()};
}

}  // namespace

torch::Tensor psnr(const torch::Tensor& a, const torch::Tensor& b) {
  check_pair(a, b, "psnr");
  const auto mse = (unit(a) - unit(b)).pow(2).mean({1, 2, 3}).clamp_min(1e-10);
  return -10.0 * torch::log10(mse);
}

torch::Tensor ssim(const torch::Tensor& a, const torch::Tensor& b) {
  check_pair(a, b, "ssim");
  constexpr int64_t kWin = 11;
  if (a.size(2) < kWin || a.size(3) < kWin)
    throw InvalidArgument("ssim: images must be at least 11 x 11, got " + shape_str(a.sizes()));
  const auto x = unit(a).to(torch::kFloat64), y = unit(b).to(torch::kFloat64);
  // Separable Gaussian, normalised: one depthwise [3, 1, 11, 11] kernel, valid positions only (Wang's filter2 'valid').
  const auto r = torch::arange(kWin, torch::kFloat64) - (kWin - 1) / 2.0;
  auto g = torch::exp(-r.pow(2) / (2 * 1.5 * 1.5));
  g = g / g.sum();
  const auto w = torch::outer(g, g).expand({3, 1, kWin, kWin}).contiguous();
  auto blur = [&](const torch::Tensor& t) { return torch::conv2d(t, w, torch::Tensor(), at::IntArrayRef{1, 1}, at::IntArrayRef{0, 0}, at::IntArrayRef{1, 1}, 3); };
  const double c1 = 0.01 * 0.01, c2 = 0.03 * 0.03;
  const auto mx = blur(x);
  const auto my = blur(y);
  const auto sxx = blur(x * x) - mx * mx;
  const auto syy = blur(y * y) - my * my;
  const auto sxy = blur(x * y) - mx * my;
  const auto map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2));
  return map.mean({1, 2, 3}).to(torch::kFloat32);
}

torch::Tensor rms_gradient(const torch::Tensor& x) {
  check_images(x, "rms_gradient");
  const auto u = unit(x);
  const int64_t H = u.size(2), W = u.size(3);
  if (H < 2 || W < 2) throw InvalidArgument("rms_gradient: images must be at least 2 x 2, got " + shape_str(x.sizes()));
  using torch::indexing::Slice;
  const auto dx = u.index({Slice(), Slice(), Slice(0, H - 1), Slice(1, W)}) -
                  u.index({Slice(), Slice(), Slice(0, H - 1), Slice(0, W - 1)});
  const auto dy = u.index({Slice(), Slice(), Slice(1, H), Slice(0, W - 1)}) -
                  u.index({Slice(), Slice(), Slice(0, H - 1), Slice(0, W - 1)});
  return (dx.pow(2) + dy.pow(2)).mean({1, 2, 3}).sqrt();
}

RetrievalFeatures retrieval_features(const torch::Tensor& images) {
  check_images(images, "retrieval_features");
  const auto s = torch::adaptive_avg_pool2d(unit(images), {32, 32});  // [N, 3, 32, 32]
  using torch::indexing::Slice;
  const auto dx = s.index({Slice(), Slice(), Slice(), Slice(1, 32)}) - s.index({Slice(), Slice(), Slice(), Slice(0, 31)});
  const auto dy = s.index({Slice(), Slice(), Slice(1, 32), Slice()}) - s.index({Slice(), Slice(), Slice(0, 31), Slice()});
  const int64_t n = s.size(0);
  return {s.reshape({n, -1}), torch::cat({dx.reshape({n, -1}), dy.reshape({n, -1})}, 1)};
}

torch::Tensor retrieval_ranks(const torch::Tensor& query, const torch::Tensor& gallery, const torch::Tensor& targets) {
  if (query.dim() != 2 || gallery.dim() != 2 || query.size(1) != gallery.size(1))
    throw InvalidArgument("retrieval_ranks: expected query [B, D] and gallery [N, D], got " + shape_str(query.sizes()) +
                          " and " + shape_str(gallery.sizes()));
  if (targets.dim() != 1 || targets.size(0) != query.size(0))
    throw InvalidArgument("retrieval_ranks: expected one target per query, got targets " + shape_str(targets.sizes()) +
                          " for " + std::to_string(query.size(0)) + " queries");
  const auto t = targets.to(torch::kCPU, torch::kInt64);
  if (t.numel() > 0 && (t.min().item<int64_t>() < 0 || t.max().item<int64_t>() >= gallery.size(0)))
    throw InvalidArgument("retrieval_ranks: a target is outside the gallery of " + std::to_string(gallery.size(0)));
  // Distances in float64 from the differences themselves (cdist compute_mode 2, not the |q|^2 + |g|^2 - 2 q.g
  // matmul form): a duplicate of the target computes the same bits and ties with it; no [B, N, D] temporary.
  const auto q = query.to(torch::kCPU, torch::kFloat64), g = gallery.to(torch::kCPU, torch::kFloat64);
  const auto d = torch::cdist(q, g, 2.0, 2);  // [B, N]
  const auto own = d.gather(1, t.unsqueeze(1));                      // [B, 1]
  return (d < own).sum(1) + 1;
}

std::vector<int64_t> eval_index_list(int steps) {
  if (steps < 1 || steps > 46) throw InvalidArgument("eval: steps must be in [1, 46], got " + std::to_string(steps));
  if (steps == 1) return {0};
  if (steps == 4) return {0, 16, 32, 45};  // the CLI's txt2img default
  std::vector<int64_t> out;
  for (int i = 0; i < steps; ++i) out.push_back(45 * i / (steps - 1));
  return out;
}

ReconstructionScore reconstruction_score(const DiffusionModels& models, const torch::Tensor& images, int64_t batch) {
  check_images(images, "reconstruction_score");
  torch::NoGradGuard ng;
  TorchRng rng(0);  // AutoencoderKL's posterior sample; TAESD draws nothing
  std::vector<torch::Tensor> p, s;
  for (int64_t i = 0; i < images.size(0); i += batch) {
    const auto x = images.slice(0, i, std::min(images.size(0), i + batch));
    const auto z = models.encode_image(x.to(models.device(), models.dtype()), rng);
    const auto y = models.decode_latent(z);
    p.push_back(psnr(y, x));
    s.push_back(ssim(y, x));
  }
  ReconstructionScore r;
  r.n = images.size(0);
  if (r.n > 0) {
    r.psnr_db = torch::cat(p).mean().item<double>();
    r.ssim = torch::cat(s).mean().item<double>();
  }
  return r;
}

EmojiEvalResult evaluate_emoji_model(const std::shared_ptr<const DiffusionModels>& models, const EmojiDataset& data,
                                     const EmojiEvalOptions& opts) {
  if (data.size() < 2) throw InvalidArgument("eval: the emoji data holds " + std::to_string(data.size()) +
                                             " images; retrieval needs at least 2");
  torch::NoGradGuard ng;
  EmojiEvalResult out;
  const auto all = data.batch(torch::arange(data.size(), torch::kInt64));  // [N, 3, S, S]
  if (opts.reconstruction) out.reconstruction = reconstruction_score(*models, all, opts.batch);

  const auto gallery = retrieval_features(all);
  std::vector<int64_t> targets;
  for (const auto& pr : adherence_pairs(data.size())) targets.push_back(pr.first);
  const auto target_t = torch::tensor(targets, torch::kInt64);
  const auto real = all.index_select(0, target_t);
  const double real_sharp = rms_gradient(real).mean().item<double>();

  for (int steps : opts.steps) {
    RetrievalScore r;
    r.steps = steps;
    r.t_index_list = eval_index_list(steps);
    std::vector<torch::Tensor> gen;
    for (int64_t i : targets) {
      StreamConfig c;
      c.width = all.size(3);
      c.height = all.size(2);
      c.t_index_list = r.t_index_list;
      c.cfg_type = CfgType::None;
      c.use_denoising_batch = false;  // all steps in one call: one finished image per call
      c.seed = opts.seed;
      StreamDiffusion s(models, c);
      const auto& name = data.entries[static_cast<size_t>(i)].name;
      s.prepare(name);
      gen.push_back(s.txt2img().to(torch::kCPU, torch::kFloat32));
      r.names.push_back(name);
    }
    const auto images = torch::cat(gen);  // [n, 3, S, S]
    const auto f = retrieval_features(images);
    r.rank_l2 = to_vector(retrieval_ranks(f.rgb, gallery.rgb, target_t));
    r.rank_grad = to_vector(retrieval_ranks(f.grad, gallery.grad, target_t));
    r.n = static_cast<int64_t>(targets.size());
    r.gallery = data.size();
    r.top1_l2 = share_at_most(r.rank_l2, 1);
    r.top5_l2 = share_at_most(r.rank_l2, 5);
    r.median_rank_l2 = median(r.rank_l2);
    r.top1_grad = share_at_most(r.rank_grad, 1);
    r.top5_grad = share_at_most(r.rank_grad, 5);
    r.median_rank_grad = median(r.rank_grad);
    r.sharpness = real_sharp > 0 ? rms_gradient(images).mean().item<double>() / real_sharp : 0;
    out.retrieval.push_back(std::move(r));
  }
  return out;
}

nlohmann::json to_json(const EmojiEvalResult& r) {
  nlohmann::json j;
  if (r.reconstruction.n > 0)
    j["autoencoder"] = {{"n", r.reconstruction.n}, {"psnr_db", r.reconstruction.psnr_db},
                        {"ssim", r.reconstruction.ssim}};
  j["retrieval"] = nlohmann::json::array();
  for (const auto& s : r.retrieval) {
    nlohmann::json per = nlohmann::json::array();
    for (size_t i = 0; i < s.names.size(); ++i)
      per.push_back({{"name", s.names[i]}, {"rank_l2", s.rank_l2[i]}, {"rank_grad", s.rank_grad[i]}});
    j["retrieval"].push_back({{"steps", s.steps},
                              {"t_index_list", s.t_index_list},
                              {"n", s.n},
                              {"gallery", s.gallery},
                              {"top1_l2", s.top1_l2},
                              {"top5_l2", s.top5_l2},
                              {"median_rank_l2", s.median_rank_l2},
                              {"top1_grad", s.top1_grad},
                              {"top5_grad", s.top5_grad},
                              {"median_rank_grad", s.median_rank_grad},
                              {"sharpness", s.sharpness},
                              {"names", per}});
  }
  return j;
}

std::string format_eval(const EmojiEvalResult& r) {
  std::string out;
  char buf[256];
  if (r.reconstruction.n > 0) {
    std::snprintf(buf, sizeof buf, "autoencoder (%lld emoji): PSNR %.2f dB, SSIM %.4f\n",
                  static_cast<long long>(r.reconstruction.n), r.reconstruction.psnr_db, r.reconstruction.ssim);
    out += buf;
  }
  if (!r.retrieval.empty()) {
    std::snprintf(buf, sizeof buf,
                  "retrieval of %lld names among %lld emoji: steps | L2 32x32 top-1 top-5 median rank | gradients "
                  "top-1 top-5 median rank | sharpness\n",
                  static_cast<long long>(r.retrieval.front().n), static_cast<long long>(r.retrieval.front().gallery));
    out += buf;
  }
  for (const auto& s : r.retrieval) {
    std::snprintf(buf, sizeof buf, "  %d | %5.1f%% %5.1f%% %6.1f | %5.1f%% %5.1f%% %6.1f | %.3f\n", s.steps,
                  100 * s.top1_l2, 100 * s.top5_l2, s.median_rank_l2, 100 * s.top1_grad, 100 * s.top5_grad,
                  s.median_rank_grad, s.sharpness);
    out += buf;
  }
  return out;
}

}  // namespace sd::train
