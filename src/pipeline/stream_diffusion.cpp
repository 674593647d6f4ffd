#include "pipeline/stream_diffusion.h"

#include <algorithm>
#include <cmath>
#include <thread>

#include <torch/cuda.h>
#include <torch/torch.h>

#include "core/cuda_graph_counts.h"
#include "core/error.h"
#include "core/shape_str.h"
#include "core/log.h"
#include "core/side_stream.h"
#include "core/torch_compat.h"
#include "models/ip_adapter.h"
#include "pipeline/control_guidance.h"
#include "pipeline/controlnet.h"
#include "pipeline/image.h"
#include "pipeline/prompt_weights.h"

#if SD_WITH_CUDA && SD_HAS_EVENT_TIMING
#include <c10/core/Event.h>
#include <c10/cuda/CUDAStream.h>
#define SD_TIMES_CALLS_ON_DEVICE 1
#endif

namespace sd {

using torch::Tensor;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---- The scheduler operations of spec §2.5, op by op in the order the spec writes them. ----------------------
// α, β, c_skip, c_out broadcast per row ([rows, 1, 1, 1]) or are one row ([1, 1, 1]).

// add_noise / renoise: α·x0 + β·ε
Tensor add_noise(const Tensor& x0, const Tensor& eps, const Tensor& alpha, const Tensor& beta) {
  return alpha * x0 + beta * eps;
}

// F(x, ε̂) = (x − β·ε̂) / α, then the LCM boundary condition c_out·F + c_skip·x ("scheduler_step_batch").
Tensor denoise(const Tensor& x, const Tensor& eps_hat, const Tensor& alpha, const Tensor& beta, const Tensor& c_skip,
               const Tensor& c_out) {
  const Tensor f_theta = (x - beta * eps_hat) / alpha;
  return c_out * f_theta + c_skip * x;
}

// cat(t[k:], t[0:k]) — rows rolled up by k.
Tensor roll_rows(const Tensor& t, int64_t k) { return torch::cat({t.slice(0, k), t.slice(0, 0, k)}, 0); }

// cat(t[k:], ones like t[0:k]) — the "next step" coefficients of the RCFG update, 1 for the last step's rows.
Tensor next_rows_or_one(const Tensor& t, int64_t k) {
  return torch::cat({t.slice(0, k), torch::ones_like(t.slice(0, 0, k))}, 0);
}

}  // namespace

CfgType parse_cfg_type(const std::string& name) {
  if (name == "none") return CfgType::None;
  if (name == "full") return CfgType::Full;
  if (name == "self") return CfgType::Self;
  if (name == "initialize") return CfgType::Initialize;
  throw InvalidArgument("unknown cfg_type '" + name + "' (expected none, full, self or initialize)");
}

std::string cfg_type_name(CfgType t) {
  switch (t) {
    case CfgType::None: return "none";
    case CfgType::Full: return "full";
    case CfgType::Self: return "self";
    case CfgType::Initialize: return "initialize";
  }
  return "?";
}

StreamDiffusion::StreamDiffusion(std::shared_ptr<const DiffusionModels> models, StreamConfig config,
                                 std::shared_ptr<Rng> rng, std::shared_ptr<UniformSource> uniform)
    : models_(std::move(models)),
      config_(std::move(config)),
      rng_(std::move(rng)),
      uniform_(std::move(uniform)),
      scheduler_(models_ ? models_->scheduler_config() : LCMSchedulerConfig{}),
      dtype_(c10::kFloat),
      device_(c10::kCPU) {
  if (!models_) throw InvalidArgument("StreamDiffusion: no models given");
  vae_scale_ = models_->vae_scale_factor();
  dtype_ = models_->dtype();
  device_ = models_->device();
  if (!rng_) rng_ = std::make_shared<TorchRng>(config_.seed);
  if (!uniform_) uniform_ = std::make_shared<Mt19937UniformSource>(config_.seed);
  validate_config();
  guidance_scale_ = config_.cfg_type == CfgType::None ? 1.0 : config_.guidance_scale;
  delta_ = config_.delta;
  set_similarity_filter(config_.similarity_filter);
  graphs_ = std::make_unique<GraphCache>();
  graphs_weights_version_ = models_->weights_version();
}

void StreamDiffusion::validate_config() const {
  const auto& c = config_;
  if (c.t_index_list.empty()) throw InvalidArgument("t_index_list is empty: give at least one step, e.g. [32, 45]");
  if (c.frame_buffer_size < 1)
    throw InvalidArgument("frame_buffer_size must be >= 1, got " + std::to_string(c.frame_buffer_size));
  check_image_size(c.width, c.height, "stream");
  if (c.deep_cache_every < 1)
    throw InvalidArgument("deep_cache_every must be >= 1 (1 = off), got " + std::to_string(c.deep_cache_every));
  if (!(c.deep_cache_min_similarity >= -1.0 && c.deep_cache_min_similarity <= 1.0))
    throw InvalidArgument("deep_cache_min_similarity must be in [-1, 1], got " +
                          std::to_string(c.deep_cache_min_similarity));
  if (c.deep_cache_every > 1 && !models_->supports_feature_cache())
    throw InvalidArgument("deep_cache_every " + std::to_string(c.deep_cache_every) +
                          ": these models have no shallow UNet path to reuse deep features with");
  if (vae_scale_ < 1 || c.width % vae_scale_ != 0 || c.height % vae_scale_ != 0)
    throw InvalidArgument("stream size " + std::to_string(c.width) + "x" + std::to_string(c.height) +
                          " is not a multiple of the VAE scale factor " + std::to_string(vae_scale_));
  // The schedule raises for bad step counts; the indices must point into it.
  const auto ts = scheduler_.timesteps(c.num_inference_steps);
  for (size_t i = 0; i < c.t_index_list.size(); ++i) {
    const int64_t t = c.t_index_list[i];
    if (t < 0 || t >= c.num_inference_steps)
      throw InvalidArgument("t_index_list[" + std::to_string(i) + "] = " + std::to_string(t) +
                            " is not an index into the " + std::to_string(c.num_inference_steps) +
                            " inference timesteps (expected 0.." + std::to_string(c.num_inference_steps - 1) + ")");
    if (i > 0 && t <= c.t_index_list[i - 1])
      log::warn("t_index_list is not strictly ascending ({} after {}): steps will not go from noisy to clean", t,
                c.t_index_list[i - 1]);
  }
  if (!std::isfinite(c.guidance_scale)) throw InvalidArgument("guidance_scale must be finite");
  if (!std::isfinite(c.delta)) throw InvalidArgument("delta must be finite");
  if (!(c.latent_feedback >= 0 && c.latent_feedback <= 1))
    throw InvalidArgument("latent_feedback must be in [0, 1], got " + std::to_string(c.latent_feedback));
  if (!c.seed_list.empty()) check_seed_list(c.seed_list, "seed_list");
}

int64_t StreamDiffusion::batch_size() const {
  return config_.use_denoising_batch ? denoising_steps() * config_.frame_buffer_size : config_.frame_buffer_size;
}

int64_t StreamDiffusion::unet_batch_size() const {
  const int64_t B = batch_size();
  if (!guidance_active()) return B;
  if (config_.cfg_type == CfgType::Full) return 2 * B;
  if (config_.cfg_type == CfgType::Initialize) return B + config_.frame_buffer_size;
  return B;
}

bool StreamDiffusion::needs_uncond() const {
  return guidance_active() && (config_.cfg_type == CfgType::Full || config_.cfg_type == CfgType::Initialize);
}

bool StreamDiffusion::head_rows() const {
  // The original runs F > 1 only with n = 1 or in sequential mode, and never with a guided "initialize".
  return config_.original_frame_layout && config_.frame_buffer_size > 1 &&
         (denoising_steps() == 1 || !config_.use_denoising_batch) &&
         !(guidance_active() && config_.cfg_type == CfgType::Initialize);
}

void StreamDiffusion::require_prepared(const char* what) const {
  if (!prepared_) throw InvalidArgument(std::string(what) + ": call prepare(prompt) first");
}

void StreamDiffusion::trace(const std::string& name, const Tensor& t) const {
  if (trace_) trace_(name, t);
}

void StreamDiffusion::sync_device() const {
  if (config_.sync_components && device_.is_cuda()) torch::cuda::synchronize();
}

bool StreamDiffusion::wants_graphs() const { return config_.cuda_graphs && !trace_ && !has_image_prompt(); }

bool StreamDiffusion::use_graphs() const { return wants_graphs() && device_.is_cuda() && GraphCache::compiled(); }

