#pragma once
// StreamDiffusion (spec §3–§6): the stream batch ("denoising batch") over LCM timesteps, residual classifier-free
// guidance (RCFG), the stochastic similarity filter and runtime updates, on top of a DiffusionModels set.
//
// One StreamDiffusion object is one stream (its latent buffer and RCFG state belong to one input sequence); several
// streams may share one DiffusionModels. A stream is not thread-safe: drive it from one thread.
//
// Notation: n = len(t_index_list), F = frame_buffer_size, B = rows of the stream batch (n·F with the denoising batch,
// F in sequential mode), α/β = sqrt(ᾱ)/sqrt(1−ᾱ) per row.
//
// Deliberate divergences from the original code (commit b623251), all where the original raises or drops state:
//  * F > 1 with n > 1: the intended layout of spec §3.6 (rows grouped by step, F new frames at rows [0, F), the last
//    F rows are the output, buffer = α[F:]·X0[:−F] + β[F:]·init_noise[F:], per-frame entry noise init_noise[0:F],
//    RCFG state shifted/rolled by F rows, c_skip/c_out per row). Identical to the original for F = 1.
//  * cfg "initialize" with F > 1: the same intended layout (F negative rows for the F newest frames).
//  * cfg "full" without the denoising batch: plain CFG at every sequential step (2F UNet rows).
//  * update_prompt() re-encodes the negative prompt too and rebuilds the full text layout.
// Where the original runs with F > 1 (n = 1, or sequential mode) it is reproduced exactly when
// StreamConfig::original_frame_layout is true (the default): all F frames enter with init_noise[0], and the RCFG
// state update rolls init_noise by one row. Set it false to use the intended per-frame rows there too.
#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/types.h>

#include "core/cuda_graph.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/lcm_scheduler.h"
#include "pipeline/prompt_blend.h"
#include "pipeline/rng.h"
#include "pipeline/similarity_filter.h"

