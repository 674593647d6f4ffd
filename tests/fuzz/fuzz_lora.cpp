// LoRA files as read_lora_file reads them (every layout: kohya, diffusers, legacy diffusers, PEFT): the file comes
// from fuzz_util.h's FileImage (input = header JSON, NUL, data bytes; zeros pad the data region to 1 MiB). Every input
// must either give pairs whose invariants hold or throw sd::FormatError naming the file.
#include <cmath>
#include <cstdint>

#include <torch/torch.h>

#include "fuzz_torch.h"
#include "fuzz_util.h"
#include "io/lora_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static sd::fuzz::FileImage image;
  const std::string& path = image.write(data, size, 1 << 20);
  try {
    const sd::LoraFile lora = sd::read_lora_file(path);
    size_t keys = lora.unparsed.size();
    for (const auto& p : lora.pairs) {
      keys += p.keys().size();
      if (p.method != "lora") continue;  // LyCORIS modules: read_lora_file checked their factors chain
      const bool ok = p.down.defined() && p.up.defined() && p.down.scalar_type() == torch::kFloat &&
                      p.up.scalar_type() == torch::kFloat && (p.down.dim() == 2 || p.down.dim() == 4) &&
                      (p.up.dim() == 2 || p.up.dim() == 4) && p.rank() >= 1 && p.up.size(1) == p.rank() &&
                      (!p.alpha || std::isfinite(*p.alpha)) && !p.down_key.empty() && !p.up_key.empty();
      if (!ok) {
        std::fprintf(stderr, "accepted pair %s / %s breaks an invariant\n", p.down_key.c_str(), p.up_key.c_str());
        std::abort();
      }
    }
    if (keys != lora.keys) {
      std::fprintf(stderr, "%zu keys in the file, %zu in pairs + unparsed\n", lora.keys, keys);
      std::abort();
    }
  } catch (const sd::FormatError& e) {
    sd::fuzz::expect_names_file(e, path);
  }
  return 0;
}