std::vector<torch::Tensor> StreamDiffusion::graphed(
    const std::string& name, const std::vector<Tensor>& inputs,
    const std::function<std::vector<Tensor>(const std::vector<Tensor>&)>& fn) {
  // A re-fused LoRA replaced weight tensors: the recorded graphs read the old addresses.
  if (const uint64_t v = models_->weights_version(); v != graphs_weights_version_) {
    graphs_->clear();
    graphs_weights_version_ = v;
  }
  return run_counted(*graphs_, name, inputs, fn, stats_);
}

// ---- Caches (spec §3.1, §6) -----------------------------------------------------------------------------------

void StreamDiffusion::build_schedule() {
  torch::NoGradGuard no_grad;
  const int64_t n = denoising_steps();
  const int64_t reps = config_.use_denoising_batch ? config_.frame_buffer_size : 1;
  timesteps_ = scheduler_.timesteps(config_.num_inference_steps);
  sub_timesteps_.clear();
  std::vector<float> a(n), b(n), cs(n), co(n);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t t = timesteps_[config_.t_index_list[j]];
    sub_timesteps_.push_back(t);
    const LCMCoefficients c = scheduler_.coefficients(t);
    a[j] = c.alpha_prod_t_sqrt;
    b[j] = c.beta_prod_t_sqrt;
    cs[j] = c.c_skip;
    co[j] = c.c_out;
  }
  // Computed in float32, rounded once to the model dtype; repeated per frame: rows t0×F, t1×F, ...
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  const auto coef = [&](const std::vector<float>& v) {
    return torch::tensor(v, f32).view({n, 1, 1, 1}).repeat_interleave(reps, 0).to(device_, dtype_);
  };
  alpha_ = coef(a);
  beta_ = coef(b);
  c_skip_ = coef(cs);
  c_out_ = coef(co);
  t_sub_host_ = torch::tensor(sub_timesteps_, torch::TensorOptions().dtype(torch::kInt64)).repeat_interleave(reps, 0);
  t_sub_ = t_sub_host_.to(device_);
  row_index_.clear();
}

void StreamDiffusion::encode_prompts(bool need_uncond) {
  // Every prompt text the blend needs is encoded again (prepare, update_prompt, a changed text encoder), then the
  // negative prompt when the layout needs it.
  text_encoder_version_ = models_->text_encoder_version();
  prompt_cache_.clear();
  encode_missing_prompts();
  blend_prompts();
  if (need_uncond) {
    const auto t0 = Clock::now();
    TextEmbeddings uncond = encode_one_prompt(negative_prompt_);
    uncond_embeds_ = uncond.embeds;
    uncond_pooled_ = uncond.pooled;
    ++stats_.text_encodes;
    sync_device();
    stats_.text_encode_s += seconds_since(t0);
  } else {
    uncond_embeds_ = Tensor();
    uncond_pooled_ = Tensor();
  }
}

TextEmbeddings StreamDiffusion::encode_one_prompt(const std::string& text) {
  // Prompt weights (prompt_weights.h): text without weight syntax takes the plain path, bit for bit as before.
  const std::vector<PromptChunk> chunks = parse_prompt_weights(text);
  if (unweighted(chunks)) return models_->encode_text(joined_text(chunks));
  return models_->encode_weighted_text(chunks);
}

void StreamDiffusion::encode_missing_prompts() {
  // Only texts the blend does not hold yet are encoded (a new list, not every frame); texts no longer needed go.
  const auto t0 = Clock::now();
  const std::vector<std::string> keys = prompt_schedule_.keys();
  bool encoded = false;
  for (const auto& text : keys) {
    if (prompt_cache_.count(text)) continue;
    prompt_cache_[text] = encode_one_prompt(text);
    ++stats_.text_encodes;
    encoded = true;
  }
  for (auto it = prompt_cache_.begin(); it != prompt_cache_.end();)
    it = std::find(keys.begin(), keys.end(), it->first) == keys.end() ? prompt_cache_.erase(it) : std::next(it);
  if (encoded) {
    sync_device();
    stats_.text_encode_s += seconds_since(t0);
  }
}

void StreamDiffusion::blend_prompts() {
  // cond = the blend of the effective list's cached embeddings (one entry: that prompt's embeddings, bit for bit).
  std::vector<Tensor> embeds, pooled;
  std::vector<double> weights;
  for (const auto& [text, weight] : prompt_schedule_.current()) {
    const TextEmbeddings& e = prompt_cache_.at(text);
    embeds.push_back(e.embeds);
    pooled.push_back(e.pooled);
    weights.push_back(weight);
  }
  cond_embeds_ = blend_embeddings(embeds, weights, config_.prompt_blend);
  cond_pooled_ = pooled[0].defined() ? blend_embeddings(pooled, weights, config_.prompt_blend) : Tensor();
}

torch::Tensor StreamDiffusion::seed_noise(uint64_t seed) {
  // A seed's init_noise: the first draw after seeding the stream's Rng (as a single seed draws it).
  auto it = seed_cache_.find(seed);
  if (it != seed_cache_.end()) return it->second;
  const auto opts = torch::TensorOptions().dtype(dtype_).device(device_);
  rng_->manual_seed(seed);
  Tensor n = rng_->randn({batch_size(), models_->latent_channels(), latent_height(), latent_width()},
                         "seed blend: init_noise")
                 .to(opts);
  seed_cache_[seed] = n;
  return n;
}

void StreamDiffusion::blend_seeds() {
  // init_noise = Σ ŵ_i·N_i / sqrt(Σ ŵ_i²) over the effective seed list (prompt_blend.h). Seeds of weight 0 are not
  // drawn, and new seeds are drawn last to first, so the stream's later random draws (txt2img latents) continue from
  // the list's first seed, as they would with that seed alone.
  // A seed listed twice is one draw: its weights add up (two copies of one noise are not independent, and would
  // scale the blend by up to sqrt(2)).
  std::vector<std::pair<uint64_t, double>> list;
  for (const auto& e : seed_schedule_.current()) {
    auto same = std::find_if(list.begin(), list.end(), [&](const auto& m) { return m.first == e.first; });
    if (same != list.end())
      same->second += e.second;
    else
      list.push_back(e);
  }
  std::vector<Tensor> noise(list.size());
  std::vector<double> weights;
  for (size_t i = list.size(); i-- > 0;)
    if (list[i].second > 0) noise[i] = seed_noise(list[i].first);
  for (const auto& e : list) weights.push_back(e.second);
  init_noise_ = blend_noise(noise, weights);
  const std::vector<uint64_t> keys = seed_schedule_.keys();
  for (auto it = seed_cache_.begin(); it != seed_cache_.end();)
    it = std::find(keys.begin(), keys.end(), it->first) == keys.end() ? seed_cache_.erase(it) : std::next(it);
}

void StreamDiffusion::build_prompt_layout() {
  // Spec §4.1: none/self -> e_c × B; full -> e_n × B, e_c × B; initialize -> e_n × F, e_c × B.
  reset_deep_cache();  // deep features of another conditioning are not reused
  const int64_t B = batch_size();
  uncond_rows_ = 0;
  if (guidance_active() && config_.cfg_type == CfgType::Full) uncond_rows_ = B;
  if (guidance_active() && config_.cfg_type == CfgType::Initialize) uncond_rows_ = config_.frame_buffer_size;
  if (uncond_rows_ > 0 && !uncond_embeds_.defined()) {
    const auto t0 = Clock::now();
    TextEmbeddings uncond = encode_one_prompt(negative_prompt_);
    uncond_embeds_ = uncond.embeds;
    uncond_pooled_ = uncond.pooled;
    ++stats_.text_encodes;
    stats_.text_encode_s += seconds_since(t0);
  }
  // IP-Adapter: the image tokens follow the text rows (cond: the image prompt's, uncond: the zero image's).
  cond_context_ = cond_embeds_;
  Tensor uncond_context = uncond_embeds_;
  if (const IPAdapterModels* ip = models_->ip_adapter()) {
    if (!uncond_image_tokens_.defined()) {  // [1, T, D], made at load (or here, for a set built without the loader)
      const Tensor t = ip->uncond_image_tokens.defined() ? ip->uncond_image_tokens
                                                          : ip->image_tokens(ip->image_embeds(Tensor()));
      uncond_image_tokens_ = t.to(device_, dtype_);
    }
    cond_image_tokens_ = image_tokens_.defined() ? image_tokens_ : uncond_image_tokens_;
    cond_context_ = torch::cat({cond_embeds_, cond_image_tokens_}, 1);
    if (uncond_rows_ > 0) uncond_context = torch::cat({uncond_embeds_, uncond_image_tokens_}, 1);
  }
  const Tensor cond = cond_context_.repeat({B, 1, 1});
  prompt_embeds_ = uncond_rows_ > 0 ? torch::cat({uncond_context.repeat({uncond_rows_, 1, 1}), cond}, 0) : cond;
  // SDXL: the pooled text and the size micro-conditioning get exactly the rows of prompt_embeds_.
  added_ = AddedConditioning();
  if (cond_pooled_.defined()) {
    const Tensor pooled = cond_pooled_.repeat({B, 1});
    added_.text_embeds =
        uncond_rows_ > 0 ? torch::cat({uncond_pooled_.repeat({uncond_rows_, 1}), pooled}, 0) : pooled;  // [U, P]
    added_.time_ids = time_ids_.repeat({prompt_embeds_.size(0), 1});                                    // [U, 6]
  }
}

