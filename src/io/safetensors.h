#pragma once
// safetensors files as libtorch tensors: the file is memory-mapped (private, copy-on-write) and tensors alias the
// mapping without copying when their offset is aligned for the dtype; the mapping lives as long as any tensor does.
// A sharded checkpoint (io/shard_index.h) opens as one SafeTensorsFile: its shards' tensors under one name space.
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
  // Maps and validates `path`; throws FormatError naming the file and problem. A shard index
  // ("<stem>.safetensors.index[.<variant>].json") opens every shard it names, as diffusers' load of a sharded
  // checkpoint does: all tensors of all its shards (a tensor in two shards, or one the index lists that no shard
  // holds, is a FormatError naming the index, the tensor and the shards).
  static SafeTensorsFile open(const std::string& path);
  // Validates an in-memory image (the fuzz target and tests use this); `name` is used in errors.
  static SafeTensorsFile from_bytes(std::string bytes, const std::string& name);

  const std::string& path() const { return path_; }  // the file opened (a shard index: the index)
  // The files holding the tensors: {path()} or the shards, in the index's (sorted) order.
  const std::vector<std::string>& files() const { return files_; }
  // Every tensor; begin / end are offsets inside the data region of the file holding it.
  const std::vector<safetensors::TensorInfo>& tensors() const { return tensors_; }
  // The header's __metadata__ (a shard index: its "metadata").
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  std::vector<std::string> keys() const;
  bool contains(const std::string& name) const;
  const safetensors::TensorInfo& info(const std::string& name) const;  // FormatError if absent

  // The tensor `name` (FormatError naming file and key if absent). Zero-copy when aligned.
  torch::Tensor get(const std::string& name) const;
  std::map<std::string, torch::Tensor> load_all() const;
  size_t file_size() const;  // bytes of files()

 private:
  struct Mapping;
  struct Part {  // one file: its mapping and where its data region starts
    std::shared_ptr<Mapping> map;
    uint64_t data_start = 0;
  };
  static SafeTensorsFile open_sharded(const std::string& index_path);
  static std::shared_ptr<Mapping> map_file(const std::string& path, safetensors::Header& header);
  void add_part(std::shared_ptr<Mapping> map, safetensors::Header header, const std::string& file);

  std::vector<Part> parts_;
  std::vector<safetensors::TensorInfo> tensors_;
  std::vector<size_t> part_of_;  // tensors_[i] lies in parts_[part_of_[i]]
  std::map<std::string, std::string> metadata_;
  std::map<std::string, size_t> index_;  // name -> position in tensors_
  std::vector<std::string> files_;
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
