#include "runtime/tick_source.h"

#include "core/error.h"

namespace sd {

TickSource::TickSource(double fps) : fps_(fps), pacer_(fps) {
  if (fps < 0) throw InvalidArgument("input none: --input-fps must be >= 0, got " + std::to_string(fps));
}

bool TickSource::read(cv::Mat& image, const std::atomic<bool>& stop) {
  image.release();
  return pacer_.wait(stop);
}

std::string TickSource::describe() const {
  return fps_ > 0 ? "txt2img ticks at " + std::to_string(fps_) + " fps" : "txt2img ticks (paced by the model)";
}

}  // namespace sd
