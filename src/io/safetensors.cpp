#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>

#include "core/error.h"
#include "io/shard_index.h"

namespace sd {

struct SafeTensorsFile::Mapping {
  void* addr = nullptr;
  size_t size = 0;
  std::string owned;  // for from_bytes
  const uint8_t* data() const {
    return addr ? static_cast<const uint8_t*>(addr) : reinterpret_cast<const uint8_t*>(owned.data());
  }
  ~Mapping() {
    if (addr && size) munmap(addr, size);
  }
  // Live tensors aliasing each tensor's bytes (by data offset): get() may hand out the same bytes twice.
  std::mutex live_mutex;
  std::map<uint64_t, int> live;
  void acquire(uint64_t offset) {
    std::lock_guard<std::mutex> lock(live_mutex);
    ++live[offset];
  }
  // One alias of the bytes [p, p + n) at `offset` is gone; when it was the last, the whole pages they cover go back
  // to the kernel. The mapping outlives a tensor while other tensors alias it, so without this a weight dropped after
  // load (a prepacked convolution's dense copy, models/layers.h) would stay resident until the file's last weight
  // dies. Tensors never overlap (parse_header refuses it), so no page inside [p, p + n) belongs to another one.
  void release(uint64_t offset, void* p, size_t n) {
    {
      std::lock_guard<std::mutex> lock(live_mutex);
      auto it = live.find(offset);
      if (it == live.end() || --it->second > 0) return;
      live.erase(it);
    }
    if (!addr) return;
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
    const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + n) / page * page;
    if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
  }
};

torch::ScalarType to_torch(safetensors::DType d) {
  using safetensors::DType;
  switch (d) {
    case DType::F64: return torch::kFloat64;
    case DType::F32: return torch::kFloat32;
    case DType::F16: return torch::kFloat16;
    case DType::BF16: return torch::kBFloat16;
    case DType::I64: return torch::kInt64;
    case DType::I32: return torch::kInt32;
    case DType::I16: return torch::kInt16;
    case DType::I8: return torch::kInt8;
    case DType::U8: return torch::kUInt8;
    case DType::BOOL: return torch::kBool;
  }
  return torch::kFloat32;
}

safetensors::DType from_torch(torch::ScalarType t, const std::string& what) {
  using safetensors::DType;
  switch (t) {
    case torch::kFloat64: return DType::F64;
    case torch::kFloat32: return DType::F32;
    case torch::kFloat16: return DType::F16;
    case torch::kBFloat16: return DType::BF16;
    case torch::kInt64: return DType::I64;
    case torch::kInt32: return DType::I32;
    case torch::kInt16: return DType::I16;
    case torch::kInt8: return DType::I8;
    case torch::kUInt8: return DType::U8;
    case torch::kBool: return DType::BOOL;
    default: throw InvalidArgument(what + ": dtype " + std::string(c10::toString(t)) + " cannot be stored in safetensors");
  }
}

namespace {
constexpr uint64_t kMaxShardIndexBytes = 64ull << 20;  // an SDXL UNet's index is ~200 KB
}  // namespace

void SafeTensorsFile::add_part(std::shared_ptr<Mapping> map, safetensors::Header header, const std::string& file) {
  const size_t part = parts_.size();
  for (auto& t : header.tensors) {
    if (const auto it = index_.find(t.name); it != index_.end())
      throw FormatError(path_, "tensor '" + t.name + "' is in two files: " + files_[part_of_[it->second]] + " and " +
                                   file + " (which one to load cannot be told)");
    index_[t.name] = tensors_.size();
    part_of_.push_back(part);
    tensors_.push_back(std::move(t));
  }
  parts_.push_back(Part{std::move(map), header.data_start});
  files_.push_back(file);
}

// Maps `path` (private + writable: copy-on-write, so a tensor aliasing the file can be modified in place safely) and
// parses its header into `header`.
std::shared_ptr<SafeTensorsFile::Mapping> SafeTensorsFile::map_file(const std::string& path,
                                                                     safetensors::Header& header) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw FormatError(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw FormatError(path, "not a regular file");
  }
  auto m = std::make_shared<Mapping>();
  m->size = static_cast<size_t>(st.st_size);
  if (m->size > 0) {
    m->addr = mmap(nullptr, m->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (m->addr == MAP_FAILED) {
      m->addr = nullptr;
      ::close(fd);
      throw FormatError(path, std::string("mmap failed: ") + std::strerror(errno));
    }
  }
  ::close(fd);
  header = safetensors::parse_header(m->data(), m->size, path);
  return m;
}

SafeTensorsFile SafeTensorsFile::open(const std::string& path) {
  if (is_shard_index_name(std::filesystem::path(path).filename().string())) return open_sharded(path);
  SafeTensorsFile f;
  f.path_ = path;
  safetensors::Header header;
  auto m = map_file(path, header);
  f.metadata_ = header.metadata;
  f.add_part(std::move(m), std::move(header), path);
  return f;
}

