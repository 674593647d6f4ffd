#pragma once
// Trains the tiny text-to-image model shipped as models/emoji-tiny (a normal diffusers StableDiffusionPipeline
// folder, loaded by sd::load_pipeline like any other model) from emoji images and their names, with libtorch
// autograd on the CPU:
//   phase 1  a tiny AutoencoderTiny (TAESD architecture, 64 px <-> 8 x 8 x 8 latents): L1 + L2 + the L1 of the pixel
//            gradients' error, 6000 steps (the first model: L2 + L1, 400 steps, 18 dB; models/emoji-tiny/README.md);
//   phase 2  a tiny CLIP text encoder (own BPE vocabulary, bpe_trainer.h) and a tiny UNet2DConditionModel, jointly,
//            epsilon prediction on the scaled-linear schedule of the pipeline's LCM scheduler. The loss is the eps
//            MSE weighted by clamp((1 - a) / a, 1, 250) - x0-space error, which is what the pipeline's LCM step
//            (x0 = (x - sqrt(1-a) eps) / sqrt(a)) turns eps errors into - with extra weight on t = 999 and the 50
//            LCM timesteps the stream uses, so 1-4 step sampling works. Two choices make the one-step estimate
//            usable for a tiny UNet: latents scaled to std 3 (not 1; the TAESD's scaling_factor says so, so the
//            pipeline needs nothing special), and at t = 999 the input is pure noise, as in the stream's first step.
// Deterministic for a seed: every step's randomness comes from a generator seeded with (seed, step), so a run
// resumed from a checkpoint continues exactly like an uninterrupted one (given the same thread count: libtorch's
// CPU reductions are deterministic per thread count).
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "models/autoencoder_tiny.h"
#include "models/clip_text_model.h"
#include "models/unet_2d_condition.h"
#include "tokenizer/clip_tokenizer.h"
#include "train/bpe_trainer.h"
#include "train/emoji_dataset.h"

namespace sd::train {

// The shipped architecture (see models/emoji-tiny/README.md).
nlohmann::json emoji_taesd_config();
nlohmann::json emoji_unet_config();
nlohmann::json emoji_text_encoder_config(int64_t vocab_size);

struct TrainOptions {
  std::string work_dir;  // tokenizer + checkpoint.safetensors (resumed from when present)
  uint64_t seed = 0;
  // The shipped recipe (pilots: both phases kept improving with steps; 101 min on one Zen 4 core).
  int64_t ae_steps = 8000, unet_steps = 8000;
  int64_t ae_batch = 16, batch = 96;
  double ae_lr = 2e-3, lr = 1e-3, weight_decay = 1e-2;
  // The autoencoder's reconstruction loss: "l2l1" = L2 + 0.5 L1 (the first model's); "edge" = L1 + L2 +
  // ae_grad_weight * L1 of the difference of the horizontal and vertical pixel gradients, which keeps outlines
  // (L2 alone averages an edge it cannot place into a blur).
  std::string ae_loss = "edge";
  double ae_grad_weight = 1.0;
  // > 0: every stage of the autoencoder's encoder and decoder gets this many channels (replacing taesd_config's
  // two channel lists); 0: taesd_config as given.
  int64_t ae_channels = 0;
  int64_t warmup = 50;
  int64_t checkpoint_every = 500;  // 0 = only at the end of each phase
  int64_t log_every = 50;          // progress line every N steps (0 = silent)
  double uncond_prob = 0.05;       // caption dropped (empty prompt): lets cfg full / initialize work
  double canonical_prob = 0.5;     // the emoji's name itself (what users type), else any caption variant
  // Trained jointly with the UNet. When false it stays at its seeded random init (its caption features are then
  // computed once): the UNet then learned to tell 1911 captions apart far more slowly (pilots: no gain in adherence
  // after 500 steps, where the joint run had opened a gap). Joint training collapsed the embeddings only in a run
  // with latent_std 1, where the first step could not use the caption anyway.
  bool train_text_encoder = true;
  // eps-MSE weight clamp((1 - a) / a, 1, max): the x0-space error, capped. At 250 (> 213 at t = 999) the first
  // stream step's x0 error outweighed the later steps' ~100-fold and 4 steps came out softer than 1; capped at 30 the
  // later steps count more: at 4 steps sharpness 0.696 -> 0.749, top-1 90 -> 92%, and 1 step gained too (pilots).
  double max_loss_weight = 30.0;
  // Standard deviation of the latents the UNet sees (the TAESD's scaling_factor is latent_std / std of the raw
  // latents). Above 1 the data outweighs the noise at every t - at t = 999 the pipeline's x0 = (x - sqrt(1 - a) eps)
  // / sqrt(a) divides the UNet's eps error by sqrt(a) = 0.068, so a larger signal makes the first step's
  // estimate usable for a tiny UNet.
  double latent_std = 3.0;
  // At t = 999 train on what the stream feeds there: pure noise x (no sqrt(a) x0 term), with the eps target that
  // makes the pipeline's x0 formula return the clean latent.
  bool terminal_pure_noise = true;
  BpeTrainOptions bpe{1000, 2};
  nlohmann::json taesd_config = emoji_taesd_config();
  nlohmann::json unet_config = emoji_unet_config();
  // hidden_size, layers... of the text encoder; vocab_size and token ids are filled in from the learned vocabulary.
  nlohmann::json text_config = emoji_text_encoder_config(0);
  bool resume = true;
  // Every N UNet steps (and at the end) log the probe: 1-step adherence on the 50 emoji the adherence test uses
  // (0 = never). Uses its own generator: the training's randomness and results do not depend on it.
  int64_t probe_every = 0;
  // Stop after this many steps of this invocation (0 = run to the end); for tests of resuming.
  int64_t stop_after = 0;
};

// The adherence probe: for every (N / 50)-th sample (at most 50), the one-step (t = 999) image for its emoji name
// against the named emoji and a random other one (std::mt19937_64 seeded 12345), L2 at 16 x 16 RGB in [0, 1] -
// the selection and distance of tests/train/test_emoji_adherence.cpp.
// With it, the measures of `streamdiffusion eval` (train/emoji_eval.h) on the same one-step images: retrieval top-1 /
// top-5 among all training samples (L2 at 32 x 32 RGB) and sharpness (RMS gradient over the named emoji's).
struct ProbeResult {
  int n = 0, closer = 0;
  double mean_own = 0, mean_other = 0;
  double top1 = 0, top5 = 0, sharpness = 0;
};

// The autoencoder's round trip over every sample (encode, decode): mean per-image PSNR and SSIM as `eval` measures
// them. Logged at the end of the autoencoder phase when probing.
struct AutoencoderProbe {
  int64_t n = 0;
  double psnr_db = 0, ssim = 0;
};

struct TrainStats {
  int64_t step = 0;  // global steps done (AE steps first, then UNet steps)
  double ae_loss = 0, unet_loss = 0;  // mean loss of the last logging window of each phase
  double seconds = 0;
  std::vector<std::pair<int64_t, double>> loss_curve;  // (global step, mean loss of the window)
};

class EmojiTrainer {
 public:
  EmojiTrainer(TrainOptions opts, std::shared_ptr<const EmojiDataset> data);

