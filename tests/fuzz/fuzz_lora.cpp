// LoRA files as read_lora_file reads them (every layout: kohya, diffusers, legacy diffusers, PEFT): the file comes
// from fuzz_util.h's FileImage (input = header JSON, NUL, data bytes; zeros pad the data region to 1 MiB). Every input
// must either give pairs whose invariants hold or throw sd::FormatError naming the file.
#include <cmath>
#include <cstdint>

#include <torch/torch.h>

#include "core/shape_str.h"
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
      if (!p.plain()) {
        // Other methods and DoRA: read_lora_file checked that their factors chain, so the difference they make has
        // delta_shape (and lora_delta does not throw). Products past 16 Mi elements are left out: a LoKr of two
        // 512 x 512 factors (2 MiB of file) is a 2^36-element kron, more memory than a fuzz run has.
        int64_t n = 1;
        for (int64_t k : p.delta_shape) n = k > 0 && n <= (int64_t{1} << 24) / k ? n * k : (int64_t{1} << 24) + 1;
        if (n > (int64_t{1} << 24)) continue;
        torch::Tensor d;
        try {
          d = sd::lora_delta(p);
        } catch (const std::exception& e) {
          std::fprintf(stderr, "lora_delta throws for accepted module %s: %s\n", p.first_key().c_str(), e.what());
          std::abort();
        }
        // (An empty delta_shape is a full module with only diff_b, which makes no weight difference.)
        const bool ok = p.delta_shape.empty() ? !d.defined() : d.defined() && d.sizes().vec() == p.delta_shape;
        if (!ok) {
          std::fprintf(stderr, "module %s: lora_delta %s, delta_shape %s\n", p.first_key().c_str(),
                       d.defined() ? sd::shape_str(d.sizes()).c_str() : "undefined",
                       sd::shape_str(p.delta_shape).c_str());
          std::abort();
        }
        if (p.method != "lora") continue;  // the checks below are a down / up pair's
      }
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
