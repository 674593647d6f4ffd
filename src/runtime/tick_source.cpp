#include "runtime/tick_source.h"

namespace sd {

// The pacer refuses a negative, NaN or too small rate (open_source() already did, naming --input-fps).
TickSource::TickSource(double fps) : fps_(fps), pacer_(fps) {}

bool TickSource::read(cv::Mat& image, const std::atomic<bool>& stop) {
  image.release();
  return pacer_.wait(stop);
}

std::string TickSource::describe() const {
  return fps_ > 0 ? "txt2img ticks at " + std::to_string(fps_) + " fps" : "txt2img ticks (paced by the model)";
}

}  // namespace sd
