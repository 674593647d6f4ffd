// `streamdiffusion tokenize --model DIR --prompt TEXT [--tokens]`: the CLIP input ids of a prompt, padded to
// model_max_length exactly as diffusers' encode_prompt feeds the text encoder, as one JSON array per line.
#include <iostream>
#include <nlohmann/json.hpp>

#include "apps/cli/commands.h"
#include "core/error.h"
#include "io/ldm_checkpoint.h"
#include "io/model_folder.h"
#include "io/safetensors.h"
#include "pipeline/diffusion_models.h"
#include "tokenizer/clip_tokenizer.h"

namespace {

struct TokenizeOptions {
  std::string model;
  std::string prompt;
  bool tokens = false;
};

// A tokenizer folder itself (has vocab.json) or a diffusers pipeline folder (its tokenizer/ component).
std::string tokenizer_dir(const std::string& model) {
  if (sd::is_file(model + "/vocab.json")) return model;
  return sd::ModelFolder::open(model).component_dir("tokenizer");
}

sd::cli::Runner setup_tokenize(CLI::App& app) {
  auto opts = std::make_shared<TokenizeOptions>();
  app.add_option("--model", opts->model,
                 "diffusers pipeline folder, single-file checkpoint, or a CLIP tokenizer folder (vocab.json, "
                 "merges.txt)")
      ->required();
  // (a single-file checkpoint: the shipped models/clip-tokenizer, padded with "!" for SD 2.x as load_pipeline does)
  app.add_option("--prompt", opts->prompt, "the text to tokenize")->required();
  app.add_flag("--tokens", opts->tokens, "also print the BPE strings (without bos/eos/padding) as a second JSON line");
  return [opts] {
    std::string dir, pad;
    if (sd::is_file(opts->model)) {
      sd::refuse_pickle(opts->model);
      const auto info = sd::convert::inspect_ldm_checkpoint(sd::SafeTensorsFile::open(opts->model));
      dir = sd::find_clip_tokenizer_dir();
      if (dir.empty()) throw sd::FormatError(opts->model, "the shipped models/clip-tokenizer was not found");
      if (info.family == sd::convert::LdmFamily::SD2) pad = "!";
    } else {
      dir = tokenizer_dir(opts->model);
    }
    const auto tok = sd::ClipTokenizer::from_folder(dir, pad);
    const auto ids = tok.encode(opts->prompt);
    std::cout << nlohmann::json(ids).dump() << "\n";
    if (opts->tokens) std::cout << nlohmann::json(tok.bpe_tokens(opts->prompt)).dump() << "\n";
    const size_t needed = tok.untruncated_length(opts->prompt);
    // stderr, not the logger (spdlog's default sink is stdout, which carries the JSON).
    if (needed > static_cast<size_t>(tok.max_length()))
      std::cerr << "warning: the prompt needs " << needed << " tokens with bos/eos; it is truncated to "
                << tok.max_length() << " (the text encoder's limit)\n";
    return 0;
  };
}

REGISTER_COMMAND("tokenize", "print the CLIP token ids of a prompt (padded to model_max_length) as JSON", 90,
                 setup_tokenize);

}  // namespace
