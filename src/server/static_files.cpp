#include "server/static_files.h"

#include <filesystem>
#include <map>

#include "core/error.h"

namespace fs = std::filesystem;

namespace sd::server {

std::string mime_type(const std::string& path) {
  static const std::map<std::string, std::string> kTypes{
      {".html", "text/html; charset=utf-8"}, {".htm", "text/html; charset=utf-8"},
      {".css", "text/css; charset=utf-8"},   {".js", "text/javascript; charset=utf-8"},
      {".mjs", "text/javascript; charset=utf-8"}, {".json", "application/json"},
      {".png", "image/png"},                 {".jpg", "image/jpeg"},
      {".jpeg", "image/jpeg"},               {".gif", "image/gif"},
      {".svg", "image/svg+xml"},             {".ico", "image/x-icon"},
      {".webp", "image/webp"},               {".txt", "text/plain; charset=utf-8"},
      {".map", "application/json"},          {".woff2", "font/woff2"},
      {".wasm", "application/wasm"}};
  const auto dot = path.rfind('.');
  const auto slash = path.rfind('/');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return "application/octet-stream";
  std::string ext = path.substr(dot);
  for (auto& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  const auto it = kTypes.find(ext);
  return it == kTypes.end() ? "application/octet-stream" : it->second;
}

std::optional<std::string> percent_decode(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out.push_back(s[i]);
      continue;
    }
    if (i + 2 >= s.size() || !std::isxdigit(static_cast<unsigned char>(s[i + 1])) ||
        !std::isxdigit(static_cast<unsigned char>(s[i + 2])))
      return std::nullopt;
    out.push_back(static_cast<char>(std::stoi(s.substr(i + 1, 2), nullptr, 16)));
    i += 2;
  }
  return out;
}

StaticFiles::StaticFiles(const std::string& root) {
  std::error_code ec;
  const fs::path p = fs::canonical(root, ec);
  if (ec || !fs::is_directory(p)) throw InvalidArgument("--web-root '" + root + "': not an existing folder");
  root_ = p.string();
}

StaticFiles::Result StaticFiles::resolve(const std::string& target) const {
  Result r;
  std::string path = target.substr(0, target.find_first_of("?#"));
  const auto decoded = percent_decode(path);
  if (!decoded || decoded->empty() || (*decoded)[0] != '/') {
    r.status = Status::Forbidden;
    return r;
  }
  path = *decoded;
  for (const char c : path) {
    if (c == '\\' || static_cast<unsigned char>(c) < 0x20 || c == 0x7F) {
      r.status = Status::Forbidden;
      return r;
    }
  }
  // Any ".." segment is refused outright (no normalisation games), as are hidden files (".git", ".env").
  size_t start = 1;
  while (start <= path.size()) {
    const size_t end = std::min(path.find('/', start), path.size());
    const std::string seg = path.substr(start, end - start);
    if (seg == ".." || (!seg.empty() && seg[0] == '.')) {
      r.status = Status::Forbidden;
      return r;
    }
    start = end + 1;
  }
  fs::path file = fs::path(root_) / path.substr(1);
  std::error_code ec;
  if (fs::is_directory(file, ec)) file /= "index.html";
  const fs::path canon = fs::canonical(file, ec);
  if (ec) return r;  // NotFound
  const std::string c = canon.string();
  if (c.compare(0, root_.size(), root_) != 0 || (c.size() > root_.size() && c[root_.size()] != '/')) {
    r.status = Status::Forbidden;  // a symlink out of the root
    return r;
  }
  if (!fs::is_regular_file(canon, ec)) return r;
  r.status = Status::Ok;
  r.path = c;
  r.mime = mime_type(c);
  return r;
}

}  // namespace sd::server