AddedConditioning StreamDiffusion::cond_added_rows(int64_t rows) const {
  if (!cond_pooled_.defined()) return {};
  return {cond_pooled_.repeat({rows, 1}), time_ids_.repeat({rows, 1})};
}

void StreamDiffusion::reset_stream_state() {
  torch::NoGradGuard no_grad;
  const int64_t n = denoising_steps(), F = config_.frame_buffer_size, C = models_->latent_channels();
  const auto opts = torch::TensorOptions().dtype(dtype_).device(device_);
  x_t_latent_buffer_ = n > 1 ? torch::zeros({(n - 1) * F, C, latent_height(), latent_width()}, opts) : Tensor();
  seed_cache_.clear();
  if (config_.seed_list.empty()) {
    rng_->manual_seed(config_.seed);
    // init_noise is drawn on the CPU in float32, then cast and moved (spec §3.1): the first draw after seeding.
    init_noise_ = rng_->randn({batch_size(), C, latent_height(), latent_width()}, "prepare: init_noise").to(opts);
    seed_schedule_.reset({{config_.seed, 1.0}});
    seed_cache_[config_.seed] = init_noise_;
  } else {
    // Seed blend (prompt_blend.h): each seed's draw as above, blended variance-preserving.
    std::vector<std::pair<uint64_t, double>> seeds;
    for (const auto& e : config_.seed_list) seeds.push_back({e.seed, e.weight});
    seed_schedule_.reset(seeds);
    blend_seeds();
  }
  stock_noise_ = torch::zeros_like(init_noise_);
  prev_output_latent_ = Tensor();
  calls_since_reset_ = 0;
}

void StreamDiffusion::prepare(const std::string& prompt, const std::string& negative_prompt) {
  prepare(std::vector<WeightedPrompt>{{prompt, 1.0}}, negative_prompt);
}

void StreamDiffusion::prepare(const std::vector<WeightedPrompt>& prompts, const std::string& negative_prompt) {
  torch::NoGradGuard no_grad;
  check_prompt_list(prompts, "prompt list");
  prompt_list_ = prompts;
  prompt_ = prompts.size() == 1 ? prompts[0].text : prompt_list_str(prompts);
  std::vector<std::pair<std::string, double>> entries;
  for (const auto& p : prompts) entries.push_back({p.text, p.weight});
  prompt_schedule_.reset(entries);
  negative_prompt_ = negative_prompt;
  guidance_scale_ = config_.cfg_type == CfgType::None ? 1.0 : config_.guidance_scale;
  delta_ = config_.delta;
  build_schedule();
  // SDXL micro-conditioning: original size = target size = the stream size, no crop (diffusers' defaults).
  if (models_->pooled_text_dim() > 0)
    time_ids_ = sdxl_add_time_ids(config_.height, config_.width, 0, 0, config_.height, config_.width).to(device_);
  encode_prompts(needs_uncond());
  build_prompt_layout();
  reset_stream_state();
  prepared_ = true;
  if (!config_.use_denoising_batch && denoising_steps() > 1)
    log::debug("sequential mode: init_noise is overwritten by each call's input latent (original behaviour)");
}

// ---- Runtime updates (spec §6) --------------------------------------------------------------------------------

void StreamDiffusion::update_prompt(const std::string& prompt, const std::string& negative_prompt) {
  require_prepared("update_prompt");
  // The prompts the stream already has or is morphing to (a caller that passes its prompt with every frame, as
  // upstream's wrapper does): nothing to do. Starting over would restart the transition on every frame, so that it
  // never ended, and encode both texts each time; a changed text encoder is re-encoded by the next call anyway.
  if (negative_prompt == negative_prompt_ && prompt_list_ == std::vector<WeightedPrompt>{{prompt, 1.0}}) return;
  torch::NoGradGuard no_grad;
  // Both prompts are encoded again (as before); with a transition the cond rows morph towards the new prompt.
  negative_prompt_ = negative_prompt;
  uncond_embeds_ = Tensor();
  uncond_pooled_ = Tensor();
  start_prompt_list({{prompt, 1.0}}, true);
}

void StreamDiffusion::set_negative_prompt(const std::string& negative_prompt) {
  require_prepared("set_negative_prompt");
  torch::NoGradGuard no_grad;
  negative_prompt_ = negative_prompt;
  uncond_embeds_ = Tensor();
  uncond_pooled_ = Tensor();
  build_prompt_layout();  // encodes it when the layout has negative rows
}

void StreamDiffusion::set_prompt_list(const std::vector<WeightedPrompt>& prompts) {
  require_prepared("set_prompt_list");
  if (prompts == prompt_list_) return;  // the current target again: the transition towards it goes on
  torch::NoGradGuard no_grad;
  start_prompt_list(prompts, false);
}

void StreamDiffusion::start_prompt_list(const std::vector<WeightedPrompt>& prompts, bool reencode) {
  check_prompt_list(prompts, "prompt list");
  if (reencode)
    for (const auto& p : prompts) prompt_cache_.erase(p.text);
  std::vector<std::pair<std::string, double>> entries;
  for (const auto& p : prompts) entries.push_back({p.text, p.weight});
  prompt_list_ = prompts;
  prompt_ = prompts.size() == 1 ? prompts[0].text : prompt_list_str(prompts);
  prompt_schedule_.set(entries, config_.transition);
  encode_missing_prompts();
  blend_prompts();  // at once: the new list; with a transition: the current mix until the next call steps it
  build_prompt_layout();  // (encodes the negative prompt when the layout needs it)
}

void StreamDiffusion::set_prompt_blend(BlendMethod method) {
  config_.prompt_blend = method;
  if (!prepared_) return;
  torch::NoGradGuard no_grad;
  blend_prompts();
  build_prompt_layout();
}

void StreamDiffusion::set_transition(const Transition& transition) {
  if (transition.frames < 0 || !(transition.seconds >= 0) || !std::isfinite(transition.seconds))
    throw InvalidArgument("transition: frames and seconds must be >= 0");
  config_.transition = transition;
}

std::vector<WeightedPrompt> StreamDiffusion::effective_prompts() const {
  std::vector<WeightedPrompt> out;
  double total = 0;
  for (const auto& e : prompt_schedule_.current()) total += e.second;
  for (const auto& e : prompt_schedule_.current()) out.push_back({e.first, e.second / total});
  return out;
}

std::vector<WeightedSeed> StreamDiffusion::effective_seeds() const {
  std::vector<WeightedSeed> out;
  double total = 0;
  for (const auto& e : seed_schedule_.current()) total += e.second;
  for (const auto& e : seed_schedule_.current()) out.push_back({e.first, e.second / total});
  return out;
}

void StreamDiffusion::set_latent_feedback(double amount) {
  if (!(amount >= 0 && amount <= 1))
    throw InvalidArgument("latent_feedback must be in [0, 1], got " + std::to_string(amount));
  config_.latent_feedback = amount;
}

void StreamDiffusion::advance_transitions() {
  // One stream call of the running transitions (prompt_blend.h): the cond rows and init_noise of this call. No text
  // is encoded here: every embedding the morph needs was encoded when the list changed.
  const auto now = Clock::now();
  if (prompt_schedule_.step(now)) {
    blend_prompts();
    build_prompt_layout();
    if (!prompt_schedule_.active()) encode_missing_prompts();  // done: drop the old texts (encodes nothing)
  }
  if (seed_schedule_.step(now)) blend_seeds();
}

void StreamDiffusion::refresh_prompts() {
  // The text encoder's weights changed under the cached embeddings (a live LoRA scale change on the shared models):
  // encode again, as update_prompt() with the same prompts would.
  if (models_->text_encoder_version() == text_encoder_version_) return;
  encode_prompts(needs_uncond());
  build_prompt_layout();
}

