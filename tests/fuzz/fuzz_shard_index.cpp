// A sharded checkpoint's index (io/shard_index.h) as SafeTensorsFile::open reads it: the input is the index text, in
// a folder holding three small valid shards (a, b and a copy of a). Every input must either open, with every tensor
// readable and of its header's size, or throw sd::FormatError naming the index or one of its shards; anything else
// (a crash, another exception, a file outside the folder opened) is a finding.
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>

#include <torch/torch.h>

#include "fuzz_torch.h"
#include "fuzz_util.h"
#include "io/safetensors.h"
#include "io/shard_index.h"

namespace {

// Removed when the process exits normally (libFuzzer's end of run; a crash leaves it for the finding's reproduction).
struct Folder {
  std::string path;
  ~Folder() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

const std::string& folder() {
  static const Folder dir{[] {
    const std::string d = std::filesystem::temp_directory_path().string() + "/fuzz-shard-index-" +
                          std::to_string(getpid());
    std::filesystem::create_directories(d);
    using V = std::vector<std::pair<std::string, torch::Tensor>>;
    sd::save_safetensors(d + "/a-00001-of-00002.safetensors", V{{"x", torch::arange(6)}, {"y", torch::ones({2, 2})}});
    sd::save_safetensors(d + "/a-00002-of-00002.safetensors", V{{"z", torch::zeros({3}).to(torch::kHalf)}});
    sd::save_safetensors(d + "/copy.safetensors", V{{"x", torch::arange(6)}});
    return d;
  }()};
  return dir.path;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string index = folder() + "/m.safetensors.index.json";
  {
    std::ofstream out(index, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  try {
    const auto f = sd::SafeTensorsFile::open(index);
    for (const auto& file : f.files())
      if (std::filesystem::path(file).parent_path() != std::filesystem::path(folder())) {
        std::fprintf(stderr, "opened %s outside the index's folder\n", file.c_str());
        std::abort();
      }
    for (const auto& info : f.tensors()) {
      const torch::Tensor t = f.get(info.name);
      if (static_cast<uint64_t>(t.numel()) != info.numel() || t.nbytes() != info.nbytes()) std::abort();
    }
    // What the parser alone accepted must name only plain .safetensors names, every one listed once.
    const auto parsed = sd::parse_shard_index(sd::fuzz::bytes(data, size), index);
    for (const auto& [tensor, shard] : parsed.weight_map)
      if (!f.contains(tensor) || shard.find('/') != std::string::npos) std::abort();
  } catch (const sd::FormatError& e) {
    const std::string what = e.what();
    if (what.rfind(index + ": ", 0) != 0 && what.rfind(folder() + "/", 0) != 0) {
      std::fprintf(stderr, "error names neither the index nor a shard: %s\n", e.what());
      std::abort();
    }
  }
  return 0;
}