SafeTensorsFile SafeTensorsFile::open_sharded(const std::string& index_path) {
  std::ifstream in(index_path, std::ios::binary);
  if (!in) throw FormatError(index_path, std::string("cannot open: ") + std::strerror(errno));
  // Read in pieces up to the cap: a file size from stat would not hold for a pipe or a file still being written.
  std::string text;
  char buf[1 << 16];
  while (in.read(buf, sizeof buf) || in.gcount() > 0) {
    text.append(buf, static_cast<size_t>(in.gcount()));
    if (text.size() > kMaxShardIndexBytes)
      throw FormatError(index_path, "larger than " + std::to_string(kMaxShardIndexBytes >> 20) +
                                        " MiB: not a sharded checkpoint's index");
  }
  const ShardIndex index = parse_shard_index(text, index_path);
  const std::filesystem::path dir = std::filesystem::path(index_path).parent_path();
  SafeTensorsFile f;
  f.path_ = index_path;
  f.metadata_ = index.metadata;
  for (const std::string& shard : index.shards) {
    const std::string p = (dir / shard).string();
    std::error_code ec;
    if (!std::filesystem::is_regular_file(p, ec)) {
      const auto held = std::find_if(index.weight_map.begin(), index.weight_map.end(),
                                     [&](const auto& kv) { return kv.second == shard; });
      throw FormatError(index_path, "shard " + shard + " (holding '" + held->first + "') is missing: expected " + p +
                                        " (every file the index names is needed)");
    }
    safetensors::Header header;
    auto m = map_file(p, header);
    f.add_part(std::move(m), std::move(header), p);
  }
  // As diffusers, every tensor of every shard loads (the map only names the files); a tensor the index lists that no
  // shard holds means a shard from another save (or a truncated one): refused here, by name, rather than later as a
  // missing module weight.
  for (const auto& [tensor, shard] : index.weight_map)
    if (!f.index_.count(tensor))
      throw FormatError(index_path, "the index maps tensor '" + tensor + "' to " + shard +
                                        ", but no shard holds it (a shard from another save?)");
  return f;
}

SafeTensorsFile SafeTensorsFile::from_bytes(std::string bytes, const std::string& name) {
  auto m = std::make_shared<Mapping>();
  m->owned = std::move(bytes);
  m->size = m->owned.size();
  SafeTensorsFile f;
  f.path_ = name;
  auto header = safetensors::parse_header(m->data(), m->size, name);
  f.metadata_ = header.metadata;
  f.add_part(std::move(m), std::move(header), name);
  return f;
}

std::vector<std::string> SafeTensorsFile::keys() const {
  std::vector<std::string> out;
  for (const auto& kv : index_) out.push_back(kv.first);
  return out;
}

bool SafeTensorsFile::contains(const std::string& name) const { return index_.count(name) != 0; }

const safetensors::TensorInfo& SafeTensorsFile::info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw FormatError(path_, "no tensor named '" + name + "'");
  return tensors_[it->second];
}

size_t SafeTensorsFile::file_size() const {
  size_t n = 0;
  for (const auto& p : parts_) n += p.map->size;
  return n;
}

torch::Tensor SafeTensorsFile::get(const std::string& name) const {
  const auto& t = info(name);
  const Part& part = parts_[part_of_[index_.at(name)]];
  const auto dtype = to_torch(t.dtype);
  auto opts = torch::TensorOptions().dtype(dtype);
  if (t.numel() == 0) return torch::empty(t.shape, opts);
  uint8_t* ptr = const_cast<uint8_t*>(part.map->data()) + part.data_start + t.begin;
  const size_t isz = safetensors::dtype_size(t.dtype);
  if (reinterpret_cast<uintptr_t>(ptr) % isz == 0) {
    auto keep = part.map;  // the tensor keeps the mapping alive
    const uint64_t offset = t.begin;
    const size_t nbytes = t.nbytes();
    keep->acquire(offset);
    return torch::from_blob(
        ptr, t.shape,
        [keep, offset, nbytes](void* p) mutable {
          keep->release(offset, p, nbytes);
          keep.reset();
        },
        opts);
  }
  auto out = torch::empty(t.shape, opts);
  std::memcpy(out.data_ptr(), ptr, t.nbytes());
  return out;
}

std::map<std::string, torch::Tensor> SafeTensorsFile::load_all() const {
  std::map<std::string, torch::Tensor> out;
  for (const auto& t : tensors_) out[t.name] = get(t.name);
  return out;
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<safetensors::TensorInfo> infos;
  std::vector<torch::Tensor> data;
  std::map<std::string, int> seen;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") throw InvalidArgument(path + ": '__metadata__' is reserved and cannot name a tensor");
    if (seen[name]++) throw InvalidArgument(path + ": tensor '" + name + "' given twice");
    safetensors::TensorInfo info;
    info.name = name;
    info.dtype = from_torch(t.scalar_type(), path + ": tensor '" + name + "'");
    info.shape = t.sizes().vec();
    infos.push_back(info);
    data.push_back(t.detach().to(torch::kCPU).contiguous());
  }
  const std::string prefix = safetensors::build_header(infos, metadata);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw FormatError(path, std::string("cannot write: ") + std::strerror(errno));
    out.write(prefix.data(), static_cast<std::streamsize>(prefix.size()));
    for (const auto& t : data)
      out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
    out.flush();
    if (!out) throw FormatError(path, "write failed (disk full?)");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    throw FormatError(path, std::string("cannot rename temporary file: ") + std::strerror(errno));
}

void save_safetensors(const std::string& path, const std::map<std::string, torch::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<std::string, torch::Tensor>> v(tensors.begin(), tensors.end());
  save_safetensors(path, v, metadata);
}

}  // namespace sd
