#pragma once
// Live control of a running stream: one command per line (stdin, a FIFO or a Unix socket, see control_channel.h).
//
//   prompt <text>            new prompt (re-encoded; the latent buffer is kept)
//   negative <text>          new negative prompt (used when guidance is active)
//   guidance <g>             guidance scale γ (float)
//   delta <d>                RCFG δ (float)
//   t_index_list 32,45       denoising steps (indices into the LCM timesteps); a new length restarts the stream
//   seed <n>                 reseeds the fixed noise (init_noise); morphs with a transition
//   prompt_list <list>       weighted prompt blend: 'a cat:1 | a dog:0.5' (weight after the item's last ':', default
//                            1) or JSON [["a cat", 1], ["a dog", 0.5]]; only new texts are encoded; morphs with a
//                            transition
//   seed_list <list>         weighted seed blend of init_noise (variance-preserving): '1:0.7, 2:0.3' or JSON
//                            [[1, 0.7], [2, 0.3]]; morphs with a transition
//   transition <t>           how later prompt / seed changes morph: seconds ('2', '2.5s'), frames ('30f'), 0 = at once
//   prompt_blend linear|slerp  how a prompt list (and a transition) blends the embeddings
//   latent_feedback <a>      img2img input latent = (1 - a)·encoded frame + a·previous output latent, a in [0, 1]
//   filter on|off            stochastic similarity filter
//   filter_threshold <x>     similarity threshold η in (0, 1]
//   lora <name> <scale>      re-fuses a loaded LoRA (--lora; name = file stem) at a new scale, no reload; the
//                            prompts are re-encoded when it patches the text encoder (the latent buffer is kept)
//   ip_adapter_scale <s>     IP-Adapter scale (--ip-adapter; 0 = off), shared by the model set, from the next frame
//   image_prompt <path>|none new IP-Adapter image prompt (read and encoded once; 'none' = the zero image)
//   controlnet_scale <i> <s> conditioning scale of ControlNet i (0-based, --controlnet order; 0 = off)
//   controlnet_guidance <i> <start> <end>   control_guidance_start / _end of ControlNet i (0 <= start < end <= 1)
//   control_preprocessor <i> <name>   control image source of ControlNet i: canny[:LOW:HIGH] | gray | passthrough |
//                            feedback (frames already pre-processed keep the old one)
//   deep_cache <k> [<s>]     reuse the UNet's deep features for k - 1 of every k frames (1 = off); s: the input
//                            similarity below which a full call is forced (default: unchanged)
//   stats                    print the current status line
//   quit                     stop the stream (as SIGINT)
//   help                     list the commands
// Empty lines and lines starting with '#' are ignored. Everything except stats/quit/help is applied by the model
// thread between two frames.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "pipeline/prompt_blend.h"

namespace sd {

struct ControlCommand {
  enum class Kind {
    Prompt, Negative, Guidance, Delta, TIndexList, Seed, Filter, FilterThreshold, Lora, IpAdapterScale, ImagePrompt,
    ControlnetScale, ControlnetGuidance, ControlPreprocessor, DeepCache, PromptList, SeedList, Transition, PromptBlend,
    LatentFeedback, Stats, Quit, Help
  };
  Kind kind = Kind::Stats;
  std::string text;                  // prompt / negative / lora name / image_prompt path ("" = none) / preprocessor
  double number = 0;                 // guidance / delta / filter_threshold / lora / ip_adapter / controlnet scale /
                                     // deep_cache similarity (NaN = unchanged) / latent_feedback / guidance start
  double end = 1.0;                  // controlnet_guidance: the guidance end
  std::vector<int64_t> t_index_list;
  int64_t index = 0;                 // controlnet_scale / _guidance / control_preprocessor: which ControlNet;
                                     // deep_cache: k
  uint64_t seed = 0;
  bool on = false;                   // filter
  std::vector<WeightedPrompt> prompts;  // prompt_list
  std::vector<WeightedSeed> seeds;      // seed_list
  sd::Transition transition;            // transition
  BlendMethod blend = BlendMethod::Linear;  // prompt_blend
  std::string line;                  // the command as typed (trimmed), for logs and replies
};

// Parses one line. nullopt for an empty or comment line; InvalidArgument with a message that says what was expected
// for anything else that is not a valid command.
std::optional<ControlCommand> parse_control_command(const std::string& line);

// The command summary printed by `help` (one line per command).
const std::string& control_help();

// What a newer command replaces when commands are coalesced (last value wins, StreamRuntime::post_control): the
// kind, plus what the command is about for kinds that address one of several things (a LoRA by name, a ControlNet
// by index), so `controlnet_scale 0 x` does not replace `controlnet_scale 1 y`. New kinds need no entry unless they
// address one of several things too.
std::string control_coalesce_key(const ControlCommand& c);

}  // namespace sd
