#pragma once
// Errors carry their context (file, key, expected vs found) in the message; the CLI prints what() in one line.
#include <stdexcept>
#include <string>

namespace sd {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// A file or folder that is malformed: names the file first.
class FormatError : public Error {
 public:
  FormatError(const std::string& file, const std::string& what) : Error(file + ": " + what), file_(file) {}
  const std::string& file() const { return file_; }

 private:
  std::string file_;
};

// Bad arguments from a caller (sizes, options).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

}  // namespace sd
