#pragma once
// The activation layouts an autoencoder (AutoencoderTiny, AutoencoderKL) runs in on the CPU (models/conv_layout.h), for
// the golden tests to check each against the reference.
#include <string>

#include <gtest/gtest.h>

#include "models/conv_layout.h"

namespace sd::test {

// Calls check(label) with `model` (on the CPU, loaded without a layout of its own) in each layout: the dtype rule,
// each layout forced for every dtype (the bench's other-layout rows), then each set on the model itself (weights
// converted, as on CUDA). Expects NCHW weights until then, and channels_last() to report each layout.
template <class Model, class Check>
void for_each_cpu_layout(Model& model, const Check& check) {
  for (const auto& p : model->parameters()) {
    if (p.dim() == 4) {
      EXPECT_TRUE(p.is_contiguous());
    }
  }
  for (int forced : {-1, 1, 0}) {
    sd::nn::ScopedCpuChannelsLast layout(forced);
    const bool cl = forced < 0 ? sd::nn::cpu_channels_last(model->dtype()) : forced == 1;
    EXPECT_EQ(model->channels_last(), cl);
    check(std::string(forced < 0 ? " (CPU rule: " : " (CPU forced: ") + (cl ? "channels-last)" : "NCHW)"));
  }
  for (bool cl : {true, false}) {
    model->set_channels_last(cl);
    EXPECT_EQ(model->channels_last(), cl);
    check(cl ? " (channels-last weights)" : " (NCHW weights)");
  }
}

}  // namespace sd::test