void StreamDiffusion::set_image_prompt(const Tensor& rgb_u8_hwc) {
  const IPAdapterModels* ip = models_->ip_adapter();
  if (!ip) throw InvalidArgument("set_image_prompt: the models have no IP-Adapter (load one with --ip-adapter)");
  if (!rgb_u8_hwc.defined() || rgb_u8_hwc.dim() != 3)
    throw InvalidArgument("image prompt: expected one uint8 RGB image [H, W, 3]");
  torch::NoGradGuard no_grad;
  const auto t0 = Clock::now();
  image_tokens_ = ip->image_tokens(ip->image_embeds(rgb_u8_hwc)).to(device_, dtype_);  // [1, T, D]
  ++stats_.image_prompt_encodes;
  stats_.image_prompt_s += seconds_since(t0);
  if (prepared_) build_prompt_layout();
}

void StreamDiffusion::clear_image_prompt() {
  image_tokens_ = Tensor();
  if (prepared_) {
    torch::NoGradGuard no_grad;
    build_prompt_layout();
  }
}

void StreamDiffusion::set_guidance_scale(double guidance_scale) {
  if (!std::isfinite(guidance_scale)) throw InvalidArgument("guidance_scale must be finite");
  config_.guidance_scale = guidance_scale;
  if (config_.cfg_type == CfgType::None && guidance_scale > 1.0)
    log::warn("cfg_type none ignores guidance_scale {} (guidance stays 1)", guidance_scale);
  guidance_scale_ = config_.cfg_type == CfgType::None ? 1.0 : guidance_scale;
  if (prepared_) {
    torch::NoGradGuard no_grad;
    build_prompt_layout();
  }
}

void StreamDiffusion::set_delta(double delta) {
  if (!std::isfinite(delta)) throw InvalidArgument("delta must be finite");
  config_.delta = delta;
  delta_ = delta;
}

void StreamDiffusion::set_t_index_list(const std::vector<int64_t>& t_index_list) {
  const size_t old_n = config_.t_index_list.size();
  const auto old = config_.t_index_list;
  config_.t_index_list = t_index_list;
  try {
    validate_config();
  } catch (...) {
    config_.t_index_list = old;
    throw;
  }
  control_cache_.clear();
  reset_deep_cache();
  if (!prepared_) return;
  torch::NoGradGuard no_grad;
  build_schedule();
  if (t_index_list.size() != old_n) {
    // The stream batch changes size: start the stream over (like prepare, without re-encoding the prompts).
    build_prompt_layout();
    reset_stream_state();
  }
}

void StreamDiffusion::set_seed(uint64_t seed) {
  config_.seed = seed;
  config_.seed_list.clear();
  if (!prepared_) return;
  torch::NoGradGuard no_grad;
  if (!config_.transition.instant()) {  // morph: a seed blend from the current noise to this seed's
    seed_schedule_.set({{seed, 1.0}}, config_.transition);
    // Every seed the morph needs, drawn now (not during it), last to first as blend_seeds() does.
    const std::vector<uint64_t> keys = seed_schedule_.keys();
    for (size_t i = keys.size(); i-- > 0;) seed_noise(keys[i]);
    return;
  }
  rng_->manual_seed(seed);
  init_noise_ = rng_->randn(init_noise_.sizes(), "set_seed: init_noise").to(init_noise_.options());
  stock_noise_ = torch::zeros_like(init_noise_);
  seed_schedule_.reset({{seed, 1.0}});
  seed_cache_.clear();
  seed_cache_[seed] = init_noise_;
}

void StreamDiffusion::set_seed_list(const std::vector<WeightedSeed>& seeds) {
  check_seed_list(seeds, "seed list");
  config_.seed_list = seeds;
  if (!prepared_) return;
  torch::NoGradGuard no_grad;
  std::vector<std::pair<uint64_t, double>> entries;
  for (const auto& e : seeds) entries.push_back({e.seed, e.weight});
  seed_schedule_.set(entries, config_.transition);
  if (seed_schedule_.active()) {
    // Every seed the morph needs, drawn now (not during it), last to first as blend_seeds() does.
    const std::vector<uint64_t> keys = seed_schedule_.keys();
    for (size_t i = keys.size(); i-- > 0;) seed_noise(keys[i]);
    return;
  }
  blend_seeds();
  stock_noise_ = torch::zeros_like(init_noise_);  // as set_seed
}

void StreamDiffusion::set_similarity_filter(const SimilarityFilterOptions& options) {
  config_.similarity_filter = options;
  if (options.enabled)
    filter_ = std::make_unique<SimilarityFilter>(options.threshold, options.max_skip_frame, uniform_);
  else
    filter_.reset();
}

struct StreamDiffusion::CallTimer {
#ifdef SD_TIMES_CALLS_ON_DEVICE
  c10::Event start{c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT};  // BACKEND_DEFAULT: with timing
  c10::Event end{c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT};
#endif
};

std::shared_ptr<StreamDiffusion::CallTimer> StreamDiffusion::start_call_timer() {
#ifdef SD_TIMES_CALLS_ON_DEVICE
  if (device_.is_cuda()) {
    auto t = std::make_shared<CallTimer>();
    t->start.record(c10::cuda::getCurrentCUDAStream(device_.has_index() ? device_.index() : -1));
    return t;
  }
#endif
  return nullptr;
}

void StreamDiffusion::end_call_timer(std::shared_ptr<CallTimer> timer, double host_seconds) {
  if (!timer) {
    stats_.ema_call_s = 0.9 * stats_.ema_call_s + 0.1 * host_seconds;
    return;
  }
#ifdef SD_TIMES_CALLS_ON_DEVICE
  timer->end.record(c10::cuda::getCurrentCUDAStream(device_.has_index() ? device_.index() : -1));
  call_timers_.push_back(std::move(timer));
  // A caller that never lets the GPU catch up keeps the newest calls' events only.
  if (call_timers_.size() > 16) call_timers_.pop_front();
#endif
}

void StreamDiffusion::fold_call_timers() {
#ifdef SD_TIMES_CALLS_ON_DEVICE
  while (!call_timers_.empty() && call_timers_.front()->end.query()) {
    const std::shared_ptr<CallTimer> t = std::move(call_timers_.front());
    call_timers_.pop_front();  // first: a timer that cannot be read is dropped, not read again on every call
    try {
      stats_.ema_call_s = 0.9 * stats_.ema_call_s + 0.1 * t->start.elapsedTime(t->end) / 1000.0;  // ms
    } catch (const std::exception& e) {
      log::warn("stream: a call's device time could not be read ({}); the filter's sleep keeps its last value",
                e.what());
    }
  }
#endif
}

// ---- One call (spec §3.2–§3.5) --------------------------------------------------------------------------------

torch::Tensor StreamDiffusion::img2img(const torch::Tensor& images, InputReady ready) {
  torch::NoGradGuard no_grad;
  CallState call = begin_img2img(images, ready);
  if (call.done) return call.output;
  return complete_call(call);
}

torch::Tensor StreamDiffusion::txt2img() {
  torch::NoGradGuard no_grad;
  CallState call = begin_txt2img();
  return complete_call(call);
}

StreamDiffusion::CallState StreamDiffusion::begin_img2img(const torch::Tensor& images, InputReady ready) {
  CallState call = begin_img2img_input(images, ready);
  if (!call.done) begin_img2img_latent(call, encode_input(call.image));
  return call;
}

