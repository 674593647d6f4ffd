#pragma once
// Shared by the libFuzzer targets (tests/fuzz/fuzz_*.cpp, docs/FUZZING.md).
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/error.h"

namespace sd::fuzz {

inline std::string bytes(const uint8_t* data, size_t size) { return std::string(reinterpret_cast<const char*>(data), size); }

// A FormatError must name the file it is about first ("<file>: ..."): anything else is a finding.
inline void expect_names_file(const sd::FormatError& e, const std::string& file) {
  if (std::string(e.what()).rfind(file + ": ", 0) != 0) {
    std::fprintf(stderr, "error does not name the file %s: %s\n", file.c_str(), e.what());
    std::abort();
  }
}

// An in-memory file (memfd) on a path the real readers open ("/proc/self/fd/N"), rewritten for each input: `bytes`
// at offset 0, then zeros up to `size` (sparse: no memory until read).
class MemFile {
 public:
  explicit MemFile(const char* name) {
    fd_ = memfd_create(name, MFD_CLOEXEC);
    if (fd_ < 0) {
      std::perror("memfd_create");
      std::abort();
    }
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
  ~MemFile() { close(fd_); }
  const std::string& path() const { return path_; }
  const std::string& write(const void* bytes, size_t n, uint64_t size) {
    if (ftruncate(fd_, 0) != 0 || pwrite(fd_, bytes, n, 0) != static_cast<ssize_t>(n) ||
        ftruncate(fd_, static_cast<off_t>(std::max<uint64_t>(n, size))) != 0) {
      std::perror("fuzz memfd");
      std::abort();
    }
    return path_;
  }

 private:
  int fd_ = -1;
  std::string path_;
};

// A safetensors file on a path the real loaders open (SafeTensorsFile::open, read_lora_file): u64 length | header
// JSON | data | zeros. The fuzz input is "<header JSON>\0<data bytes>" (no NUL: all header); the zeros pad the data
// region to `min_data` bytes, so a mutated header whose offsets fit stays a valid file without the fuzzer having to
// grow megabytes of tensor data.
class FileImage {
 public:
  const std::string& path() const { return file_.path(); }
  const std::string& write(const uint8_t* data, size_t size, uint64_t min_data) {
    const void* nul = std::memchr(data, 0, size);
    const size_t header = nul ? static_cast<size_t>(static_cast<const uint8_t*>(nul) - data) : size;
    const size_t extra = nul ? size - header - 1 : 0;
    std::string head(8, '\0');
    for (int i = 0; i < 8; ++i) head[i] = static_cast<char>((static_cast<uint64_t>(header) >> (8 * i)) & 0xff);
    head.append(reinterpret_cast<const char*>(data), header);
    if (extra) head.append(reinterpret_cast<const char*>(data) + header + 1, extra);
    return file_.write(head.data(), head.size(), 8 + header + std::max<uint64_t>(extra, min_data));
  }

 private:
  MemFile file_{"fuzz.safetensors"};
};

// A text file on a path the real readers open (CLI11's --config-file) holding the input as it is.
class TextFile {
 public:
  explicit TextFile(const char* name) : file_(name) {}
  const std::string& write(const uint8_t* data, size_t size) { return file_.write(data, size, size); }

 private:
  MemFile file_;
};

}  // namespace sd::fuzz