namespace sd {

class ControlNet;

// One ControlNet of a stream and its conditioning_scale (guess_mode false).
struct ControlNetUnit {
  std::shared_ptr<const ControlNet> net;
  double scale = 1.0;
  // diffusers' control_guidance_start / control_guidance_end: the share of the denoising steps the ControlNet
  // conditions. Step i of the n of t_index_list keeps it unless i / n < start or (i + 1) / n > end (diffusers'
  // controlnet_keep); in the stream batch each UNet row is at its own step, told by its timestep (two steps of one
  // timestep with only one in range are refused at the call), and a txt2img_one_shot image is step 0 of 1.
  // 0 <= start < end <= 1.
  double guidance_start = 0.0, guidance_end = 1.0;
  // Whether step i of n keeps this ControlNet.
  bool keeps(int64_t i, int64_t n) const;
};

enum class CfgType { None, Full, Self, Initialize };
// "none" | "full" | "self" | "initialize"; anything else throws InvalidArgument.
CfgType parse_cfg_type(const std::string& name);
std::string cfg_type_name(CfgType t);

// What the producer of an img2img input promises (StreamDiffusion::img2img). `queued`: work queued on the calling
// thread's CUDA stream may still be writing it, so whatever reads it first waits for that stream - behind the
// previous frames' kernels when the caller runs ahead of the GPU. `complete`: nothing queued writes it any more
// (image_to_device_tensor's frames: uploaded and waited for), so the similarity filter's and the deep cache's cosine
// run at once on a side stream and the decision about frame N does not wait for frame N-1. The outputs are the
// same either way; off CUDA, and for device inputs that still need a conversion, the two are the same. Where the
// stream compares its inputs (StreamDiffusion::compares_inputs) a host input goes up on a side stream, waited for
// there, and so is complete whatever is promised; elsewhere it goes up non-blocking on the calling thread's stream.
enum class InputReady { queued, complete };

struct StreamConfig {
  std::vector<int64_t> t_index_list{32, 45};  // indices into the num_inference_steps LCM timesteps (0 = t 999)
  int64_t num_inference_steps = 50;
  CfgType cfg_type = CfgType::Self;
  double guidance_scale = 1.2;  // γ; forced to 1 for cfg none; guidance is active only when γ > 1
  double delta = 1.0;           // δ, scales the virtual residual noise (RCFG)
  int64_t frame_buffer_size = 1;
  bool use_denoising_batch = true;
  bool do_add_noise = true;
  int64_t width = 512;
  int64_t height = 512;
  uint64_t seed = 2;
  SimilarityFilterOptions similarity_filter;
  bool original_frame_layout = true;  // see the header comment
  // Temporal reuse of the UNet's deep features (models/unet_feature_cache.h): 1 = off; K > 1 = one full UNet call
  // every K stream calls, the K − 1 between run only the first level on the stored deep features. An img2img input
  // whose cosine similarity to the input of the last full call (the similarity filter's measure) falls below
  // deep_cache_min_similarity forces a full call at once.
  int64_t deep_cache_every = 1;
  double deep_cache_min_similarity = 0.95;
  // Live performance controls (pipeline/prompt_blend.h). seed_list: init_noise is the variance-preserving blend of
  // these seeds' draws (empty = `seed` alone). prompt_blend: how a prompt list blends. transition: how prompt and seed
  // changes morph (default: at once, as before).
  std::vector<WeightedSeed> seed_list;
  BlendMethod prompt_blend = BlendMethod::Linear;
  Transition transition;
  // Latent feedback A in [0, 1] (img2img): the encoded input latent becomes (1 − A)·z + A·x0_prev, x0_prev the
  // previous call's output latent (once the stream is past its warm-up); 0 = off, exactly as before.
  double latent_feedback = 0;
  // CUDA graphs (core/cuda_graph.h) for the UNet call and the TAESD encode / decode on a CUDA device: each fixed
  // shape is recorded once and replayed. Off: every call launches its kernels. No effect elsewhere. Calls with
  // ControlNet residuals, the deep cache, an IP-Adapter image prompt or a trace run without graphs.
  bool cuda_graphs = true;
  // Waits for the device after each component so the StreamStats times are the components' own. Off on CUDA by
  // default: a host wait inside a frame stalls the launch queue; the output's copy to the host is the frame's one
  // wait. (A no-op on the CPU.)
  bool sync_components = false;
};

struct StreamStats {
  int64_t calls = 0;      // img2img / txt2img / txt2img_one_shot calls
  int64_t processed = 0;  // calls that ran the models
  int64_t skipped = 0;    // calls answered with the previous output by the similarity filter
  int64_t forced = 0;     // would-be skips forced through (max_skip_frame)
  int64_t unet_calls = 0;
  int64_t unet_rows = 0;
  int64_t text_encodes = 0;
  int64_t controlnet_calls = 0;   // ControlNet evaluations (one per ControlNet per UNet call that computed them)
  int64_t controlnet_reused = 0;  // UNet calls that reused cached residuals (set_controlnet_every)
  int64_t unet_shallow_calls = 0;  // UNet calls that ran only the first level on cached deep features (deep cache)
  int64_t deep_cache_forced = 0;   // full calls forced by an input less similar than deep_cache_min_similarity
  int64_t image_prompt_encodes = 0;  // IP-Adapter image prompts through the image encoder (once per image)
  int64_t graph_replays = 0;         // UNet / encode / decode calls answered by a CUDA graph replay
  int64_t graph_captures = 0;        // CUDA graphs recorded (one per component and shape)
  int64_t graph_failures = 0;        // captures that failed (that component and shape then runs eagerly, logged;
                                     // tried again after the graphs are dropped: new LoRA weights, other ControlNets)
  // Multi-stream batching (pipeline/multi_stream.h): stream calls whose UNet rows ran in one UNet call shared with
  // other streams (each still counts one unet_call and its own rows; unet_s / decode_s get the share of the shared
  // call's time in proportion to the rows).
  int64_t batched_calls = 0;
  double text_encode_s = 0, image_encode_s = 0, unet_s = 0, decode_s = 0, controlnet_s = 0;
  double image_prompt_s = 0;   // wall time of the image prompt encodes
  double total_s = 0;          // wall time of processed calls
  double ema_call_s = 0;       // 0.9·ema + 0.1·call time, processed calls only (the filter's sleep); on CUDA the
                               // device time between events around the call, folded in once done (a call or so late;
                               // torch >= 2.5, else the host time)
};

class StreamDiffusion {
 public:
  // `rng` defaults to a TorchRng; `uniform` (the filter's draws) to a seeded std::mt19937_64.
  StreamDiffusion(std::shared_ptr<const DiffusionModels> models, StreamConfig config,
                  std::shared_ptr<Rng> rng = nullptr, std::shared_ptr<UniformSource> uniform = nullptr);