StreamDiffusion::CallState StreamDiffusion::begin_img2img_input(const torch::Tensor& images, InputReady ready,
                                                                 bool defer_sleep) {
  require_prepared("img2img");
  torch::NoGradGuard no_grad;
  refresh_prompts();
  CallState call;
  call.start = Clock::now();
  const int64_t F = config_.frame_buffer_size;
  Tensor x = images.dim() == 3 ? images.unsqueeze(0) : images;
  if (x.dim() != 4 || x.size(0) != F || x.size(1) != 3 || x.size(2) != config_.height ||
      x.size(3) != config_.width || !x.is_floating_point())
    throw InvalidArgument("img2img: input has shape " + shape_str(images.sizes()) + " and dtype " +
                          c10::toString(images.scalar_type()) + "; expected a float tensor [" + std::to_string(F) +
                          ", 3, " + std::to_string(config_.height) + ", " + std::to_string(config_.width) +
                          "] in [-1, 1] (frame_buffer_size frames at the stream's size)");
  check_call_inputs("img2img");
  // One NaN frame would stay in the stream for good where a state carries it over (RCFG self with one step, latent
  // feedback): refused. Host frames only: on a device the check would wait for the frame's kernels.
  if (x.is_cpu() && !torch::isfinite(x).all().item<bool>())
    throw InvalidArgument("img2img: the input has NaN or infinite values (expected [-1, 1])");
  const Tensor given = x;
  bool complete = ready == InputReady::complete;
  if (x.is_cpu() && device_.is_cuda() && compares_inputs()) {
    // A host frame is complete by nature: sent up on a side stream, the filter's and the deep cache's cosine wait
    // for that upload only, not for the previous frames' kernels queued on this thread's stream.
    x = complete_on_side_stream(device_, [&] { return to_device_nonblocking(given, device_, dtype_); });
    complete = true;
  } else {
    x = to_device_nonblocking(x, device_, dtype_);
    // A copy or conversion just queued on this thread's stream makes even a complete input a queued one.
    complete = complete && x.is_same(given);
  }
  ++stats_.calls;
  advance_transitions();
  fold_call_timers();  // before the filter: its sleep on a skip is the EMA

  if (filter_) {
    last_decision_ = filter_->check(x, complete);
    // Nothing to answer a skip with before the first output (the first call failed, say): the frame is processed.
    if (!last_decision_.process && !prev_output_.defined()) last_decision_.process = true;
    if (!last_decision_.process) {
      ++stats_.skipped;
      if (config_.similarity_filter.sleep_on_skip && stats_.ema_call_s > 0) {
        if (defer_sleep)
          call.skip_sleep_s = stats_.ema_call_s;
        else
          std::this_thread::sleep_for(std::chrono::duration<double>(stats_.ema_call_s));
      }
      call.done = true;
      call.output = prev_output_;
      return call;
    }
    if (last_decision_.forced) ++stats_.forced;
  }
  call.timer = start_call_timer();

  if (config_.deep_cache_every > 1) {
    // The similarity filter's measure against the input of the last full UNet call: a cut or a fast move refreshes
    // the deep features at once instead of carrying the old picture's for up to K - 1 frames.
    const bool full_next = deep_phase_ == 0;
    if (!full_next && deep_ref_input_.defined() && deep_ref_input_.sizes() == x.sizes()) {
      double cos = 1.0;
      run_on_side_stream(device_, /*after_current=*/!(complete && deep_ref_complete_),
                         [&] { cos = SimilarityFilter::cosine_similarity(x, deep_ref_input_); });
      if (cos < config_.deep_cache_min_similarity) deep_force_full_ = true;
    }
    if (full_next || deep_force_full_) {
      // A copy: the caller may reuse its buffer. Made on a side stream for a complete input (so it is complete too),
      // else in order on this thread's stream, without a wait.
      if (complete)
        run_on_side_stream(device_, /*after_current=*/false, [&] { deep_ref_input_ = x.clone(); });
      else
        deep_ref_input_ = x.clone();
      deep_ref_complete_ = complete;
    }
  }
  call.image = x;
  return call;
}

torch::Tensor StreamDiffusion::encode_input(const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  // Step 3: z = Enc(x) · scaling_factor (the model applies the factor).
  auto t0 = Clock::now();
  const Tensor z = use_graphs() && models_->deterministic_encode()
                       ? graphed("encode", {x}, [this](const std::vector<Tensor>& in) {
                           return std::vector<Tensor>{models_->encode_image(in[0], *rng_)};
                         })[0]
                       : models_->encode_image(x, *rng_);
  sync_device();
  stats_.image_encode_s += seconds_since(t0);
  return z;
}

void StreamDiffusion::begin_img2img_latent(CallState& call, const torch::Tensor& z) {
  torch::NoGradGuard no_grad;
  call.image = Tensor();
  const int64_t F = config_.frame_buffer_size;
  trace("image_latent", z);

  // Latent feedback (StreamConfig::latent_feedback A): x_in = (1 − A)·z + A·x0_prev, the previous call's output
  // latent — a cheap temporal smoothing against flicker.
  Tensor x_in = z;
  if (config_.latent_feedback > 0 && prev_output_latent_.defined() && prev_output_latent_.sizes() == z.sizes()) {
    const double A = config_.latent_feedback;
    x_in = (1.0 - A) * z + A * prev_output_latent_;
    trace("latent_feedback_in", x_in);
  }

  // Step 4: x_t = α_0·z + β_0·init_noise — per-frame noise rows [0, F); the original uses row 0 for every frame.
  // (Rows [0, F) of α/β all hold t_0, so row 0 broadcasts.)
  const Tensor noise = head_rows() ? init_noise_[0] : init_noise_.slice(0, 0, F);
  call.x_t = add_noise(x_in, noise, alpha_[0], beta_[0]);
  begin_unet_rows(call);
}

StreamDiffusion::CallState StreamDiffusion::begin_txt2img() {
  require_prepared("txt2img");
  check_call_inputs("txt2img");
  torch::NoGradGuard no_grad;
  refresh_prompts();
  CallState call;
  call.start = Clock::now();
  ++stats_.calls;
  advance_transitions();
  fold_call_timers();
  call.timer = start_call_timer();
  // Drawn on the host (the reference's CPU generator), sent up without waiting for the frames queued before.
  call.x_t = to_device_nonblocking(
      rng_->randn({config_.frame_buffer_size, models_->latent_channels(), latent_height(), latent_width()},
                  "txt2img: latent"),
      device_, dtype_);
  begin_unet_rows(call);
  return call;
}

torch::Tensor StreamDiffusion::txt2img_one_shot() {
  require_prepared("txt2img_one_shot");
  // For the ControlNets' guidance range (and which of them need a control image): each image is a one-step generation.
  one_shot_call_ = true;
  struct Reset {
    bool& flag;
    ~Reset() { flag = false; }
  } reset{one_shot_call_};
  check_call_inputs("txt2img_one_shot");
  torch::NoGradGuard no_grad;
  refresh_prompts();
  const auto start = Clock::now();
  const int64_t B = batch_size();
  if (t_sub_.size(0) != B)
    throw InvalidArgument("txt2img_one_shot: the batch has " + std::to_string(B) + " rows but there are " +
                          std::to_string(t_sub_.size(0)) +
                          " timesteps; in sequential mode len(t_index_list) must equal frame_buffer_size");
  ++stats_.calls;
  advance_transitions();
  fold_call_timers();
  std::shared_ptr<CallTimer> timer = start_call_timer();
  begin_stream_call();
  const Tensor x = to_device_nonblocking(
      rng_->randn({B, models_->latent_channels(), latent_height(), latent_width()}, "txt2img_one_shot"), device_,
      dtype_);
  trace("x_t_latent_in", x);
  Tensor eps = call_unet(x, t_sub_, t_sub_host_, cond_context_.repeat({B, 1, 1}), cond_added_rows(B));
  // A v-predicting UNet: ε = sqrt(ᾱ)·v + sqrt(1−ᾱ)·x_t, as in after_unet().
  if (scheduler_.config().prediction_type == "v_prediction") eps = alpha_ * eps + beta_ * x;
  const Tensor x0 = (x - beta_ * eps) / alpha_;
  trace("x_0_pred_out", x0);
  Tensor out = decode(x0);
  prev_output_ = out;
  ++stats_.processed;
  const double dt = seconds_since(start);
  stats_.total_s += dt;
  end_call_timer(std::move(timer), dt);
  return out;
}

void StreamDiffusion::begin_unet_rows(CallState& call) {
  trace("x_t_latent_in", call.x_t);
  begin_stream_call();
  if (!config_.use_denoising_batch) return;  // sequential mode: its UNet calls happen in complete_call
  const int64_t n = denoising_steps(), F = config_.frame_buffer_size, B = batch_size();
  call.x = call.x_t;
  if (n > 1) {
    // Step 5: the stream batch [new frames; buffer] (row group j at t_j), and the RCFG state shifted by F rows.
    call.x = torch::cat({call.x_t, x_t_latent_buffer_}, 0);
    call.stock_noise_before = stock_noise_;
    stock_noise_ = torch::cat({init_noise_.slice(0, 0, F), stock_noise_.slice(0, 0, B - F)}, 0);
  }
  std::tie(call.x_in, call.t_in) = unet_layout(call.x, t_sub_);
  call.t_in_host = unet_rows(t_sub_host_);
}

