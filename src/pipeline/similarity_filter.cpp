#include "pipeline/similarity_filter.h"

#include <algorithm>

#include <torch/torch.h>

#include "core/error.h"
#include "core/side_stream.h"

namespace sd {

SimilarityFilter::SimilarityFilter(double threshold, int max_skip_frame, std::shared_ptr<UniformSource> uniform)
    : threshold_(threshold), max_skip_frame_(max_skip_frame), uniform_(std::move(uniform)) {
  if (!(threshold_ >= 0.0 && threshold_ <= 1.0))
    throw InvalidArgument("similarity filter threshold must be in [0, 1], got " + std::to_string(threshold_));
  if (max_skip_frame_ < 0)
    throw InvalidArgument("similarity filter max_skip_frame must be >= 0, got " + std::to_string(max_skip_frame_));
  if (!uniform_) uniform_ = std::make_shared<Mt19937UniformSource>(0);
}

double SimilarityFilter::cosine_similarity(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.numel() != b.numel())
    throw InvalidArgument("similarity filter: the frame has " + std::to_string(b.numel()) +
                          " values but the reference frame has " + std::to_string(a.numel()) +
                          " (the input size changed mid-stream)");
  torch::NoGradGuard no_grad;
  const auto fa = a.detach().reshape(-1).to(torch::kFloat32);
  const auto fb = b.detach().reshape(-1).to(a.device(), torch::kFloat32);
  return torch::cosine_similarity(fa, fb, /*dim=*/0, /*eps=*/1e-6).item<float>();
}

double SimilarityFilter::skip_probability(double cos_sim, double threshold) {
  if (threshold >= 1.0) return 0.0;
  return std::max(0.0, 1.0 - (1.0 - cos_sim) / (1.0 - threshold));
}

FilterDecision SimilarityFilter::check(const torch::Tensor& x, bool x_complete) {
  FilterDecision d;
  // On CUDA the copy that may become the reference is made on the side stream too, so that it is complete (and the
  // reference never depends on work queued behind this call). Elsewhere it is made only for a processed frame.
  torch::Tensor copy;
  const bool first = !prev_.defined();
  run_on_side_stream(x.device(), /*after_current=*/!x_complete, [&] {
    if (x.is_cuda()) copy = x.detach().clone();
    if (!first) d.cos_sim = cosine_similarity(prev_, copy.defined() ? copy : x);
  });
  const auto keep = [&] { prev_ = copy.defined() ? copy : x.detach().clone(); };
  if (first) {
    keep();
    d.first = true;
    d.skip_count = skip_count_;
    ++processed_;
    return d;
  }
  d.uniform = uniform_->uniform();  // drawn on every call after the first, as the original does
  d.skip_prob = skip_probability(d.cos_sim, threshold_);
  if (d.skip_prob < d.uniform) {
    keep();
    ++processed_;
  } else if (skip_count_ > max_skip_frame_) {  // strictly greater (original)
    skip_count_ = 0;
    keep();
    d.forced = true;
    ++processed_;
    ++forced_;
  } else {
    ++skip_count_;
    d.process = false;
    ++skipped_;
  }
  d.skip_count = skip_count_;
  return d;
}

void SimilarityFilter::reset() {
  prev_ = torch::Tensor();
  skip_count_ = 0;
}

}  // namespace sd