  // Builds every cache (spec §3.1, §6): seeds the Rng with config.seed, encodes the prompts, computes the schedule
  // and coefficients, draws init_noise (the first draw), zeroes stock_noise and the latent buffer.
  void prepare(const std::string& prompt, const std::string& negative_prompt = "");
  // The same with a weighted prompt list (pipeline/prompt_blend.h); {{p, 1}} is prepare(p) exactly.
  void prepare(const std::vector<WeightedPrompt>& prompts, const std::string& negative_prompt = "");
  bool prepared() const { return prepared_; }

  // One stream step with F new frames [F, 3, H, W] in [-1, 1] (a [3, H, W] tensor when F = 1). Returns the decoded
  // images [F, 3, H, W] (≈[-1, 1], not clamped) of the frames submitted n−1 calls earlier (warm-up outputs first).
  // With the similarity filter, a skipped call returns the previous output and changes no state.
  torch::Tensor img2img(const torch::Tensor& images, InputReady ready = InputReady::queued);
  // One stream step whose new latents are F fresh standard-normal draws (spec §3.4).
  torch::Tensor txt2img();
  // sd-turbo one-shot batch (spec §3.5): B = rows of the stream batch fresh latents, one UNet call at the B
  // timesteps, X0 = (X − β·ε̂)/α, all B images decoded. No buffer, no guidance, no latency.
  torch::Tensor txt2img_one_shot();

  // Runtime updates (spec §6), no reload. update_prompt re-encodes both prompts and rebuilds the full text layout,
  // unless both are the ones the stream has (or morphs to): then it does nothing, as set_prompt_list with the target.
  // A change of the shared models' text encoder (DiffusionModels::set_lora_scale) is noticed by the next call, which
  // re-encodes the prompts first (DiffusionModels::text_encoder_version()).
  // Prompts may carry weights ((word:1.3), [word]: pipeline/prompt_weights.h). With config().transition the prompt
  // morphs from the current conditioning to the new one over the transition (the negative prompt changes at once).
  void update_prompt(const std::string& prompt, const std::string& negative_prompt = "");
  // A weighted prompt list, blended on the cached embeddings (config().prompt_blend); only texts new to the stream are
  // encoded. Morphs with config().transition. InvalidArgument for a bad list (prompt_blend.h).
  void set_prompt_list(const std::vector<WeightedPrompt>& prompts);
  const std::vector<WeightedPrompt>& prompt_list() const { return prompt_list_; }  // the target list
  // A new negative prompt alone (encoded when the layout needs it); the prompt blend is kept.
  void set_negative_prompt(const std::string& negative_prompt);
  void set_prompt_blend(BlendMethod method);   // re-blends the current list at once
  void set_transition(const Transition& transition);  // for the next prompt / seed changes
  bool transition_active() const { return prompt_schedule_.active() || seed_schedule_.active(); }
  // The effective prompt / seed weights of the next call (during a transition: the morph's; normalised).
  std::vector<WeightedPrompt> effective_prompts() const;
  std::vector<WeightedSeed> effective_seeds() const;
  // Latent feedback A in [0, 1] (StreamConfig::latent_feedback), live.
  void set_latent_feedback(double amount);
  void set_guidance_scale(double guidance_scale);
  void set_delta(double delta);
  // Same length: new timesteps and coefficients, buffers kept (in-flight latents are one call off schedule).
  // Different length: the stream state is reset (buffers zeroed, init_noise redrawn from config.seed).
  void set_t_index_list(const std::vector<int64_t>& t_index_list);
  // Reseeds, redraws init_noise, zeroes stock_noise; the latent buffer is kept. With config().transition the noise
  // morphs to the new seed's instead (a seed blend over the transition, stock_noise kept).
  void set_seed(uint64_t seed);
  // init_noise from a weighted seed list (StreamConfig::seed_list), at once or with config().transition.
  void set_seed_list(const std::vector<WeightedSeed>& seeds);
  void set_similarity_filter(const SimilarityFilterOptions& options);
  // IP-Adapter image prompt (models with DiffusionModels::ip_adapter()): the image (uint8 RGB [H, W, 3], any size:
  // CLIPImageProcessor's resize and centre crop) is encoded once, here, to image tokens [1, T, D]; every UNet call
  // then gets them after the text rows of the cond rows, and the uncond rows get the tokens of diffusers'
  // unconditional image (zero image_embeds). Until an image is set (or after clear_image_prompt) every row gets the
  // unconditional image's tokens. May be called before or after prepare(); takes effect from the next call, the
  // latent buffer is kept. InvalidArgument when the models have no IP-Adapter or for a bad image.
  void set_image_prompt(const torch::Tensor& rgb_u8_hwc);
  void clear_image_prompt();
  bool has_image_prompt() const { return image_tokens_.defined(); }

