// Image <-> tensor conversions (spec §7.1, §7.3).
#include "common/fixtures.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "pipeline/image.h"

namespace sd {
namespace {

TEST(Image, ToTensorIsU8Over255Times2Minus1) {
  auto img = torch::zeros({2, 4, 3}, torch::kUInt8);
  img[0][0][0] = 255;
  img[0][1][1] = 128;
  img[1][3][2] = 1;
  const auto x = image_to_tensor(img, 2, 4);
  ASSERT_EQ(x.sizes(), (std::vector<int64_t>{1, 3, 2, 4}));
  EXPECT_EQ(x.scalar_type(), torch::kFloat32);
  EXPECT_FLOAT_EQ(x[0][0][0][0].item<float>(), 1.0f);
  EXPECT_FLOAT_EQ(x[0][1][0][1].item<float>(), (128.0f / 255.0f) * 2.0f - 1.0f);
  EXPECT_FLOAT_EQ(x[0][2][1][3].item<float>(), (1.0f / 255.0f) * 2.0f - 1.0f);
  EXPECT_FLOAT_EQ(x[0][2][0][0].item<float>(), -1.0f);
}

TEST(Image, ToTensorMatchesPipelineInputImages) {
  // The fixture's model input is x = (u8.float32 / 255) * 2 - 1 of input_images; the TAESD module fixture's
  // encode.input holds images 0 and 3 mapped this way.
  if (!test::fixture_exists("pipeline/input_images.safetensors") ||
      !test::fixture_exists("modules/tiny-sd15/taesd.safetensors"))
    GTEST_SKIP() << "fixtures absent";
  const auto imgs = SafeTensorsFile::open(test::fixture_path("pipeline/input_images.safetensors"));
  const auto ref = SafeTensorsFile::open(test::fixture_path("modules/tiny-sd15/taesd.safetensors")).get("encode.input");
  const auto x = torch::cat({image_to_tensor(imgs.get("image0")), image_to_tensor(imgs.get("image3"))}, 0);
  EXPECT_TRUE(test::tensors_close(x, ref, 0.0, 0.0, "preprocessed images 0 and 3"));
}

TEST(Image, ToTensorErrorsNameTheExpectedShape) {
  const auto expect_msg = [](const torch::Tensor& t, int64_t h, int64_t w, const std::string& needle) {
    try {
      image_to_tensor(t, h, w);
      FAIL() << "accepted " << t.sizes();
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_msg(torch::zeros({8, 8, 4}, torch::kUInt8), 8, 8, "[H, W, 3]");
  expect_msg(torch::zeros({8, 8, 3}, torch::kFloat32), 8, 8, "uint8");
  expect_msg(torch::zeros({8, 8}, torch::kUInt8), 8, 8, "[H, W, 3]");
  expect_msg(torch::zeros({8, 16, 3}, torch::kUInt8), 8, 8, "W=8");
}

TEST(Image, ToImageClampsAndRoundsHalfToEven) {
  // x/2 + 0.5 = v/255 exactly for chosen values: x = 2*v/255 - 1
  auto x = torch::zeros({1, 3, 1, 4});
  x[0][0][0][0] = -3.0;                   // clamp -> 0
  x[0][0][0][1] = 3.0;                    // clamp -> 255
  x[0][1][0][0] = 2.0f * (0.5f / 255.0f) - 1.0f;   // 255*y ≈ 0.5 -> 0 (half to even) or 1 by float rounding
  x[0][2][0][0] = 0.0;                    // 127.5 -> 128 (even)
  const auto img = tensor_to_image(x);
  ASSERT_EQ(img.sizes(), (std::vector<int64_t>{1, 1, 4, 3}));
  EXPECT_EQ(img.scalar_type(), torch::kUInt8);
  EXPECT_EQ(img[0][0][0][0].item<int>(), 0);
  EXPECT_EQ(img[0][0][1][0].item<int>(), 255);
  EXPECT_EQ(img[0][0][0][2].item<int>(), 128);
  // independent computation: numpy-style rounding of float32 255*clamp(x/2+0.5)
  const float y = std::min(1.0f, std::max(0.0f, x[0][1][0][0].item<float>() / 2.0f + 0.5f));
  EXPECT_EQ(img[0][0][0][1].item<int>(), static_cast<int>(std::nearbyint(255.0f * y)));
  // 2.5 -> 2 and 3.5 -> 4 (half to even) on exact halves
  auto h = torch::tensor({2.5f / 255.0f, 3.5f / 255.0f}).view({1, 1, 1, 2}).repeat({1, 3, 1, 1}) * 2.0 - 1.0;
  const auto hi = tensor_to_image(h);
  const float y0 = h[0][0][0][0].item<float>() / 2.0f + 0.5f, y1 = h[0][0][0][1].item<float>() / 2.0f + 0.5f;
  EXPECT_EQ(hi[0][0][0][0].item<int>(), static_cast<int>(std::nearbyint(255.0f * y0)));
  EXPECT_EQ(hi[0][0][1][0].item<int>(), static_cast<int>(std::nearbyint(255.0f * y1)));
  EXPECT_THROW(tensor_to_image(torch::zeros({3, 4, 4})), InvalidArgument);
}

TEST(Image, SizeCheck) {
  EXPECT_NO_THROW(check_image_size(512, 512, "t"));
  EXPECT_NO_THROW(check_image_size(64, 48, "t"));
  EXPECT_THROW(check_image_size(500, 512, "t"), InvalidArgument);
  EXPECT_THROW(check_image_size(0, 512, "t"), InvalidArgument);
  try {
    check_image_size(513, 512, "--size");
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("multiples of 8"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("--size"), std::string::npos);
  }
}

TEST(Image, RoundTripOfPixels) {
  const auto img = torch::randint(0, 256, {5, 7, 3}, torch::kUInt8);
  // 7 is not a multiple of 8 but conversions do not care; only streams do.
  EXPECT_TRUE(torch::equal(tensor_to_image(image_to_tensor(img))[0], img));
}

// Frames onto the model's device (the runtime's and the server's upload): the values of the host conversion in the
// model's dtype, exactly (u8 / 255 * 2 - 1 is exact in float32 on either side, and the cast is the same). On a GPU
// host (SD_TEST_DEVICE=cuda) this is the pinned, side-stream upload; the result is then used on the default stream.
TEST(Image, ToDeviceTensorEqualsTheHostConversion) {
  const c10::Device device = test::test_device();
  const c10::ScalarType dtype = device.is_cpu() && test::test_dtype() == c10::kHalf ? c10::kFloat : test::test_dtype();
  const auto img = torch::randint(0, 256, {16, 24, 3}, torch::kUInt8);
  for (int frame = 0; frame < 3; ++frame) {
    const auto x = image_to_device_tensor(img, 16, 24, device, dtype);
    EXPECT_EQ(x.device().type(), device.type());
    EXPECT_EQ(x.scalar_type(), dtype);
    ASSERT_EQ(x.sizes(), (std::vector<int64_t>{1, 3, 16, 24}));
    const auto y = (x * 1).to(torch::kCPU);  // used on this thread's (the default) stream
    EXPECT_TRUE(torch::equal(y, image_to_tensor(img, 16, 24).to(dtype))) << "frame " << frame;
  }
  // The checks come before any copy, with image_to_tensor's message.
  try {
    image_to_device_tensor(img, 24, 16, device, dtype);
    ADD_FAILURE() << "wrong size accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("image is 24x16 (WxH) but the stream works at 16x24"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(image_to_device_tensor(torch::zeros({16, 24, 3}), 16, 24, device, dtype), InvalidArgument);
}

// start_image_download + get() gives tensor_to_image's pixels of the host copy (the conversion is exact float32 either
// way), on the host (pinned on CUDA), the same tensor on a second get(); downloads started back to back (as a model
// thread that runs ahead) each keep their own frame; bad shapes fail before anything is queued.
TEST(Image, DownloadEqualsTheHostConversion) {
  const c10::Device device = test::test_device();
  const c10::ScalarType dtype = device.is_cpu() && test::test_dtype() == c10::kHalf ? c10::kFloat : test::test_dtype();
  torch::manual_seed(5);
  std::vector<torch::Tensor> frames;
  std::vector<ImageDownload> downloads;
  for (int i = 0; i < 3; ++i) {
    frames.push_back((torch::randn({2, 3, 16, 24}) * 1.2).to(dtype));  // beyond [-1, 1]: the clamp counts
    downloads.push_back(start_image_download(frames.back().to(device) * 1));  // a fresh device tensor, as a frame's
  }
  for (int i = 0; i < 3; ++i) {
    const torch::Tensor& px = downloads[i].get();
    EXPECT_TRUE(px.is_cpu());
    if (device.is_cuda()) {
      EXPECT_TRUE(px.is_pinned());
    }
    ASSERT_EQ(px.sizes(), (std::vector<int64_t>{2, 16, 24, 3}));
    EXPECT_EQ(px.scalar_type(), torch::kUInt8);
    EXPECT_TRUE(torch::equal(px, tensor_to_image(frames[i]))) << "frame " << i;
    EXPECT_EQ(downloads[i].get().data_ptr(), px.data_ptr());
  }
  EXPECT_TRUE(torch::equal(tensor_to_image(frames[0].to(device)), tensor_to_image(frames[0])));
  EXPECT_THROW(start_image_download(torch::zeros({1, 4, 8, 8}, torch::TensorOptions().device(device))),
               InvalidArgument);
  EXPECT_THROW(start_image_download(torch::zeros({1, 3, 8, 8}, torch::kUInt8)), InvalidArgument);
}

}  // namespace
}  // namespace sd