torch::Tensor StreamDiffusion::finish_unet(CallState& call, const torch::Tensor& pred) {
  const int64_t n = denoising_steps(), F = config_.frame_buffer_size, B = batch_size();
  const Tensor x0 = after_unet(call.x, call.x_in, pred, -1);
  Tensor out = x0;  // n == 1: all F rows, no buffer
  if (n > 1) {
    // Step 8: output the last F rows; re-noise the others to their next timestep with the fixed noise rows.
    out = x0.slice(0, B - F);
    const Tensor x0_head = x0.slice(0, 0, B - F);
    if (config_.do_add_noise)
      x_t_latent_buffer_ = alpha_.slice(0, F) * x0_head + beta_.slice(0, F) * init_noise_.slice(0, F);
    else
      x_t_latent_buffer_ = alpha_.slice(0, F) * x0_head;
  }
  trace("x_0_pred_out", out);
  return out;
}

torch::Tensor StreamDiffusion::finish_call(CallState& call, const torch::Tensor& latent, const torch::Tensor& image) {
  // The output latent of a real frame (past the n − 1 warm-up calls of the denoising batch) feeds latent feedback.
  ++calls_since_reset_;
  const int64_t warmup = config_.use_denoising_batch ? denoising_steps() - 1 : 0;
  prev_output_latent_ = calls_since_reset_ > warmup ? latent : Tensor();
  prev_output_ = image;
  ++stats_.processed;
  const double dt = seconds_since(call.start);
  stats_.total_s += dt;
  end_call_timer(std::move(call.timer), dt);
  return image;
}

torch::Tensor StreamDiffusion::complete_call(CallState& call) {
  Tensor latent;
  if (config_.use_denoising_batch) {
    Tensor pred;
    try {
      pred = call_unet(call.x_in, call.t_in, call.t_in_host, prompt_embeds_, added_);
    } catch (...) {
      // The UNet failed (out of memory, say): the RCFG state goes back to where the call found it, so that the rows
      // of the next call still line up with the buffer, which did not move.
      if (call.stock_noise_before.defined()) stock_noise_ = call.stock_noise_before;
      throw;
    }
    latent = finish_unet(call, pred);
  } else {
    latent = predict_x0_sequential(call.x_t);
    trace("x_0_pred_out", latent);
  }
  return finish_call(call, latent, decode(latent));
}

void StreamDiffusion::record_shared_unet(const CallState& call, const torch::Tensor& pred, double seconds) {
  const std::string k = "unet" + std::to_string(unet_call_index_++);
  trace(k + ".sample", call.x_in);
  trace(k + ".timestep", call.t_in);
  stats_.unet_s += seconds;
  ++stats_.unet_calls;
  ++stats_.batched_calls;
  stats_.unet_rows += call.x_in.size(0);
  trace(k + ".out", pred);
}

namespace {
// Whether control_residuals runs the ControlNet over n steps: not at scale 0, nor with a range that keeps none of
// them (it adds nothing then: the stream's UNet call is the plain one, and it needs no control image).
bool runs_over(const ControlNetUnit& u, int64_t n) {
  return u.scale != 0.0 && control_guidance_keeps_any(u.guidance_start, u.guidance_end, n);
}

void check_controlnet_index(size_t index, size_t count) {
  if (index >= count)
    throw InvalidArgument("ControlNet index " + std::to_string(index) + " out of range (" + std::to_string(count) +
                          " ControlNets)");
}
}  // namespace

bool StreamDiffusion::controlnet_runs(size_t index) const {
  check_controlnet_index(index, controlnets_.size());
  return runs_over(controlnets_[index], denoising_steps());
}

std::string StreamDiffusion::batch_blocker() const {
  if (!prepared_) return "not prepared";
  if (!config_.use_denoising_batch) return "sequential mode (use_denoising_batch false) makes one UNet call per step";
  const auto n = static_cast<int64_t>(sub_timesteps_.size());
  if (std::any_of(controlnets_.begin(), controlnets_.end(), [&](const ControlNetUnit& u) { return runs_over(u, n); }))
    return "ControlNets run on the stream's own UNet batch";
  if (config_.deep_cache_every > 1) return "the deep-feature cache (deep_cache_every > 1) keeps per-stream UNet features";
  return "";
}

torch::Tensor StreamDiffusion::decode(const torch::Tensor& latent) {
  const auto t0 = Clock::now();
  Tensor img = use_graphs() ? graphed("decode", {latent}, [this](const std::vector<Tensor>& in) {
                                return std::vector<Tensor>{models_->decode_latent(in[0])};
                              })[0]
                            : models_->decode_latent(latent);
  sync_device();
  stats_.decode_s += seconds_since(t0);
  return img;
}

torch::Tensor StreamDiffusion::call_unet(const torch::Tensor& sample, const torch::Tensor& t,
                                         const torch::Tensor& t_host, const torch::Tensor& ehs,
                                         const AddedConditioning& added) {
  if (sample.size(0) != t.size(0) || sample.size(0) != ehs.size(0) ||
      (added.defined() && added.text_embeds.size(0) != ehs.size(0)))
    throw Error("internal: UNet batch rows disagree: sample " + shape_str(sample.sizes()) + ", timesteps " +
                shape_str(t.sizes()) + ", text " + shape_str(ehs.sizes()));
  const int64_t index = unet_call_index_++;
  const std::string k = "unet" + std::to_string(index);
  trace(k + ".sample", sample);
  trace(k + ".timestep", t);
  const ControlResiduals control = control_residuals(index, sample, t, t_host, ehs, added);
  if (control.defined() && trace_) {
    for (size_t j = 0; j < control.down.size(); ++j) trace(k + ".controlnet_down" + std::to_string(j), control.down[j]);
    trace(k + ".controlnet_mid", control.mid);
  }
  const auto t0 = Clock::now();
  Tensor out;
  if (config_.deep_cache_every > 1) {
    UNetFeatureCache& cache = deep_cache_[index];
    cache.reuse = deep_reuse_now_ && cache.deep.defined() && cache.deep.size(0) == sample.size(0);
    if (cache.reuse) ++stats_.unet_shallow_calls;
    out = models_->unet_cached(sample, t, ehs, added, control, cache);
  } else if (use_graphs()) {
    // Inputs: sample [R, C, h, w], t [R], text rows [R, 77, D], SDXL's added conditioning (undefined for SD) and, with
    // ControlNets, their summed residuals (mid, then down; computed before, graphed on their own).
    std::vector<Tensor> in{sample, t, ehs, added.text_embeds, added.time_ids};
    if (control.defined()) {
      in.push_back(control.mid);
      in.insert(in.end(), control.down.begin(), control.down.end());
    }
    out = graphed(control.defined() ? "unet_control" : "unet", in, [this](const std::vector<Tensor>& in) {
      AddedConditioning a;
      a.text_embeds = in[3];
      a.time_ids = in[4];
      ControlResiduals c;
      if (in.size() > 5) {
        c.mid = in[5];
        c.down.assign(in.begin() + 6, in.end());
      }
      return std::vector<Tensor>{models_->unet(in[0], in[1], in[2], a, c)};
    })[0];
  } else {
    out = models_->unet(sample, t, ehs, added, control);
  }
  sync_device();
  stats_.unet_s += seconds_since(t0);
  ++stats_.unet_calls;
  stats_.unet_rows += sample.size(0);
  trace(k + ".out", out);
  return out;
}

void StreamDiffusion::begin_stream_call() {
  unet_call_index_ = 0;
  // Deep cache: phase 0 (or a forced refresh) runs the full UNet and stores its deep features, phases 1 .. K-1 reuse.
  deep_reuse_now_ = false;
  if (config_.deep_cache_every > 1) {
    if (deep_force_full_ && deep_phase_ != 0) {
      ++stats_.deep_cache_forced;
      deep_phase_ = 0;
    }
    deep_reuse_now_ = deep_phase_ != 0;
    deep_phase_ = (deep_phase_ + 1) % config_.deep_cache_every;
  }
  deep_force_full_ = false;
  // Phase 0 computes the residuals, phases 1 .. every-1 reuse them.
  if (control_phase_ == 0) control_cache_.clear();
  control_phase_ = (control_phase_ + 1) % controlnet_every_;
}

void StreamDiffusion::check_call_inputs(const char* what) const {
  const auto n = one_shot_call_ ? int64_t{1} : static_cast<int64_t>(sub_timesteps_.size());
  for (size_t i = 0; i < controlnets_.size(); ++i)
    if (runs_over(controlnets_[i], n) && !control_images_[i].defined())
      throw InvalidArgument(std::string(what) + ": ControlNet " + std::to_string(i) + " (" +
                            controlnets_[i].net->name() + ") has no control image: set one before the next frame");
}

