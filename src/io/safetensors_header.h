#pragma once
// The safetensors container format, parsed and validated without libtorch (so it can be fuzzed on its own).
// Layout: u64 little-endian N | N bytes of JSON header | data region. Header: {"name": {"dtype": "F32",
// "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {"k": "v"}} with offsets relative to the data
// region.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace sd::safetensors {

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

const char* dtype_name(DType d);
size_t dtype_size(DType d);
bool parse_dtype(const std::string& s, DType* out);

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // offsets inside the data region
  uint64_t end = 0;
  uint64_t numel() const;
  uint64_t nbytes() const { return end - begin; }
};

struct Header {
  std::vector<TensorInfo> tensors;  // in data-offset order
  std::map<std::string, std::string> metadata;
  uint64_t header_size = 0;  // N
  uint64_t data_start = 0;   // 8 + N: where the data region starts in the file
  uint64_t data_size = 0;    // bytes after data_start
};

// Upper bound on the JSON header (the reference implementation uses 100 MB).
constexpr uint64_t kMaxHeaderSize = 100ull * 1024 * 1024;

// Validates everything about a file image of `size` bytes and returns its header. Throws sd::FormatError naming
// `file`, the tensor (if any) and what was expected.
Header parse_header(const uint8_t* data, size_t size, const std::string& file);

// Serialises a header for tensors laid out back to back in the given order (offsets are recomputed) and pads the
// JSON with spaces so the data region starts 8-byte aligned. Returns the full prefix (8-byte length + JSON).
std::string build_header(std::vector<TensorInfo>& tensors, const std::map<std::string, std::string>& metadata);

}  // namespace sd::safetensors
