// A whole safetensors file as the loaders read it (SafeTensorsFile: header + every tensor of the data region, aligned
// tensors aliasing the buffer, unaligned ones copied). Every input must either load, with every tensor inside the
// file and of its header's size, or throw sd::FormatError naming the file; anything else is a finding.
#include <cstdint>

#include <torch/torch.h>

#include "fuzz_torch.h"
#include "fuzz_util.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string name = "fuzz.safetensors";
  try {
    const auto f = sd::SafeTensorsFile::from_bytes(sd::fuzz::bytes(data, size), name);
    uint64_t sum = 0;
    for (const auto& info : f.tensors()) {
      const torch::Tensor t = f.get(info.name);
      if (static_cast<uint64_t>(t.numel()) != info.numel() || t.nbytes() != info.nbytes()) {
        std::fprintf(stderr, "tensor %s: %lld elements / %zu bytes, header says %llu / %llu\n", info.name.c_str(),
                     static_cast<long long>(t.numel()), t.nbytes(), static_cast<unsigned long long>(info.numel()),
                     static_cast<unsigned long long>(info.nbytes()));
        std::abort();
      }
      // Read every byte (ASan checks they lie inside the file's buffer).
      const auto* p = static_cast<const uint8_t*>(t.data_ptr());
      for (size_t i = 0; i < t.nbytes(); ++i) sum += p[i];
    }
    const auto all = f.load_all();
    if (all.size() != f.tensors().size()) std::abort();
    for (const auto& k : f.keys())
      if (!f.contains(k)) std::abort();
    (void)sum;
  } catch (const sd::FormatError& e) {
    sd::fuzz::expect_names_file(e, name);
  }
  return 0;
}