  // ControlNets (fixtures controlnet/; livepeer's StreamDiffusion ControlNet module): before every UNet call each
  // ControlNet runs on the SAME batch - every stream-batch row, RCFG rows included, the same timesteps and text rows -
  // with its control image repeated once per row; the residuals (each times its scale) are summed and added to the
  // UNet's skip tensors and mid-block output. With a guidance range the rows of the steps out of range get none (the
  // ControlNet runs on the kept rows alone). A ControlNet at scale 0, or whose range keeps none of the
  // steps, is skipped (bit-identical to none). Replacing the list clears the control images; every ControlNet that
  // runs needs one before the next call (InvalidArgument).
  void set_controlnets(std::vector<ControlNetUnit> units);
  const std::vector<ControlNetUnit>& controlnets() const { return controlnets_; }
  // Whether ControlNet `index` runs on the stream's calls: not at scale 0, nor with a range that keeps none of the
  // steps of t_index_list (then it needs no control image).
  bool controlnet_runs(size_t index) const;
  void set_controlnet_scale(size_t index, double scale);
  // ControlNetUnit::guidance_start / guidance_end of ControlNet `index`, live. InvalidArgument unless
  // 0 <= start < end <= 1.
  void set_controlnet_guidance(size_t index, double start, double end);
  // image: [3, H, W] or [1, 3, H, W] float in [0, 1], or uint8 [H, W, 3] RGB; any size (resized, bilinear with
  // antialiasing, to the stream's width x height). Takes effect from the next call; may change every frame.
  void set_control_image(size_t index, const torch::Tensor& image);
  const torch::Tensor& control_image(size_t index) const;  // [1, 3, H, W] in the stream dtype, or undefined
  // Recompute the residuals on every n-th stream call only and reuse them in between (what StreamDiffusionTD does to
  // save compute: the residuals lag the latents and control image by up to n-1 calls). 1 (default) = every call.
  // Cached residuals are dropped when the ControlNets, a scale or the schedule change.
  void set_controlnet_every(int64_t n);
  int64_t controlnet_every() const { return controlnet_every_; }
  // StreamConfig::deep_cache_every / deep_cache_min_similarity, live (the cache is dropped; the next call is full).
  // InvalidArgument for K < 1, a similarity outside [-1, 1], or K > 1 on models without the shallow path.
  void set_deep_cache(int64_t every, double min_similarity);

