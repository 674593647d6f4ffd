#pragma once
// A `--config` folder as users make one: the listed config files of a diffusers model folder, no weights, no
// tokenizer (the single-file tests load a checkpoint with it and compare against the folder itself).
#include <filesystem>
#include <string>
#include <vector>

#include "common/fixtures.h"

namespace sd::test {

// Copies model_index.json and each of `configs` (paths relative to the folder) from `folder` into a new temp dir.
inline std::string config_only_folder(const std::filesystem::path& folder, const std::vector<std::string>& configs,
                                      const std::string& prefix) {
  namespace fs = std::filesystem;
  const std::string dir = make_temp_dir(prefix);
  fs::copy_file(folder / "model_index.json", fs::path(dir) / "model_index.json");
  for (const auto& f : configs) {
    fs::create_directories((fs::path(dir) / f).parent_path());
    fs::copy_file(folder / f, fs::path(dir) / f);
  }
  return dir;
}

}  // namespace sd::test
