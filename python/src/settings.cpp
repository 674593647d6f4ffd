// Settings files from Python (streamdiffusion_cpp.load_settings / StreamDiffusionWrapper.from_config): the CLI's
// YAML reader (config/settings_file.h), so a file gives the same errors, with the same file and line, in both.
// The mapping of the keys onto the wrapper's arguments is Python (streamdiffusion_cpp/settings.py).
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "pipeline/prompt_blend.h"
#include "py_common.h"
#ifdef SD_PY_HAVE_SETTINGS
#include "config/settings_file.h"
#endif

namespace sdpy {

void bind_settings(py::module_& m) {
#ifdef SD_PY_HAVE_SETTINGS
  m.attr("HAVE_SETTINGS") = true;
  m.def(
      "read_settings",
      [](const std::string& path) {
        std::ifstream f(path, std::ios::binary);
        if (!f) throw sd::FormatError(path, "cannot read the settings file (missing or unreadable)");
        std::stringstream text;
        text << f.rdbuf();
        if (f.bad()) throw sd::FormatError(path, "cannot read the settings file");
        py::list out;
        for (const auto& e : sd::parse_settings_yaml(text.str(), path))
          out.append(py::make_tuple(sd::settings_key(sd::settings_option_name(e.key)), e.values, e.list, e.line));
        return out;
      },
      py::arg("path"),
      "Reads a settings file (YAML, as the CLI's --config FILE): [(key, values, is_list, line), ...] in file order, "
      "keys normalised to the dump form (t-index-list -> t_index_list), values as text. FormatError (naming the "
      "file, and the line) for a missing file or bad YAML.");
#else
  m.attr("HAVE_SETTINGS") = false;
#endif
  m.def(
      "parse_prompt_list",
      [](const std::string& text) {
        py::list out;
        for (const auto& p : sd::parse_prompt_list(text)) out.append(py::make_tuple(p.text, p.weight));
        return out;
      },
      py::arg("text"),
      "A prompt list as the CLI's --prompt-list takes it ('a cat:1 | a dog:0.5' or JSON [[\"a cat\", 1], ...]) -> "
      "[(text, weight), ...]; InvalidArgument when malformed.");
}

}  // namespace sdpy