  using TraceFn = std::function<void(const std::string& name, const torch::Tensor& value)>;
  // Observes intermediate tensors of each call (tests, debugging): "image_latent", "x_t_latent_in",
  // "unet{k}.sample" / ".timestep" / ".out", "x_0_pred_out".
  void set_trace(TraceFn trace) { trace_ = std::move(trace); }

  const StreamConfig& config() const { return config_; }
  const StreamStats& stats() const { return stats_; }
  const DiffusionModels& models() const { return *models_; }
  const std::shared_ptr<Rng>& rng() const { return rng_; }
  const SimilarityFilter* similarity_filter() const { return filter_.get(); }
  // Whether img2img compares each input with an earlier one as it arrives (the similarity filter, the deep cache's
  // check): then an input that is complete (InputReady) spares the model thread a wait for the frames before it.
  bool compares_inputs() const { return filter_ != nullptr || config_.deep_cache_every > 1; }
  const FilterDecision& last_filter_decision() const { return last_decision_; }
  // Multi-stream batching (pipeline/multi_stream.h): "" when this stream's calls may share one UNet call with other
  // streams' calls, else why they cannot (not prepared, sequential mode, ControlNets, deep-feature cache).
  std::string batch_blocker() const;

  // Derived quantities and state (shapes in the header comment of each member below).
  int64_t denoising_steps() const { return static_cast<int64_t>(config_.t_index_list.size()); }
  int64_t batch_size() const;      // B
  int64_t unet_batch_size() const; // rows of one UNet call (B, B + F for initialize, 2B for full)
  double guidance_scale() const { return guidance_scale_; }  // effective γ
  double delta() const { return delta_; }
  bool guidance_active() const { return guidance_scale_ > 1.0; }
  int64_t latent_height() const { return config_.height / vae_scale_; }
  int64_t latent_width() const { return config_.width / vae_scale_; }
  const std::vector<int64_t>& timesteps() const { return timesteps_; }          // all LCM timesteps
  const std::vector<int64_t>& sub_timesteps() const { return sub_timesteps_; }  // t_sub, n entries
  const torch::Tensor& sub_timesteps_tensor() const { return t_sub_; }          // [B] (batch) or [n] int64
  const torch::Tensor& alpha_prod_t_sqrt() const { return alpha_; }             // [B or n, 1, 1, 1]
  const torch::Tensor& beta_prod_t_sqrt() const { return beta_; }
  const torch::Tensor& c_skip() const { return c_skip_; }                       // [B or n, 1, 1, 1]
  const torch::Tensor& c_out() const { return c_out_; }
  const torch::Tensor& prompt_embeds() const { return prompt_embeds_; }         // UNet text rows (spec §4.1)
  const torch::Tensor& cond_embeds() const { return cond_embeds_; }             // [1, 77, D]
  const torch::Tensor& uncond_embeds() const { return uncond_embeds_; }         // [1, 77, D] or undefined
  // IP-Adapter: the cond rows' image tokens [1, T, D] (the image prompt's, else the unconditional image's) and the
  // uncond rows' (the unconditional image's); undefined without an IP-Adapter. prompt_embeds() rows are then
  // [77 + T, D]: the text rows followed by these.
  const torch::Tensor& cond_image_tokens() const { return cond_image_tokens_; }
  const torch::Tensor& uncond_image_tokens() const { return uncond_image_tokens_; }
  int64_t uncond_rows() const { return uncond_rows_; }
  // SDXL's added conditioning in the same row layout as prompt_embeds() (undefined for SD 1.x / 2.x).
  const AddedConditioning& added_conditioning() const { return added_; }
  const torch::Tensor& cond_pooled() const { return cond_pooled_; }     // [1, P] or undefined
  const torch::Tensor& uncond_pooled() const { return uncond_pooled_; } // [1, P] or undefined
  const torch::Tensor& init_noise() const { return init_noise_; }               // [B, C, h, w]
  const torch::Tensor& stock_noise() const { return stock_noise_; }             // [B, C, h, w]
  const torch::Tensor& latent_buffer() const { return x_t_latent_buffer_; }     // [(n−1)·F, C, h, w] or undefined
  const torch::Tensor& previous_output() const { return prev_output_; }
  const torch::Tensor& previous_output_latent() const { return prev_output_latent_; }  // x0 of the last output

