#pragma once
// The bench's PNG chart, drawn from the JSON report with OpenCV (cv::rectangle / cv::putText, no other
// dependency): one panel per ablation (seconds per image of each step, with its speed-up over the naive path) and one
// panel of per-component times (median seconds, GFLOP/s and % of the ceiling). Builds without OpenCV
// (SD_ENGINE_ONLY) have no chart: chart_available() is false and write_chart throws InvalidArgument.
#include <string>

#include <nlohmann/json.hpp>

namespace sd::bench {

bool chart_available();
void write_chart(const nlohmann::json& report, const std::string& path);

}  // namespace sd::bench