  // Runs (or resumes) both phases; writes checkpoints into work_dir. Returns when done or after stop_after steps.
  TrainStats run();
  // Writes the diffusers folder (model_index.json, scheduler/, tokenizer/, text_encoder/, unet/, vae/ config,
  // taesd/), weights stored as `dtype` (fp32 / fp16 / bf16; loaders cast to the run dtype).
  void export_model(const std::string& out_dir, torch::ScalarType dtype = torch::kFloat32) const;

  void save_checkpoint(const std::string& path) const;
  // False when `path` does not exist; FormatError when it does not match this architecture.
  bool load_checkpoint(const std::string& path);

  ProbeResult probe_adherence();
  AutoencoderProbe probe_autoencoder();

  int64_t step() const { return step_; }
  double latent_scaling_factor() const { return scaling_factor_; }
  // Every trained parameter, prefixed "taesd.", "text_encoder.", "unet." (what checkpoints hold).
  std::map<std::string, torch::Tensor> parameters() const;
  const ClipTokenizer& tokenizer() const { return *tokenizer_; }
  std::function<void(const std::string&)> log;  // progress lines (default: stderr)

 private:
  double lr_at(int64_t phase_step, int64_t phase_steps, double base) const;
  void ae_step(int64_t s, double& loss_out);
  void unet_step(int64_t s, double& loss_out);
  void prepare_latents();
  void prepare_text_features();
  torch::Tensor sample_timesteps(int64_t n, at::Generator& gen) const;

  TrainOptions o_;
  std::shared_ptr<const EmojiDataset> data_;
  std::unique_ptr<ClipTokenizer> tokenizer_;
  BpeVocab vocab_;
  nlohmann::json text_config_json_;
  AutoencoderTiny taesd_{nullptr};
  CLIPTextModel text_{nullptr};
  UNet2DConditionModel unet_{nullptr};
  std::unique_ptr<torch::optim::AdamW> ae_opt_, opt_;
  torch::Tensor alphas_cumprod_;            // [1000]
  std::vector<int64_t> lcm_timesteps_;      // the 50 LCM timesteps
  torch::Tensor latents_;                   // [N, C, h, w] scaled, phase 2
  std::vector<torch::Tensor> token_ids_;    // per sample: [V, 77] ids of each caption variant
  torch::Tensor empty_ids_;                 // [77]
  // Frozen text encoder: the features of every caption variant, computed once. Row caption_row_[i] + v holds
  // variant v of sample i; the last row is the empty caption.
  torch::Tensor text_features_;             // [rows, L, D]
  std::vector<int64_t> caption_row_;
  torch::Tensor probe_gallery_;             // [N, 3 * 32 * 32] retrieval features of every sample, for the probe
  double scaling_factor_ = 1.0;
  int64_t step_ = 0;
};

}  // namespace sd::train
