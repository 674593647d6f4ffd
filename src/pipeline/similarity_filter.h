#pragma once
// Stochastic Similarity Filter (spec §5): skips an input frame with probability
// p = max(0, 1 − (1 − cos)/(1 − threshold)) where cos is the cosine similarity between the frame and the last
// *processed* frame; after more than max_skip_frame skips since the last forced pass, a would-be skip is forced
// through. The skip counter is NOT reset by a normal pass (the original's behaviour).
#include <cstdint>
#include <memory>

#include <torch/types.h>

#include "pipeline/rng.h"

namespace sd {

struct SimilarityFilterOptions {
  bool enabled = false;
  double threshold = 0.98;
  int max_skip_frame = 10;
  // Sleep the EMA of the processed-call time on a skip, as the original does to keep the output rate steady.
  bool sleep_on_skip = true;
};

struct FilterDecision {
  bool process = true;      // false: skip this frame
  bool first = false;       // the very first frame (always processed, no uniform draw)
  bool forced = false;      // a would-be skip forced through by max_skip_frame
  double cos_sim = 1.0;     // float32 cosine similarity (as a double); 1 for the first frame
  double skip_prob = 0.0;   // max(0, 1 − (1 − cos)/(1 − threshold)); 0 when threshold >= 1
  double uniform = 0.0;     // the uniform draw compared with skip_prob
  int64_t skip_count = 0;   // counter after this decision
};

class SimilarityFilter {
 public:
  SimilarityFilter(double threshold, int max_skip_frame, std::shared_ptr<UniformSource> uniform);

  // Decides for the preprocessed input batch `x` (any shape; flattened). Stores a copy of x as the reference when
  // processed. On CUDA the cosine runs on a side stream (run_on_side_stream) and only its value comes back: after the
  // work queued on the calling thread's stream unless `x_complete` (nothing queued writes x any more), so deciding
  // about frame N need not wait for frame N-1's kernels. The decision is the same either way.
  FilterDecision check(const torch::Tensor& x, bool x_complete = false);
  // Forgets the reference frame and the skip counter (the counters below are kept).
  void reset();

  // torch.nn.CosineSimilarity(dim=0, eps=1e-6) on the flattened tensors, in float32, computed where they are (on a
  // GPU only the value crosses to the host). Waits for it: on CUDA, for the calling thread's current stream.
  static double cosine_similarity(const torch::Tensor& a, const torch::Tensor& b);
  static double skip_probability(double cos_sim, double threshold);

  double threshold() const { return threshold_; }
  int max_skip_frame() const { return max_skip_frame_; }
  void set_uniform_source(std::shared_ptr<UniformSource> u) { uniform_ = std::move(u); }
  int64_t skip_count() const { return skip_count_; }
  int64_t processed() const { return processed_; }  // includes forced passes and the first frame
  int64_t skipped() const { return skipped_; }
  int64_t forced() const { return forced_; }

 private:
  double threshold_;
  int max_skip_frame_;
  std::shared_ptr<UniformSource> uniform_;
  torch::Tensor prev_;
  int64_t skip_count_ = 0;
  int64_t processed_ = 0, skipped_ = 0, forced_ = 0;
};

}  // namespace sd
