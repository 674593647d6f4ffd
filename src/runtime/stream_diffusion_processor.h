#pragma once
// sd::StreamDiffusion as a FrameProcessor: img2img on captured frames, or txt2img on ticks (`--input none`).
//
// Frame bookkeeping (spec §3.3): the call that takes frame k returns the images of the frames submitted n−1 calls
// earlier (F frames per call, F = frame_buffer_size). The processor keeps the inputs in flight in a queue and gives
// each output the index and capture time of the input it belongs to:
//  * warm-up: the first n−1 calls return decodes of the zero buffer ("brown" frames); they are not emitted;
//  * similarity filter skip: the pipeline does not advance; the skipped frame is emitted with the image of the frame
//    just before it (once that one is out), so outputs stay one per input and in input order;
//  * flush (end of input): the last input is fed again (txt2img: extra calls) with the filter off until every real
//    frame is out; the padding's own outputs are dropped and its entries stay queued as the next sequence's warm-up;
//  * a t_index_list change of length restarts the stream (buffers zeroed): the frames in flight are flushed first.
// Frames are batched F at a time; a partial batch at the end is padded with its last frame.
//
// ControlNets (the stream's set_controlnets): each has a ControlPreprocessor that makes its control image per frame on
// the pre-process thread — from the second source's frame when the runtime has one (--control-input), else from the
// input frame. With F > 1 the newest frame of a call gives the control image. `feedback` takes the previous output
// (the newest decoded image, warm-up frames included; black before the first) on the model thread.
//
// IP-Adapter image prompts from a source (Frame::image_prompt_rgb, --image-prompt-input): applied on the model thread
// before the frame's call, encoded only when the image differs from the current image prompt by more than
// image_prompt_change (mean absolute difference in uint8 levels; same size required) — a still image or a paused
// video is encoded once, a camera's sensor noise does not re-encode. With F > 1 the newest frame's image prompt rules.
#include <deque>
#include <memory>
#include <mutex>
#include <string>

#include "pipeline/stream_diffusion.h"
#include "runtime/control_preprocessor.h"
#include "runtime/frame_processor.h"

namespace sd {

class StreamDiffusionProcessor : public FrameProcessor {
 public:
  // `stream` must be prepared with `prompt` / `negative_prompt` (they are kept so either can change on its own).
  StreamDiffusionProcessor(std::shared_ptr<StreamDiffusion> stream, std::string prompt, std::string negative_prompt,
                           bool txt2img);

  int64_t width() const override { return width_; }
  int64_t height() const override { return height_; }
  bool takes_images() const override { return !txt2img_; }
  bool takes_image_prompts() const override { return stream_->models().ip_adapter() != nullptr; }
  torch::Tensor preprocess(const torch::Tensor& rgb_u8) override;
  // Leaves out the ControlNets that do not run (control_needs_), keeping the source for them (Frame::control_source).
  void preprocess_controls(Frame& frame, const torch::Tensor& input_rgb_u8,
                           const torch::Tensor& control_rgb_u8) override;
  std::vector<Frame> process(Frame in) override;
  std::vector<Frame> flush() override;
  torch::Tensor postprocess(const torch::Tensor& out) override;
  // On CUDA: starts the output's conversion and copy to pinned host memory (start_image_download).
  void begin_postprocess(Frame& out) override;
  std::vector<Frame> apply(const ControlCommand& command) override;
  // Frames, not stream calls: a skipped call answers frame_buffer_size frames (fewer in a padded last batch).
  int64_t skipped() const override { return skipped_frames_; }
  int64_t latency_frames() const override;
  std::string describe() const override;

  const StreamDiffusion& stream() const { return *stream_; }

  // One preprocessor per ControlNet of the stream (set_controlnets first). `control_source`: the runtime reads a
  // second source (its frames are preprocessed instead of the input). Without one, a txt2img stream has nothing to
  // preprocess: only `feedback` (or a control image set on the stream beforehand) is accepted. InvalidArgument
  // otherwise. Before the stream runs, or from the model thread ('control_preprocessor I NAME').
  void set_control_preprocessors(std::vector<std::shared_ptr<const ControlPreprocessor>> preprocessors,
                                 bool control_source);
  std::vector<std::shared_ptr<const ControlPreprocessor>> control_preprocessors() const;

  // Image prompts that differ from the current one by at most this mean absolute difference (uint8 levels, >= 0) are
  // not encoded again (default 1). Before the stream runs.
  void set_image_prompt_change(double levels);
  // The stream's initial image prompt (--image-prompt), so that a source image equal to it is not encoded again.
  void set_current_image_prompt(const torch::Tensor& rgb_u8);
  // Image prompts from frames that were not encoded (unchanged); the encodes are StreamStats::image_prompt_encodes.
  int64_t image_prompts_unchanged() const { return image_prompts_unchanged_; }

 private:
  enum class Kind { Real, Duplicate, Padding };
  struct Entry {
    Kind kind;
    Frame meta;  // index, capture time (no pixels)
  };

  // Runs the pipeline on batch_ (F frames, `pad` of which are padding) and emits what became ready.
  std::vector<Frame> run_batch(std::vector<Frame> batch, int64_t pad);
  void emit_ready(const torch::Tensor& images, std::vector<Frame>& outs);
  std::vector<Frame> flush_in_flight();
  void reset_warmup();
  int64_t real_pending() const;

  std::shared_ptr<StreamDiffusion> stream_;
  std::string prompt_, negative_prompt_;
  bool txt2img_;
  int64_t width_, height_, frames_per_call_;
  c10::ScalarType dtype_;
  c10::Device device_;

  std::vector<Frame> batch_;     // frames waiting for a full batch
  std::deque<Entry> in_flight_;  // submitted to the pipeline, output not yet emitted (oldest first)
  int64_t processed_pending_ = 0;  // Real + Padding entries in in_flight_ (the pipeline's delay line)
  torch::Tensor last_input_;     // [1, 3, H, W] the newest real frame (flush padding)
  torch::Tensor last_image_;     // [1, 3, H, W] the newest emitted image (duplicates)
  std::vector<Frame> carry_;     // outputs flushed by a refused command, emitted with the next call

  std::string describe_controls() const;
  void check_control_preprocessor(size_t index, const ControlPreprocessor& p) const;
  void set_feedback_controls();  // model thread, before a pipeline call
  // Model thread: which ControlNets get control images made (control_needs_): those that run at the stream's scale,
  // guidance range and steps, and any the stream has no image for yet or only one of an earlier preprocessor
  // (control_stale_), so that one turned on later always has one. The frames already preprocessed when it is turned on
  // get theirs made on the model thread, from Frame::control_source.
  void refresh_control_needs();
  std::vector<char> control_stale_;  // model thread: the preprocessor changed since the stream's image was made
  mutable std::mutex control_mutex_;  // preprocessors_, control_needs_ (read on the pre-process thread, changed on
                                      // the model thread)
  std::vector<std::shared_ptr<const ControlPreprocessor>> preprocessors_;
  std::vector<char> control_needs_;
  bool control_source_ = false;
  torch::Tensor last_output_;    // [1, 3, H, W] ≈[-1, 1] the newest decoded image (feedback)

  void apply_image_prompt(const torch::Tensor& rgb_u8);  // model thread
  double image_prompt_change_ = 1.0;
  torch::Tensor image_prompt_;   // uint8 [H, W, 3] the image prompt the stream holds (undefined: none / zero image)
  int64_t image_prompts_unchanged_ = 0;
  int64_t skipped_frames_ = 0;
};

}  // namespace sd