 private:
  using Clock = std::chrono::steady_clock;

  void validate_config() const;
  void build_schedule();          // timesteps, t_sub, α, β, c_skip, c_out
  void build_prompt_layout();     // prompt_embeds from cond/uncond (encodes the negative prompt when needed)
  void reset_stream_state();      // init_noise (drawn), stock_noise and buffer zeroed
  void encode_prompts(bool need_uncond);
  // Prompt / seed blends: the embeddings of one prompt text (weights parsed), encoding the texts the schedule needs
  // (cached per text), the blend of the effective list into cond_embeds_ / cond_pooled_, and the seeds' noise.
  TextEmbeddings encode_one_prompt(const std::string& text);
  void encode_missing_prompts();
  void blend_prompts();
  torch::Tensor seed_noise(uint64_t seed);
  void blend_seeds();
  void start_prompt_list(const std::vector<WeightedPrompt>& prompts, bool reencode);
  void advance_transitions();  // per stream call
  void refresh_prompts();         // re-encodes when the models' text encoder changed since the last encode
  bool needs_uncond() const;
  bool head_rows() const;         // reproduce the original's F > 1 row handling (see header comment)
  void require_prepared(const char* what) const;

  // One stream call, split around its UNet evaluation so that the one-stream path (img2img / txt2img) and the
  // multi-stream path (pipeline/multi_stream.cpp, which runs several streams' UNet rows in one call between the
  // halves) are the same code:
  //   begin_img2img / begin_txt2img   everything before the UNet: checks, filter, encode, add noise, then
  //                                    begin_unet_rows: the stream batch (buffer rows, RCFG shift) and the UNet rows
  //   UNet                             call_unet (one stream) or one shared call (several)
  //   finish_unet                      guidance, RCFG update, LCM denoise, buffer update -> the output latent
  //   finish_call                      after the decode: output, latent feedback, counters
  struct CallTimer;  // device events around a call (stream_diffusion.cpp)
  struct CallState {
    Clock::time_point start;
    bool done = false;       // answered without the models (similarity filter skip): `output` is the answer
    torch::Tensor output;
    torch::Tensor x_t;       // the new latents [F, C, h, w]
    torch::Tensor x;         // the stream batch [B, C, h, w] (denoising batch)
    torch::Tensor x_in, t_in;  // the UNet rows (spec §4.1 layout)
    torch::Tensor t_in_host;   // t_in's timesteps on the host (CPU int64): what the ControlNet ranges read
    torch::Tensor image;     // img2img between begin_img2img_input and begin_img2img_latent: the input [F, 3, H, W]
    std::shared_ptr<CallTimer> timer;  // a processed call's device events (CUDA), else null
    double skip_sleep_s = 0;  // a skip's sleep (SimilarityFilterOptions::sleep_on_skip) left to the caller
                              // (begin_img2img_input's defer_sleep)
    torch::Tensor stock_noise_before;  // the RCFG state before begin_unet_rows shifted it: back there if the UNet fails
  };
  // InvalidArgument before a call changes anything (so that a retry after the fix is the call that was refused):
  // a ControlNet that would run without a control image.
  void check_call_inputs(const char* what) const;
  // StreamStats::ema_call_s, the filter's sleep on a skip, is a processed call's time. On CUDA that is the GPU's time
  // between events recorded around the call, as the original times it (on a GPU running ahead, the call's host time is
  // only its launch), folded in when a later call finds the end event done, so the host never waits for it;
  // elsewhere the call's host time.
  std::shared_ptr<CallTimer> start_call_timer();  // null off CUDA (or in a libtorch whose events cannot time)
  void end_call_timer(std::shared_ptr<CallTimer> timer, double host_seconds);
  void fold_call_timers();  // the finished calls' device times into the EMA
  std::deque<std::shared_ptr<CallTimer>> call_timers_;
  friend struct MultiStreamAccess;  // pipeline/multi_stream.cpp
  // begin_img2img = begin_img2img_input (checks, transitions, filter, deep-cache reference: call.image), then
  // encode_input(call.image) (several streams' inputs may share one encode), then begin_img2img_latent.
  CallState begin_img2img(const torch::Tensor& images, InputReady ready);
  // defer_sleep: a skip does not sleep here but leaves the time in call.skip_sleep_s (a shared step must not stall
  // the other streams' calls on one stream's skip).
  CallState begin_img2img_input(const torch::Tensor& images, InputReady ready, bool defer_sleep = false);
  torch::Tensor encode_input(const torch::Tensor& x);  // step 3: z = Enc(x) · scaling_factor
  void begin_img2img_latent(CallState& call, const torch::Tensor& z);
  CallState begin_txt2img();
  void begin_unet_rows(CallState& call);
  torch::Tensor finish_unet(CallState& call, const torch::Tensor& pred);
  torch::Tensor finish_call(CallState& call, const torch::Tensor& latent, const torch::Tensor& image);
  torch::Tensor complete_call(CallState& call);  // the one-stream rest of a begun call
  // The trace and counters of one UNet evaluation whose rows ran in a shared call (multi-stream).
  void record_shared_unet(const CallState& call, const torch::Tensor& pred, double seconds);
  torch::Tensor predict_x0_sequential(const torch::Tensor& x_t_latent);
  // The UNet rows of one guided evaluation of the stream batch x at t_list (spec §4.1): x_in, t_in.
  std::pair<torch::Tensor, torch::Tensor> unet_layout(const torch::Tensor& x, const torch::Tensor& t_list) const;
  torch::Tensor unet_rows(const torch::Tensor& rows) const;  // that layout of one per-row tensor
  // Guidance, denoise and (batch mode) the RCFG update on the UNet output `pred` of the rows x_in. idx < 0: batch
  // mode (row-wise coefficients); else sequential step idx. Returns X0.
  torch::Tensor after_unet(const torch::Tensor& x, const torch::Tensor& x_in, torch::Tensor pred, int64_t idx);
  // unet_layout + call_unet + after_unet (sequential steps). t_host: t_list on the host.
  torch::Tensor unet_step(const torch::Tensor& x_t_latent, const torch::Tensor& t_list, const torch::Tensor& t_host,
                          int64_t idx);
  // t_host: t's timesteps on the host (CPU int64 [R]), so that choosing the ControlNet rows reads no device memory.
  torch::Tensor call_unet(const torch::Tensor& sample, const torch::Tensor& t, const torch::Tensor& t_host,
                          const torch::Tensor& ehs, const AddedConditioning& added);
  // The summed ControlNet residuals of UNet call `index` of this stream call (computed or reused); empty without
  // ControlNets or when none runs on this call (scale 0, or no row of it in the range).
  ControlResiduals control_residuals(int64_t index, const torch::Tensor& sample, const torch::Tensor& t,
                                     const torch::Tensor& t_host, const torch::Tensor& ehs,
                                     const AddedConditioning& added);
  // The device copy of a list of row indices (the rows a guidance range keeps), uploaded once per list (no host
  // wait).
  const torch::Tensor& row_index(const std::vector<int64_t>& rows);
  void begin_stream_call();  // per stream call bookkeeping (UNet call index, ControlNet reuse phase)
  // The SDXL rows of `rows` copies of the cond prompt (txt2img_one_shot); empty without added conditioning.
  AddedConditioning cond_added_rows(int64_t rows) const;
  torch::Tensor decode(const torch::Tensor& latent);
  void trace(const std::string& name, const torch::Tensor& t) const;
  void sync_device() const;

