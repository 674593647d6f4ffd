#pragma once
// safetensors files as libtorch tensors: the file is memory-mapped (private, copy-on-write) and tensors alias the
// mapping without copying when their offset is aligned for the dtype; the mapping lives as long as any tensor does.
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "io/safetensors_header.h"

namespace sd {

class SafeTensorsFile {
 public:
  // Maps and validates `path`; throws FormatError naming the file and problem.
  static SafeTensorsFile open(const std::string& path);
  // Validates an in-memory image (the fuzz target and tests use this); `name` is used in errors.
  static SafeTensorsFile from_bytes(std::string bytes, const std::string& name);

  const std::string& path() const { return path_; }
  const std::vector<safetensors::TensorInfo>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  std::vector<std::string> keys() const;
  bool contains(const std::string& name) const;
  const safetensors::TensorInfo& info(const std::string& name) const;  // FormatError if absent

  // The tensor `name` (FormatError naming file and key if absent). Zero-copy when aligned.
  torch::Tensor get(const std::string& name) const;
  std::map<std::string, torch::Tensor> load_all() const;
  size_t file_size() const;

 private:
  struct Mapping;
  std::shared_ptr<Mapping> map_;
  safetensors::Header header_;
  std::map<std::string, size_t> index_;
  std::string path_;
};

torch::ScalarType to_torch(safetensors::DType d);
// Unsupported dtypes (complex, quantised, ...) throw InvalidArgument naming `what`.
safetensors::DType from_torch(torch::ScalarType t, const std::string& what);

// Writes tensors (any device; made contiguous and moved to CPU) in the given order, atomically (temp file + rename).
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});
void save_safetensors(const std::string& path, const std::map<std::string, torch::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace sd