ControlResiduals StreamDiffusion::control_residuals(int64_t index, const torch::Tensor& sample,
                                                    const torch::Tensor& t, const torch::Tensor& t_host,
                                                    const torch::Tensor& ehs, const AddedConditioning& added) {
  if (controlnets_.empty()) return {};
  // Reuse (set_controlnet_every): within a phase every UNet call of a stream call keeps the residuals computed on
  // the phase's first call, as long as its batch has the same rows.
  if (auto it = control_cache_.find(index); it != control_cache_.end()) {
    if (!it->second.defined() || it->second.down[0].size(0) == sample.size(0)) {
      ++stats_.controlnet_reused;
      return it->second;
    }
  }
  check_call_inputs("UNet call");  // checked before the call too (a control image cleared since is still refused)
  const auto t0 = Clock::now();
  // A ControlNet conditions on the text alone: diffusers appends an IP-Adapter's image tokens inside the UNet
  // (encoder_hid_proj), and its ControlNet pipelines hand the ControlNet the prompt embeddings without them.
  Tensor text = ehs;  // [R, 77 (+ T), D]
  if (const IPAdapterModels* ip = models_->ip_adapter())  // as build_prompt_layout appends them
    text = ehs.narrow(1, 0, ehs.size(1) - ip->adapter->num_tokens());
  // ControlNet i's residuals (times its scale) for these UNet rows. On CUDA replayed per shape like the UNet (a
  // ControlNet launches about as many kernels). The scale is applied after the graph, so a live scale is no new graph:
  // x * 1 is exact, and (x * 1) * s is the eager x * s bit for bit (a net with global_pool_conditions averages before
  // the scale here, after it eagerly: rounding). The graphs read the ControlNet's weights: set_controlnets drops them.
  const auto controlnet_rows = [this](size_t i, const Tensor& x, const Tensor& ts, const Tensor& txt,
                                      const AddedConditioning& add) {
    const ControlNetUnit& u = controlnets_[i];
    if (!use_graphs()) return u.net->residuals(x, ts, txt, add, control_images_[i], u.scale);
    const auto out = graphed("controlnet" + std::to_string(i),
                             {x, ts, txt, add.text_embeds, add.time_ids, control_images_[i]},
                             [net = u.net](const std::vector<Tensor>& in) {
                               AddedConditioning a;
                               a.text_embeds = in[3];
                               a.time_ids = in[4];
                               const ControlResiduals r = net->residuals(in[0], in[1], in[2], a, in[5], 1.0);
                               std::vector<Tensor> v{r.mid};
                               v.insert(v.end(), r.down.begin(), r.down.end());
                               return v;
                             });
    ControlResiduals r;
    r.mid = u.scale == 1.0 ? out[0] : out[0] * u.scale;
    for (size_t k = 1; k < out.size(); ++k) r.down.push_back(u.scale == 1.0 ? out[k] : out[k] * u.scale);
    return r;
  };
  ControlResiduals sum;
  for (size_t i = 0; i < controlnets_.size(); ++i) {
    const ControlNetUnit& u = controlnets_[i];
    if (u.scale == 0.0) continue;
    // control_guidance_start / _end: the timesteps of the steps that keep this ControlNet. Every batch layout's rows
    // carry their step's timestep (RCFG's uncond rows too), so a row keeps it where its timestep is one of them. A
    // one-shot image is a whole one-step generation: step 0 of 1.
    const int64_t n = one_shot_call_ ? 1 : static_cast<int64_t>(sub_timesteps_.size());
    std::vector<int64_t> kept, dropped;
    for (int64_t k = 0; k < static_cast<int64_t>(sub_timesteps_.size()); ++k)
      (u.keeps(one_shot_call_ ? 0 : k, n) ? kept : dropped).push_back(sub_timesteps_[k]);
    if (kept.empty()) continue;  // no step keeps it: as at scale 0
    for (int64_t d : dropped)
      if (std::find(kept.begin(), kept.end(), d) != kept.end())
        throw InvalidArgument("ControlNet " + std::to_string(i) + ": two steps of t_index_list share timestep " +
                              std::to_string(d) + " and only one is in the guidance range " +
                              std::to_string(u.guidance_start) + ".." + std::to_string(u.guidance_end) +
                              ": give t_index_list distinct entries, or a range that keeps both");
    // With a range the ControlNet runs on the kept rows alone (a range over half the steps costs half) and the other
    // rows get zeros; rows are independent in the ControlNet. The rows are read from the host's copy of the timesteps
    // and their index is uploaded once per row list, without a host wait: no host synchronisation on CUDA.
    const int64_t R = sample.size(0);
    std::vector<int64_t> rows;
    if (!dropped.empty()) {
      if (t_host.dim() != 1 || t_host.size(0) != R || !t_host.device().is_cpu())
        throw Error("internal: host timesteps " + shape_str(t_host.sizes()) + " on " + t_host.device().str() +
                    " for " + std::to_string(R) + " UNet rows");
      const Tensor steps = t_host.to(torch::kLong).contiguous();  // [R], on the CPU
      for (int64_t row = 0; row < R; ++row)
        if (std::find(kept.begin(), kept.end(), steps.data_ptr<int64_t>()[row]) != kept.end()) rows.push_back(row);
      if (rows.empty()) continue;  // this call has only rows out of range (a sequential call of one step)
    }
    ControlResiduals r;
    if (rows.empty() || static_cast<int64_t>(rows.size()) == R) {
      r = controlnet_rows(i, sample, t, text, added);
    } else {
      const Tensor& idx = row_index(rows);
      AddedConditioning a;
      if (added.defined()) a = {added.text_embeds.index_select(0, idx), added.time_ids.index_select(0, idx)};
      const ControlResiduals part = controlnet_rows(i, sample.index_select(0, idx), t.index_select(0, idx),
                                                    text.index_select(0, idx), a);
      const auto spread = [&](const Tensor& x) {  // [k, ...] -> [R, ...], zeros in the rows out of range
        std::vector<int64_t> shape = x.sizes().vec();
        shape[0] = R;
        return torch::zeros(shape, x.options()).index_copy_(0, idx, x);
      };
      for (const Tensor& d : part.down) r.down.push_back(spread(d));
      r.mid = spread(part.mid);
    }
    sum += r;
    ++stats_.controlnet_calls;
  }
  sync_device();
  stats_.controlnet_s += seconds_since(t0);
  if (controlnet_every_ > 1) control_cache_[index] = sum;
  return sum;
}

const torch::Tensor& StreamDiffusion::row_index(const std::vector<int64_t>& rows) {
  Tensor& idx = row_index_[rows];
  // Staged in pinned memory and copied without a host wait: the first frame of a new row list is inside a frame too.
  if (!idx.defined())
    idx = to_device_nonblocking(torch::tensor(rows, torch::TensorOptions().dtype(torch::kLong)), device_, torch::kLong);
  return idx;
}

bool ControlNetUnit::keeps(int64_t i, int64_t n) const {
  return control_guidance_keeps(guidance_start, guidance_end, i, n);
}

namespace {
void check_control_guidance(double start, double end, const std::string& what) {
  if (!valid_control_guidance(start, end))
    throw InvalidArgument(what + ": control guidance start " + std::to_string(start) + " and end " +
                          std::to_string(end) + " must satisfy " + kControlGuidanceRule +
                          " (the share of the steps it conditions, as diffusers' control_guidance_start / "
                          "control_guidance_end)");
}
}  // namespace

void StreamDiffusion::set_controlnets(std::vector<ControlNetUnit> units) {
  for (size_t i = 0; i < units.size(); ++i) {
    if (!units[i].net) throw InvalidArgument("set_controlnets: ControlNet " + std::to_string(i) + " is null");
    if (!std::isfinite(units[i].scale))
      throw InvalidArgument("set_controlnets: ControlNet " + std::to_string(i) + " has a non-finite scale");
    check_control_guidance(units[i].guidance_start, units[i].guidance_end,
                           "set_controlnets: ControlNet " + std::to_string(i));
    if (units[i].net->image_scale() != vae_scale_)
      throw InvalidArgument("ControlNet " + units[i].net->path() + " embeds its control image down " +
                            std::to_string(units[i].net->image_scale()) + "x but the model's latents are " +
                            std::to_string(vae_scale_) + "x smaller than the image");
  }
  // The ControlNet graphs read the nets' weights: other nets (not the same list again, as the image API sets it per
  // request) drop the stream's graphs, before the old nets go. The new cache has room for two graphs a net (all rows,
  // and a guidance range's rows) beside the stream's own.
  bool same = units.size() == controlnets_.size();
  for (size_t i = 0; same && i < units.size(); ++i) same = units[i].net == controlnets_[i].net;
  if (!same) graphs_ = std::make_unique<GraphCache>(8 + 2 * units.size());
  controlnets_ = std::move(units);
  control_images_.assign(controlnets_.size(), Tensor());
  control_cache_.clear();
  control_phase_ = 0;
  reset_deep_cache();
}

