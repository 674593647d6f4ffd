#pragma once
// An X11 screen region (`screen` = the whole root window, `screen:x,y,w,h` = a region), grabbed with the MIT-SHM
// extension (XShmGetImage into a shared segment; plain XGetImage when the server lacks it). Needs a display
// (DISPLAY) and a build with libX11/libXext; otherwise the constructor says so.
#include <memory>

#include "runtime/frame_source.h"

namespace sd {

struct ScreenRegion {
  int x = 0, y = 0, width = 0, height = 0;  // width/height 0 = the whole screen
};

// "screen" or "screen:x,y,w,h"; InvalidArgument for anything else.
ScreenRegion parse_screen_region(const std::string& spec);

class ScreenSource : public FrameSource {
 public:
  ScreenSource(const ScreenRegion& region, const SourceOptions& options);
  ~ScreenSource() override;
  bool read(cv::Mat& image, const std::atomic<bool>& stop) override;
  bool live() const override { return true; }
  double fps() const override;
  std::string describe() const override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sd