  std::shared_ptr<const DiffusionModels> models_;
  StreamConfig config_;
  std::shared_ptr<Rng> rng_;
  std::shared_ptr<UniformSource> uniform_;
  LCMScheduler scheduler_;
  int64_t vae_scale_ = 8;
  c10::ScalarType dtype_;
  c10::Device device_;

  bool prepared_ = false;
  std::string prompt_, negative_prompt_;
  double guidance_scale_ = 1.0, delta_ = 1.0;
  std::vector<int64_t> timesteps_, sub_timesteps_;
  torch::Tensor t_sub_, alpha_, beta_, c_skip_, c_out_;
  torch::Tensor t_sub_host_;  // t_sub_ on the host (CPU int64)
  std::map<std::vector<int64_t>, torch::Tensor> row_index_;  // row_index()'s uploads, dropped with the schedule
  torch::Tensor cond_embeds_, uncond_embeds_, prompt_embeds_;
  // IP-Adapter: the image prompt's tokens (undefined = none set), the tokens of the rows (see cond_image_tokens())
  // and the cond text rows with their image tokens [1, 77 + T, D] (txt2img_one_shot's rows).
  torch::Tensor image_tokens_, cond_image_tokens_, uncond_image_tokens_, cond_context_;
  torch::Tensor cond_pooled_, uncond_pooled_, time_ids_;  // SDXL: [1, P], [1, P], [1, 6] (stream size)
  AddedConditioning added_;                               // SDXL: rows of prompt_embeds_
  int64_t uncond_rows_ = 0;
  bool one_shot_call_ = false;  // txt2img_one_shot's UNet call: its rows are separate one-step images
  uint64_t text_encoder_version_ = 0;  // models_->text_encoder_version() of the cached embeddings
  torch::Tensor init_noise_, stock_noise_, x_t_latent_buffer_, prev_output_;
  torch::Tensor prev_output_latent_;   // latent feedback: the last output's x0 (undefined during warm-up)
  int64_t calls_since_reset_ = 0;      // stream calls since the buffer was last zeroed (warm-up: < n)