void StreamDiffusion::set_controlnet_scale(size_t index, double scale) {
  check_controlnet_index(index, controlnets_.size());
  if (!std::isfinite(scale)) throw InvalidArgument("ControlNet scale must be finite");
  controlnets_[index].scale = scale;
  control_cache_.clear();
  reset_deep_cache();  // the deep features hold the old scale's residuals
}

void StreamDiffusion::set_controlnet_guidance(size_t index, double start, double end) {
  check_controlnet_index(index, controlnets_.size());
  check_control_guidance(start, end, "ControlNet " + std::to_string(index));
  controlnets_[index].guidance_start = start;
  controlnets_[index].guidance_end = end;
  control_cache_.clear();
  reset_deep_cache();  // the deep features hold the old range's residuals
}

void StreamDiffusion::set_control_image(size_t index, const torch::Tensor& image) {
  check_controlnet_index(index, controlnets_.size());
  torch::NoGradGuard no_grad;
  Tensor img;
  if (image.scalar_type() == torch::kUInt8) {
    if (image.dim() != 3 || image.size(2) != 3)
      throw InvalidArgument("control image: a uint8 image must be [H, W, 3] RGB, got " + shape_str(image.sizes()));
    img = image.permute({2, 0, 1}).unsqueeze(0).to(torch::kFloat32) / 255.0;
  } else {
    img = image.dim() == 3 ? image.unsqueeze(0) : image;
    if (img.dim() != 4 || img.size(0) != 1 || img.size(1) != 3)
      throw InvalidArgument("control image: expected [3, H, W] or [1, 3, H, W] in [0, 1], got " +
                            shape_str(image.sizes()));
    img = img.to(torch::kFloat32);
  }
  if (img.size(2) != config_.height || img.size(3) != config_.width) {
    namespace F = torch::nn::functional;
    img = F::interpolate(img.to(torch::kCPU), F::InterpolateFuncOptions()
                                                  .size(std::vector<int64_t>{config_.height, config_.width})
                                                  .mode(torch::kBilinear)
                                                  .align_corners(false)
                                                  .antialias(true))
              .clamp(0, 1);
  }
  control_images_[index] = img.to(device_, dtype_).contiguous();
}

const torch::Tensor& StreamDiffusion::control_image(size_t index) const {
  check_controlnet_index(index, control_images_.size());
  return control_images_[index];
}

void StreamDiffusion::reset_deep_cache() {
  deep_cache_.clear();
  deep_phase_ = 0;
  deep_ref_input_ = torch::Tensor();
}

void StreamDiffusion::set_deep_cache(int64_t every, double min_similarity) {
  const StreamConfig old = config_;
  config_.deep_cache_every = every;
  config_.deep_cache_min_similarity = min_similarity;
  try {
    validate_config();
  } catch (...) {
    config_ = old;
    throw;
  }
  reset_deep_cache();
}

void StreamDiffusion::set_controlnet_every(int64_t n) {
  if (n < 1) throw InvalidArgument("controlnet_every must be >= 1, got " + std::to_string(n));
  controlnet_every_ = n;
  control_cache_.clear();
  control_phase_ = 0;
  reset_deep_cache();
}

torch::Tensor StreamDiffusion::predict_x0_sequential(const torch::Tensor& x_t_latent) {
  const int64_t n = denoising_steps(), F = config_.frame_buffer_size;
  // Sequential mode (spec §3.8), including the original's quirk of overwriting init_noise with the input latent.
  init_noise_ = x_t_latent;
  Tensor x = x_t_latent, x0;
  for (int64_t idx = 0; idx < n; ++idx) {
    const Tensor t = t_sub_.slice(0, idx, idx + 1).repeat({F});
    x0 = unet_step(x, t, t_sub_host_.slice(0, idx, idx + 1).repeat({F}), idx);
    if (idx < n - 1) {
      if (config_.do_add_noise) {
        const Tensor noise = rng_->randn(x0.sizes(), "sequential step noise").to(x0.options());
        x = alpha_[idx + 1] * x0 + beta_[idx + 1] * noise;
      } else {
        x = alpha_[idx + 1] * x0;
      }
    }
  }
  return x0;
}

std::pair<torch::Tensor, torch::Tensor> StreamDiffusion::unet_layout(const torch::Tensor& x,
                                                                     const torch::Tensor& t_list) const {
  return {unet_rows(x), unet_rows(t_list)};
}

torch::Tensor StreamDiffusion::unet_rows(const torch::Tensor& rows) const {
  const int64_t F = config_.frame_buffer_size;
  const bool guided = guidance_active();
  const CfgType cfg = config_.cfg_type;
  // UNet batch layouts (spec §4.1).
  if (guided && cfg == CfgType::Initialize) return torch::cat({rows.slice(0, 0, F), rows}, 0);
  if (guided && cfg == CfgType::Full) return torch::cat({rows, rows}, 0);
  return rows;
}

torch::Tensor StreamDiffusion::unet_step(const torch::Tensor& x, const torch::Tensor& t_list,
                                         const torch::Tensor& t_host, int64_t idx) {
  const auto [x_in, t_in] = unet_layout(x, t_list);
  return after_unet(x, x_in, call_unet(x_in, t_in, unet_rows(t_host), prompt_embeds_, added_), idx);
}

torch::Tensor StreamDiffusion::after_unet(const torch::Tensor& x, const torch::Tensor& x_in, torch::Tensor pred,
                                          int64_t idx) {
  const int64_t F = config_.frame_buffer_size;
  const bool guided = guidance_active();
  const CfgType cfg = config_.cfg_type;
  if (scheduler_.config().prediction_type == "v_prediction") {
    // A v-predicting UNet (SD 2.x 768-v): ε = sqrt(ᾱ)·v + sqrt(1−ᾱ)·x_t per UNet row, so guidance, RCFG and the
    // LCM step below stay the ε formulas of the original (guidance is linear, so guiding v or ε is the same).
    auto rows = [&](const Tensor& c) -> Tensor {
      if (idx >= 0) return c[idx];
      if (guided && cfg == CfgType::Initialize) return torch::cat({c.slice(0, 0, F), c}, 0);
      if (guided && cfg == CfgType::Full) return torch::cat({c, c}, 0);
      return c;
    };
    pred = rows(alpha_) * pred + rows(beta_) * x_in;
  }

  Tensor eps_c, eps_u;
  if (guided && cfg == CfgType::Initialize) {
    eps_c = pred.slice(0, F);
    // §4.5: the negative prediction of the newest frame(s) replaces their virtual residual noise.
    stock_noise_ = torch::cat({pred.slice(0, 0, F), stock_noise_.slice(0, F)}, 0);
  } else if (guided && cfg == CfgType::Full) {
    const auto halves = pred.chunk(2, 0);
    eps_u = halves[0];
    eps_c = halves[1];
  } else {
    eps_c = pred;
  }
  if (guided && (cfg == CfgType::Self || cfg == CfgType::Initialize)) eps_u = stock_noise_ * delta_;
  // ε_cfg = ε_u + γ·(ε_c − ε_u)
  const Tensor eps = guided ? eps_u + guidance_scale_ * (eps_c - eps_u) : eps_c;

  // Row-wise coefficients (batch) or those of step idx (sequential).
  const Tensor a = idx < 0 ? alpha_ : alpha_[idx];
  const Tensor b = idx < 0 ? beta_ : beta_[idx];
  const Tensor cs = idx < 0 ? c_skip_ : c_skip_[idx];
  const Tensor co = idx < 0 ? c_out_ : c_out_[idx];
  const Tensor x0 = denoise(x, eps, a, b, cs, co);

  // RCFG state update (§4.4), denoising batch only; runs for self/initialize whatever γ is (as the original).
  if (idx < 0 && (cfg == CfgType::Self || cfg == CfgType::Initialize)) {
    const int64_t R = head_rows() ? 1 : F;
    const Tensor scaled_noise = b * stock_noise_;
    Tensor delta_x = denoise(scaled_noise, eps, a, b, cs, co);
    delta_x = next_rows_or_one(alpha_, R) * delta_x;
    delta_x = delta_x / next_rows_or_one(beta_, R);
    stock_noise_ = roll_rows(init_noise_, R) + delta_x;
  }
  return x0;
}

}  // namespace sd
