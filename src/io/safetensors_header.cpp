#include "io/safetensors_header.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_limits.h"

namespace sd::safetensors {

namespace {
struct DTypeEntry {
  const char* name;
  DType dtype;
  size_t size;
};
constexpr DTypeEntry kDTypes[] = {
    {"F64", DType::F64, 8}, {"F32", DType::F32, 4}, {"F16", DType::F16, 2}, {"BF16", DType::BF16, 2},
    {"I64", DType::I64, 8}, {"I32", DType::I32, 4}, {"I16", DType::I16, 2}, {"I8", DType::I8, 1},
    {"U8", DType::U8, 1},   {"BOOL", DType::BOOL, 1},
};

[[noreturn]] void fail(const std::string& file, const std::string& what) { throw FormatError(file, what); }

std::string tensor_ctx(const std::string& name) { return "tensor '" + name + "': "; }
}  // namespace

const char* dtype_name(DType d) {
  for (const auto& e : kDTypes)
    if (e.dtype == d) return e.name;
  return "?";
}

size_t dtype_size(DType d) {
  for (const auto& e : kDTypes)
    if (e.dtype == d) return e.size;
  return 0;
}

bool parse_dtype(const std::string& s, DType* out) {
  for (const auto& e : kDTypes) {
    if (s == e.name) {
      *out = e.dtype;
      return true;
    }
  }
  return false;
}

uint64_t TensorInfo::numel() const {
  uint64_t n = 1;
  for (auto d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

Header parse_header(const uint8_t* data, size_t size, const std::string& file) {
  Header h;
  if (size < 8) fail(file, "truncated: " + std::to_string(size) + " bytes, a safetensors file has at least 8");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  if (n > kMaxHeaderSize)
    fail(file, "header length " + std::to_string(n) + " exceeds the limit of " + std::to_string(kMaxHeaderSize) +
                   " bytes (not a safetensors file?)");
  if (n > size - 8)
    fail(file, "truncated: header length " + std::to_string(n) + " but only " + std::to_string(size - 8) +
                   " bytes follow the length field");
  h.header_size = n;
  h.data_start = 8 + n;
  h.data_size = size - h.data_start;

  // A header nests 3 levels; a shape nested 300,000 deep (a 600 KB file) parsed fine and then overflowed the stack
  // in the dump() of the error message (core/json_limits.h).
  const std::string depth = json_depth_problem(std::string_view(reinterpret_cast<const char*>(data + 8), n));
  if (!depth.empty()) fail(file, "header is not a safetensors header: " + depth);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(reinterpret_cast<const char*>(data + 8), reinterpret_cast<const char*>(data + 8 + n));
  } catch (const nlohmann::json::exception& e) {
    fail(file, std::string("header is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) fail(file, "header must be a JSON object, found " + std::string(j.type_name()));

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const auto& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail(file, "__metadata__ must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) fail(file, "__metadata__['" + m.key() + "'] must be a string");
        h.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!v.is_object()) fail(file, tensor_ctx(name) + "entry must be an object");
    TensorInfo t;
    t.name = name;
    auto dt = v.find("dtype");
    if (dt == v.end() || !dt->is_string()) fail(file, tensor_ctx(name) + "missing string field 'dtype'");
    if (!parse_dtype(dt->get<std::string>(), &t.dtype))
      fail(file, tensor_ctx(name) + "unknown dtype '" + dt->get<std::string>() +
                     "' (expected F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL)");
    auto sh = v.find("shape");
    if (sh == v.end() || !sh->is_array()) fail(file, tensor_ctx(name) + "missing list field 'shape'");
    uint64_t numel = 1;
    bool overflow = false;
    for (const auto& d : *sh) {
      if (!d.is_number_integer() || (d.is_number_integer() && !d.is_number_unsigned() && d.get<int64_t>() < 0))
        fail(file, tensor_ctx(name) + "shape entries must be non-negative integers, found " + json_excerpt(*sh));
      uint64_t dim = d.get<uint64_t>();
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail(file, tensor_ctx(name) + "shape entry too large: " + json_excerpt(*sh));
      t.shape.push_back(static_cast<int64_t>(dim));
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / dim) overflow = true;
      numel *= dim;
    }
    // Any overflow fails, also one a later 0 would hide ([2^32, 2^32] wraps to 0 elements): torch sizes its storage
    // from the full product, and an element count past int64 is no tensor at all.
    if (overflow || numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail(file, tensor_ctx(name) + "shape " + json_excerpt(*sh) + " overflows");
    auto off = v.find("data_offsets");
    if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
      fail(file, tensor_ctx(name) + "'data_offsets' must be [begin, end] of non-negative integers");
    t.begin = (*off)[0].get<uint64_t>();
    t.end = (*off)[1].get<uint64_t>();
    if (t.end < t.begin)
      fail(file, tensor_ctx(name) + "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                     "] end before begin");
    if (t.end > h.data_size)
      fail(file, tensor_ctx(name) + "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                     "] outside the data region of " + std::to_string(h.data_size) + " bytes (truncated file?)");
    const uint64_t isz = dtype_size(t.dtype);
    if (numel > std::numeric_limits<uint64_t>::max() / isz || numel * isz != t.end - t.begin)
      fail(file, tensor_ctx(name) + "byte length " + std::to_string(t.end - t.begin) + " does not match shape " +
                     json_excerpt(*sh) + " x " + dtype_name(t.dtype) + " (" + std::to_string(isz) + " bytes each)");
    h.tensors.push_back(std::move(t));
  }

  std::sort(h.tensors.begin(), h.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t cursor = 0;
  for (const auto& t : h.tensors) {
    if (t.begin < cursor)
      fail(file, tensor_ctx(t.name) + "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                     "] overlap the previous tensor (which ends at " + std::to_string(cursor) + ")");
    cursor = std::max(cursor, t.end);
  }
  return h;
}

std::string build_header(std::vector<TensorInfo>& tensors, const std::map<std::string, std::string>& metadata) {
  nlohmann::json j = nlohmann::json::object();
  if (!metadata.empty()) j["__metadata__"] = metadata;
  uint64_t cursor = 0;
  for (auto& t : tensors) {
    const uint64_t nb = t.numel() * dtype_size(t.dtype);
    t.begin = cursor;
    t.end = cursor + nb;
    cursor = t.end;
    j[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
  }
  std::string js = j.dump();
  while ((8 + js.size()) % 8 != 0) js.push_back(' ');
  std::string out(8, '\0');
  uint64_t n = js.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + js;
}

}  // namespace sd::safetensors