  // Prompt and seed blends (pipeline/prompt_blend.h).
  std::vector<WeightedPrompt> prompt_list_;
  BlendSchedule<std::string> prompt_schedule_;
  BlendSchedule<uint64_t> seed_schedule_;
  std::map<std::string, TextEmbeddings> prompt_cache_;  // text -> its embeddings (the texts the schedule needs)
  std::map<uint64_t, torch::Tensor> seed_cache_;         // seed -> its init_noise draw (seed blends only)

  std::unique_ptr<SimilarityFilter> filter_;
  FilterDecision last_decision_;
  // CUDA graphs of the fixed-shape components (StreamConfig::cuda_graphs).
  bool use_graphs() const;
  bool wants_graphs() const;  // use_graphs() but for the device: the config allows graphs for this stream's calls
  std::vector<torch::Tensor> graphed(const std::string& name, const std::vector<torch::Tensor>& inputs,
                                     const std::function<std::vector<torch::Tensor>(const std::vector<torch::Tensor>&)>& fn);
  std::unique_ptr<GraphCache> graphs_;
  uint64_t graphs_weights_version_ = 0;
  StreamStats stats_;
  TraceFn trace_;
  int64_t unet_call_index_ = 0;  // per stream call, for trace names

  std::vector<ControlNetUnit> controlnets_;
  std::vector<torch::Tensor> control_images_;          // per ControlNet: [1, 3, H, W] in dtype_ on device_
  int64_t controlnet_every_ = 1;
  int64_t control_phase_ = 0;                          // stream calls since the residuals were last computed
  std::map<int64_t, ControlResiduals> control_cache_;  // UNet call index within a stream call -> residuals

  // Deep-feature cache (StreamConfig::deep_cache_every).
  void reset_deep_cache();
  std::map<int64_t, UNetFeatureCache> deep_cache_;  // UNet call index within a stream call -> deep features
  int64_t deep_phase_ = 0;        // stream calls since the last full one (0 = the next call is full)
  bool deep_reuse_now_ = false;   // this stream call reuses
  bool deep_force_full_ = false;  // set by img2img when the input moved too far
  torch::Tensor deep_ref_input_;  // a copy of the img2img input of the last full call
  bool deep_ref_complete_ = false;  // made on a side stream from a complete input (nothing queued writes it)
};

}  // namespace sd
