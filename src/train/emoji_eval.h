#pragma once
// How good is an emoji model: the measures of issue 18, used by `streamdiffusion eval`, the tests of the shipped
// model (tests/train/test_emoji_eval.cpp) and the trainer's probe.
//   (a) the autoencoder: reconstruction PSNR and SSIM over every emoji (encode, decode, against the original);
//   (b) retrieval: the image generated for each of the 50 test names (adherence_pairs: every (N / 50)-th emoji, none
//       picked by hand) ranks all N emoji by distance; top-1 / top-5 = the named emoji is first / among the first 5.
//       Two distances: L2 of the 32 x 32 RGB images (colour layout) and L2 of their gradients (edges and shapes);
//   (c) sharpness: the generated images' RMS gradient magnitude over that of the named emoji's real images.
// Images are float [B, 3, H, W] in [-1, 1] (what the pipeline returns); every measure clamps them and works on [0, 1].
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>
#include <torch/types.h>

#include "train/emoji_dataset.h"

namespace sd {
class DiffusionModels;
}

namespace sd::train {

// Per image PSNR in dB over all pixels and channels ([B]); an exact match reads 100 dB (MSE floored at 1e-10).
torch::Tensor psnr(const torch::Tensor& a, const torch::Tensor& b);
// Per image SSIM ([B]): Wang et al. 2004 - an 11 x 11 Gaussian window (sigma 1.5) over the valid area, C1 = 0.01^2,
// C2 = 0.03^2 for a data range of 1, per channel, averaged over channels and window positions. Images of at least
// 11 x 11.
torch::Tensor ssim(const torch::Tensor& a, const torch::Tensor& b);
// Per image RMS gradient magnitude ([B]): sqrt of the mean of dx^2 + dy^2 (forward differences per channel) over the
// (H - 1) x (W - 1) positions and the channels. Not the mean magnitude: that is the total variation per pixel, which
// blurring a step edge leaves unchanged (the edge's rise is only spread out); the squares fall as the edge spreads.
torch::Tensor rms_gradient(const torch::Tensor& x);

// The retrieval features of a set of images: the 32 x 32 area-downscaled RGB and its forward-difference gradients.
struct RetrievalFeatures {
  torch::Tensor rgb;   // [N, 3 * 32 * 32]
  torch::Tensor grad;  // [N, 3 * (31 * 32 + 32 * 31)]
};
RetrievalFeatures retrieval_features(const torch::Tensor& images);

// The rank of each query's target in the gallery by L2 distance of the features: 1 + the number of gallery entries
// strictly closer than the target (a gallery duplicate of the target at the same distance does not push it down).
// query [B, D], gallery [N, D], targets int64 [B] indexing the gallery -> int64 [B].
torch::Tensor retrieval_ranks(const torch::Tensor& query, const torch::Tensor& gallery, const torch::Tensor& targets);

// The stream's index lists for 1, 2 and 4 txt2img steps of 50 LCM steps (what the contact sheet and the adherence
// test use; 4 is the CLI's txt2img default): {0}, {0, 45}, {0, 16, 32, 45}; other counts spread evenly over 0..45.
std::vector<int64_t> eval_index_list(int steps);

struct ReconstructionScore {
  int64_t n = 0;
  double psnr_db = 0;  // mean of the per-image PSNR
  double ssim = 0;     // mean of the per-image SSIM
};

struct RetrievalScore {
  int steps = 0;
  std::vector<int64_t> t_index_list;
  int64_t n = 0;        // names generated
  int64_t gallery = 0;  // emoji ranked
  double top1_l2 = 0, top5_l2 = 0, median_rank_l2 = 0;      // fractions in [0, 1]; rank 1 = best
  double top1_grad = 0, top5_grad = 0, median_rank_grad = 0;
  double sharpness = 0;  // mean rms_gradient(generated) / mean rms_gradient(the named emoji), over the n names
  std::vector<std::string> names;
  std::vector<int64_t> rank_l2, rank_grad;  // per name
};

struct EmojiEvalOptions {
  std::vector<int> steps{1, 2, 4};
  uint64_t seed = 2;     // the stream's noise seed (one StreamDiffusion per name and step count)
  int64_t batch = 64;    // images per autoencoder call
  bool reconstruction = true;
};

struct EmojiEvalResult {
  ReconstructionScore reconstruction;  // n = 0 when not measured
  std::vector<RetrievalScore> retrieval;
};

// Autoencoder round trip (models.encode_image then decode_latent, at the images' size) of every image of `images`
// (float [N, 3, S, S] in [-1, 1]).
ReconstructionScore reconstruction_score(const DiffusionModels& models, const torch::Tensor& images,
                                         int64_t batch = 64);

// Everything above on a loaded model and the emoji of `data` (one style): generation at the data's image size, cfg
// none, no denoising batch (all steps in one call), as tests/train/test_emoji_adherence.cpp does.
EmojiEvalResult evaluate_emoji_model(const std::shared_ptr<const DiffusionModels>& models, const EmojiDataset& data,
                                     const EmojiEvalOptions& opts = {});

nlohmann::json to_json(const EmojiEvalResult& r);
// A plain-text table of the result (what `streamdiffusion eval` prints).
std::string format_eval(const EmojiEvalResult& r);

}  // namespace sd::train
