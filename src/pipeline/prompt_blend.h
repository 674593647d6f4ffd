#pragma once
// Prompt and seed blending with timed transitions (the stream's live "morph" controls).
//
// Prompt blend: a weighted list of prompts [(text_i, w_i)], each encoded once (StreamDiffusion caches the embeddings
// per text and encodes only texts new to the list). Weights are normalised, ŵ_i = w_i / Σ w_j (w_i >= 0, Σ > 0);
// entries with weight 0 are left out, so one remaining entry is that prompt's embedding bit for bit.
//   linear: e = Σ ŵ_i·e_i
//   slerp:  spherical interpolation per token row (along the feature axis, as the Daydream/livepeer fork):
//           slerp(a, b, t) = sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b, θ = angle between the rows (linear where
//           θ < 1e-4); for n > 2 prompts folded left in list order: e ← e_1, W ← ŵ_1; for i >= 2:
//           W ← W + ŵ_i, e ← slerp(e, e_i, ŵ_i / W).
//   SDXL's pooled embedding is blended the same way.
// Seed blend (variance-preserving): init_noise = Σ ŵ_i·N_i / sqrt(Σ ŵ_i²), N_i the stream's init_noise draw for seed
// i (the first draw after seeding, as a single seed), so the blend of independent standard normals is standard
// normal again. One remaining entry is that seed's noise bit for bit.
//
// Transitions: a change of the list (or of the prompt / seed) with a transition of N frames or T seconds morphs
// the *weights*: over the union of the old effective list and the new one (new entries first, then the old-only
// ones), w(s) = (1 − s)·ŵ_old + s·ŵ_new with s = k/N after k stream calls (or elapsed/T); at s = 1 the effective
// list IS the new list, so the N-th call conditions on exactly the target embedding / noise. A change during a
// transition starts from the effective list of that moment. Linear prompt blends therefore move on the straight
// line between the embeddings, slerp ones on the arc; seed transitions stay standard normal all the way.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

namespace sd {

struct WeightedPrompt {
  std::string text;
  double weight = 1.0;
  bool operator==(const WeightedPrompt& o) const { return text == o.text && weight == o.weight; }
};

struct WeightedSeed {
  uint64_t seed = 0;
  double weight = 1.0;
  bool operator==(const WeightedSeed& o) const { return seed == o.seed && weight == o.weight; }
};

enum class BlendMethod { Linear, Slerp };
// "linear" | "slerp"; anything else throws InvalidArgument.
BlendMethod parse_blend_method(const std::string& name);
std::string blend_method_name(BlendMethod m);

// How a prompt / seed change morphs: over `frames` stream calls, else over `seconds` of wall time, else at once.
struct Transition {
  int64_t frames = 0;
  double seconds = 0;
  bool instant() const { return frames <= 0 && !(seconds > 0); }
  bool operator==(const Transition& o) const { return frames == o.frames && seconds == o.seconds; }
};
// "2" or "2s" or "2.5s" = seconds, "30f" = frames, "0" = at once. InvalidArgument otherwise (negative, not finite,
// fractional frames, more than 10^6 frames or 3600 s).
Transition parse_transition(const std::string& text);
std::string transition_str(const Transition& t);  // "0", "30f", "2.5s"

// Text forms (control commands, CLI options):
//   prompt list: JSON [["a cat", 1], ["a dog", 0.5]] (or [{"text": ..., "weight": ...}]), or "a cat:1 | a dog:0.5"
//                (items separated by '|', the weight after the item's last ':' when that is a number, else 1).
//   seed list:   JSON [[1, 0.7], [2, 0.3]], or "1:0.7, 2:0.3" (comma or space separated, weight default 1).
// InvalidArgument for an empty list, a bad weight (negative, not finite), all weights 0, or more than 16 entries.
std::vector<WeightedPrompt> parse_prompt_list(const std::string& text);
std::vector<WeightedSeed> parse_seed_list(const std::string& text);
// Checks a list given as data (same rules); `what` names it in messages.
void check_prompt_list(const std::vector<WeightedPrompt>& list, const std::string& what = "prompt_list");
void check_seed_list(const std::vector<WeightedSeed>& list, const std::string& what = "seed_list");
std::string prompt_list_str(const std::vector<WeightedPrompt>& list);  // "a cat:1 | a dog:0.5"
std::string seed_list_str(const std::vector<WeightedSeed>& list);      // "1:0.7, 2:0.3"
constexpr size_t kMaxBlendEntries = 16;

// Blends of tensors of one shape with weights >= 0 (normalised here; zero-weight entries skipped).
torch::Tensor blend_embeddings(const std::vector<torch::Tensor>& embeds, const std::vector<double>& weights,
                               BlendMethod method);
torch::Tensor slerp(const torch::Tensor& a, const torch::Tensor& b, double t);  // per row along the last axis
torch::Tensor blend_noise(const std::vector<torch::Tensor>& noise, const std::vector<double>& weights);

// The effective weighted list of a prompt or seed blend over time (see Transitions above).
template <class Key>
class BlendSchedule {
 public:
  using Entry = std::pair<Key, double>;
  using Clock = std::chrono::steady_clock;

  // At once (no transition).
  void reset(std::vector<Entry> list) {
    current_ = std::move(list);
    target_ = current_;
    from_.clear();
    active_ = false;
  }
  // Towards `target` with transition `t` (at once when t.instant()).
  void set(std::vector<Entry> target, const Transition& t, Clock::time_point now = Clock::now()) {
    if (t.instant()) return reset(std::move(target));
    from_ = current_;
    target_ = std::move(target);
    transition_ = t;
    start_ = now;
    frames_ = 0;
    active_ = true;
  }
  // One stream call: advances the transition and updates current(). True when current() changed.
  bool step(Clock::time_point now = Clock::now()) {
    if (!active_) return false;
    ++frames_;
    double s = transition_.frames > 0
                   ? static_cast<double>(frames_) / static_cast<double>(transition_.frames)
                   : std::chrono::duration<double>(now - start_).count() / transition_.seconds;
    if (s >= 1.0) {
      current_ = target_;
      from_.clear();
      active_ = false;
      progress_ = 1.0;
      return true;
    }
    progress_ = s;
    current_ = mix(s);
    return true;
  }
  bool active() const { return active_; }
  double progress() const { return active_ ? progress_ : 1.0; }
  const std::vector<Entry>& current() const { return current_; }
  const std::vector<Entry>& target() const { return target_; }
  // Every key the blend may still need (target, then current).
  std::vector<Key> keys() const {
    std::vector<Key> k;
    for (const auto* list : {&target_, &current_, &from_})
      for (const auto& e : *list)
        if (std::find(k.begin(), k.end(), e.first) == k.end()) k.push_back(e.first);
    return k;
  }

 private:
  static double total(const std::vector<Entry>& l) {
    double t = 0;
    for (const auto& e : l) t += e.second;
    return t;
  }
  std::vector<Entry> mix(double s) const {
    const double tf = total(from_), tt = total(target_);
    std::vector<Entry> out;
    auto add = [&](const Key& k, double w) {
      for (auto& e : out)
        if (e.first == k) {
          e.second += w;
          return;
        }
      out.push_back({k, w});
    };
    for (const auto& e : target_) add(e.first, s * e.second / tt);
    for (const auto& e : from_) add(e.first, (1.0 - s) * e.second / tf);
    return out;
  }

  std::vector<Entry> from_, target_, current_;
  Transition transition_;
  Clock::time_point start_;
  int64_t frames_ = 0;
  double progress_ = 1.0;
  bool active_ = false;
};

}  // namespace sd
