// The shared text helpers (core/text.h) every option-list and caption-list parser goes through.
#include <gtest/gtest.h>

#include "core/text.h"

namespace {

using V = std::vector<std::string>;

TEST(TextSplit, DropsEmptyFieldsByDefault) {
  EXPECT_EQ(sd::split("256,512", ','), (V{"256", "512"}));
  EXPECT_EQ(sd::split(",a,,b,", ','), (V{"a", "b"}));
  EXPECT_EQ(sd::split("one", ','), (V{"one"}));
  EXPECT_TRUE(sd::split("", ',').empty());
  EXPECT_TRUE(sd::split(",,,", ',').empty());
  // Only the separator cuts: spaces stay part of a field.
  EXPECT_EQ(sd::split("red apple; cat face", ';'), (V{"red apple", " cat face"}));
}

TEST(TextSplit, KeepEmptyKeepsEveryPositionIncludingATrailingOne) {
  EXPECT_EQ(sd::split("a;;b;", ';', true), (V{"a", "", "b", ""}));
  EXPECT_EQ(sd::split(";", ';', true), (V{"", ""}));
  EXPECT_EQ(sd::split("x", ';', true), (V{"x"}));
  EXPECT_TRUE(sd::split("", ';', true).empty());
  EXPECT_EQ(sd::split("model.diffusion_model.out.2.weight", '.', true),
            (V{"model", "diffusion_model", "out", "2", "weight"}));
}

TEST(TextTrim, StripsSpacesTabsAndLineEndsAtBothEnds) {
  EXPECT_EQ(sd::trim("  prompt red apple \t\r\n"), "prompt red apple");
  EXPECT_EQ(sd::trim("inner  spaces kept"), "inner  spaces kept");
  EXPECT_EQ(sd::trim(" \t\r\n"), "");
  EXPECT_EQ(sd::trim(""), "");
}

}  // namespace
