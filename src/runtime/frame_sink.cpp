#include "runtime/frame_sink.h"

#include <filesystem>

#include <unistd.h>

#include "core/error.h"
#include "runtime/image_folder_sink.h"
#include "runtime/raw_frame_sink.h"
#include "runtime/video_sink.h"
#include "runtime/window_sink.h"

namespace sd {

std::unique_ptr<FrameSink> open_sink(const std::string& spec, const SinkOptions& options) {
  if (spec.empty()) throw InvalidArgument("--output is empty");
  if (spec == "window") return std::make_unique<WindowSink>(options.window_title);
  if (spec == "-" || spec == "stdout") return std::make_unique<RawFrameSink>(STDOUT_FILENO, "stdout");
  if (spec == "none" || spec == "null") return std::make_unique<NullSink>();
  if (VideoFileSink::is_video_path(spec)) return std::make_unique<VideoFileSink>(spec, options);
  if (ImageFolderSink::is_pattern(spec)) return std::make_unique<ImageFolderSink>(spec);
  std::error_code ec;
  const bool looks_like_folder = spec.back() == '/' || std::filesystem::is_directory(spec, ec) ||
                                 std::filesystem::path(spec).extension().empty();
  if (looks_like_folder) return std::make_unique<ImageFolderSink>(spec);
  throw InvalidArgument("--output " + spec + ": not a known output (a video file .avi/.mp4/.m4v/.mov/.mkv/.webm, a "
                        "folder, a pattern like out/%05d.png, window, - for raw rgb24 on stdout, or none)");
}

}  // namespace sd
