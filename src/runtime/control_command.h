#pragma once
// Live control of a running stream: one command per line (stdin, a FIFO or a Unix socket, see control_channel.h).
//
//   prompt <text>            new prompt (re-encoded; the latent buffer is kept)
//   negative <text>          new negative prompt (used when guidance is active)
//   guidance <g>             guidance scale γ (float)
//   delta <d>                RCFG δ (float)
//   t_index_list 32,45       denoising steps (indices into the LCM timesteps); a new length restarts the stream
//   seed <n>                 reseeds the fixed noise (init_noise)
//   filter on|off            stochastic similarity filter
//   filter_threshold <x>     similarity threshold η in (0, 1]
//   lora <name> <scale>      re-fuses a loaded LoRA (--lora; name = file stem) at a new scale, no reload; the
//                            prompts are re-encoded when it patches the text encoder (the latent buffer is kept)
//   ip_adapter_scale <s>     IP-Adapter scale (--ip-adapter; 0 = off), shared by the model set, from the next frame
//   image_prompt <path>|none new IP-Adapter image prompt (read and encoded once; 'none' = the zero image)
//   controlnet_scale <i> <s> conditioning scale of ControlNet i (0-based, --controlnet order; 0 = off)
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

namespace sd {

struct ControlCommand {
  enum class Kind {
    Prompt, Negative, Guidance, Delta, TIndexList, Seed, Filter, FilterThreshold, Lora, IpAdapterScale, ImagePrompt,
    ControlnetScale, ControlPreprocessor, DeepCache, Stats, Quit, Help
  };
  Kind kind = Kind::Stats;
  std::string text;                  // prompt / negative / lora name / image_prompt path ("" = none) / preprocessor
  double number = 0;                 // guidance / delta / filter_threshold / lora / ip_adapter / controlnet scale /
                                     // deep_cache similarity (NaN = unchanged)
  std::vector<int64_t> t_index_list;
  int64_t index = 0;                 // controlnet_scale / control_preprocessor: which ControlNet; deep_cache: k
  uint64_t seed = 0;
  bool on = false;                   // filter
  std::string line;                  // the command as typed (trimmed), for logs and replies
};

// Parses one line. nullopt for an empty or comment line; InvalidArgument with a message that says what was expected
// for anything else that is not a valid command.
std::optional<ControlCommand> parse_control_command(const std::string& line);

// The command summary printed by `help` (one line per command).
const std::string& control_help();

}  // namespace sd
