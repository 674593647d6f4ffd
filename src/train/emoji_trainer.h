#pragma once
// Trains the tiny text-to-image model shipped as models/emoji-tiny (a normal diffusers StableDiffusionPipeline
// folder, loaded by sd::load_pipeline like any other model) from emoji images and their names, with libtorch
// autograd on the CPU:
//   phase 1  a tiny AutoencoderTiny (TAESD architecture, 64 px <-> 8 x 8 x 8 latents): L2 + L1 reconstruction;
//   phase 2  a tiny CLIP text encoder (own BPE vocabulary, bpe_trainer.h) and a tiny UNet2DConditionModel, jointly,
//            epsilon prediction on the scaled-linear schedule of the pipeline's LCM scheduler. The loss is the eps
//            MSE weighted by clamp((1 - a) / a, 1, 100) - x0-space error, which is what the pipeline's LCM step
//            (x0 = (x - sqrt(1-a) eps) / sqrt(a)) turns eps errors into - with extra weight on t = 999 and the 50
//            LCM timesteps the stream uses, so 1-4 step sampling works.
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
  int64_t ae_steps = 400, unet_steps = 1000;
  int64_t ae_batch = 16, batch = 24;
  double ae_lr = 2e-3, lr = 1e-3, weight_decay = 1e-2;
  int64_t warmup = 50;
  int64_t checkpoint_every = 500;  // 0 = only at the end of each phase
  int64_t log_every = 50;          // progress line every N steps (0 = silent)
  double uncond_prob = 0.05;       // caption dropped (empty prompt): lets cfg full / initialize work
  // The text encoder stays at its seeded random init when false: joint training from scratch let it collapse to
  // (almost) the same embedding for every caption within 1000 steps, while a frozen random CLIP transformer gives
  // distinct, deterministic caption features the UNet's cross-attention learns to read.
  bool train_text_encoder = false;
  double max_loss_weight = 5.0;  // eps-MSE weight clamp((1 - a) / a, 1, max): x0-space error, capped
  BpeTrainOptions bpe{1000, 2};
  nlohmann::json taesd_config = emoji_taesd_config();
  nlohmann::json unet_config = emoji_unet_config();
  // hidden_size, layers... of the text encoder; vocab_size and token ids are filled in from the learned vocabulary.
  nlohmann::json text_config = emoji_text_encoder_config(0);
  bool resume = true;
  // Stop after this many steps of this invocation (0 = run to the end); for tests of resuming.
  int64_t stop_after = 0;
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
  torch::Tensor latents_;                   // [N, 4, 16, 16] scaled, phase 2
  std::vector<torch::Tensor> token_ids_;    // per sample: [V, 77] ids of each caption variant
  torch::Tensor empty_ids_;                 // [77]
  double scaling_factor_ = 1.0;
  int64_t step_ = 0;
};

}  // namespace sd::train
