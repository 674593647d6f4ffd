#pragma once
// Static files of the browser app (web/): request target -> file under the web root, with its MIME type.
// Path traversal protection: the target is percent-decoded, then refused when it holds "..", a backslash, a NUL or
// a control character, and the resolved path (symlinks followed) must still lie under the root.
#include <optional>
#include <string>

namespace sd::server {

// MIME type from the file extension ("application/octet-stream" when unknown).
std::string mime_type(const std::string& path);

// "%2e%2E" -> "..", "+" stays "+"; nullopt for a malformed escape.
std::optional<std::string> percent_decode(const std::string& s);

class StaticFiles {
 public:
  // `root` must be an existing folder (InvalidArgument otherwise).
  explicit StaticFiles(const std::string& root);

  enum class Status { Ok, NotFound, Forbidden };
  struct Result {
    Status status = Status::NotFound;
    std::string path;  // the file to send (Ok)
    std::string mime;
  };
  // `target` is the request target (path and optional query); "/" and folders map to their index.html.
  Result resolve(const std::string& target) const;

  const std::string& root() const { return root_; }

 private:
  std::string root_;  // canonical, no trailing slash
};

}  // namespace sd::server
