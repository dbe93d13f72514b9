#include "plot.h"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <fstream>

namespace ebb::cli {

namespace {

constexpr double kWidth = 1000, kHeight = 540;
constexpr double kLeft = 80, kRight = 230, kTop = 50, kBottom = 60;
// Colour-blind-safe palette (Okabe-Ito), one per allocator.
const char* const kColours[] = {"#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"};

std::string escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '&')
      o += "&amp;";
    else if (c == '<')
      o += "&lt;";
    else if (c == '>')
      o += "&gt;";
    else if (c == '"')
      o += "&quot;";
    else
      o += c;
  }
  return o;
}

// A "nice" tick step (1, 2 or 5 times a power of ten) for about `ticks` ticks.
double nice_step(double range, int ticks) {
  if (range <= 0) return 1;
  double raw = range / ticks;
  double mag = std::pow(10, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (raw <= m * mag) return m * mag;
  return 10 * mag;
}

std::string tick_label(double v, double step) {
  return step >= 1 ? fmt::format("{:.0f}", v) : step >= 0.1 ? fmt::format("{:.1f}", v) : fmt::format("{:.2f}", v);
}

}  // namespace

std::string render_svg(const std::string& title, const std::string& y_label, const std::vector<Series>& series) {
  double max_t = 0, max_mb = 0;
  for (const auto& s : series)
    for (const auto& p : s.samples) {
      max_t = std::max(max_t, p.t);
      max_mb = std::max(max_mb, static_cast<double>(p.bytes) / 1048576.0);
    }
  if (max_t <= 0) max_t = 1;
  if (max_mb <= 0) max_mb = 1;
  const double step_t = nice_step(max_t, 8), step_mb = nice_step(max_mb, 6);
  const double top_t = std::ceil(max_t / step_t) * step_t, top_mb = std::ceil(max_mb * 1.02 / step_mb) * step_mb;
  const double pw = kWidth - kLeft - kRight, ph = kHeight - kTop - kBottom;
  auto x = [&](double t) { return kLeft + t / top_t * pw; };
  auto y = [&](double mb) { return kTop + ph - mb / top_mb * ph; };

  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
      "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" font-size=\"13\">\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{2}\" y=\"28\" font-size=\"16\" font-weight=\"bold\">{3}</text>\n",
      kWidth, kHeight, kLeft, escape(title.size() > 90 ? title.substr(0, 87) + "..." : title));
  // Grid and ticks.
  for (double v = 0; v <= top_mb + step_mb / 2; v += step_mb)
    svg += fmt::format(
        "<line x1=\"{0}\" y1=\"{1:.1f}\" x2=\"{2}\" y2=\"{1:.1f}\" stroke=\"#ddd\"/>"
        "<text x=\"{3}\" y=\"{4:.1f}\" text-anchor=\"end\">{5}</text>\n",
        kLeft, y(v), kLeft + pw, kLeft - 8, y(v) + 4, tick_label(v, step_mb));
  for (double v = 0; v <= top_t + step_t / 2; v += step_t)
    svg += fmt::format(
        "<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#eee\"/>"
        "<text x=\"{0:.1f}\" y=\"{3}\" text-anchor=\"middle\">{4}</text>\n",
        x(v), kTop, kTop + ph, kTop + ph + 20, tick_label(v, step_t));
  svg += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333\"/>\n", kLeft,
                     kTop, pw, ph);
  svg +=
      fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">time (s)</text>\n", kLeft + pw / 2, kHeight - 15);
  svg += fmt::format("<text transform=\"translate(22 {:.1f}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
                     kTop + ph / 2, escape(y_label));
  // Curves and legend.
  for (size_t i = 0; i < series.size(); i++) {
    const char* colour = kColours[i % (sizeof kColours / sizeof kColours[0])];
    std::string points;
    for (const auto& p : series[i].samples)
      points += fmt::format("{:.1f},{:.1f} ", x(p.t), y(static_cast<double>(p.bytes) / 1048576.0));
    svg += fmt::format(
        "<polyline class=\"series\" data-name=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\" "
        "points=\"{}\"/>\n",
        escape(series[i].name), colour, points);
    uint64_t peak = 0;
    for (const auto& p : series[i].samples) peak = std::max(peak, p.bytes);
    double ly = kTop + 10 + static_cast<double>(i) * 24;
    double lx = kLeft + pw + 15;
    svg += fmt::format(
        "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"{3}\" stroke-width=\"3\"/>"
        "<text class=\"legend\" x=\"{4}\" y=\"{5}\">{6} (peak {7:.0f} MB)</text>\n",
        lx, ly, lx + 22, colour, lx + 28, ly + 4, escape(series[i].name), static_cast<double>(peak) / 1048576.0);
  }
  svg += "</svg>\n";
  return svg;
}

bool write_plot(const std::string& path, const std::string& title, const std::string& y_label,
                const std::vector<Series>& series, const std::string& table, std::string* err) {
  auto ends_with = [&](const char* ext) {
    std::string e(ext);
    return path.size() >= e.size() && path.compare(path.size() - e.size(), e.size(), e) == 0;
  };
  std::string svg = render_svg(title, y_label, series);
  std::string text;
  if (ends_with(".svg")) {
    text = svg;
  } else if (ends_with(".html") || ends_with(".htm")) {
    text = "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>" + escape(title) +
           "</title>\n<style>body{font-family:sans-serif;margin:2em}pre{font-size:13px}</style></head>\n<body>\n" +
           svg + "<pre>" + escape(table) + "</pre>\n</body></html>\n";
  } else {
    *err = "--plot " + path + ": want a .svg or .html file";
    return false;
  }
  std::ofstream f(path);
  f << text;
  if (!f) {
    *err = "cannot write " + path;
    return false;
  }
  return true;
}

}  // namespace ebb::cli
