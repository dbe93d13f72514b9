#include "format.h"

#include <fmt/core.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace ebb::cli {

std::string human_bytes(uint64_t bytes) {
  static const char* units[] = {"B", "K", "M", "G", "T", "P"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 5) {
    v /= 1024;
    u++;
  }
  if (u == 0) return fmt::format("{}B", bytes);
  return fmt::format("{:.1f}{}", v, units[u]);
}

bool parse_size(const std::string& text, uint64_t* out) {
  if (text.empty()) return false;
  char* end = nullptr;
  double v = strtod(text.c_str(), &end);
  if (end == text.c_str() || v < 0 || !std::isfinite(v)) return false;
  std::string unit(end);
  std::transform(unit.begin(), unit.end(), unit.begin(), [](unsigned char c) { return std::tolower(c); });
  if (unit.size() > 1 && unit.back() == 'b') unit.pop_back();  // "MB", "MiB"
  if (unit.size() == 2 && unit[1] == 'i') unit.pop_back();     // "Mi"
  double mult = 1;
  if (unit.empty() || unit == "b")
    mult = 1;
  else if (unit == "k")
    mult = 1024.0;
  else if (unit == "m")
    mult = 1024.0 * 1024;
  else if (unit == "g")
    mult = 1024.0 * 1024 * 1024;
  else if (unit == "t")
    mult = 1024.0 * 1024 * 1024 * 1024;
  else
    return false;
  double bytes = v * mult;
  if (bytes > 1.8e19) return false;
  *out = static_cast<uint64_t>(std::llround(bytes));
  return true;
}

bool parse_duration(const std::string& text, double* seconds) {
  if (text.empty()) return false;
  char* end = nullptr;
  double v = strtod(text.c_str(), &end);
  if (end == text.c_str() || v < 0 || !std::isfinite(v)) return false;
  std::string unit(end);
  double mult;
  if (unit.empty() || unit == "s")
    mult = 1;
  else if (unit == "ms")
    mult = 0.001;
  else if (unit == "m" || unit == "min")
    mult = 60;
  else if (unit == "h")
    mult = 3600;
  else if (unit == "d")
    mult = 86400;
  else
    return false;
  *seconds = v * mult;
  return true;
}

namespace {

// Columns on screen: UTF-8 continuation bytes take none (every character
// ebb prints is one column wide).
size_t display_width(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

// The longest prefix of s that fits `width` columns, never cutting a character.
std::string fit(const std::string& s, size_t width) {
  size_t cols = 0, i = 0;
  for (; i < s.size(); i++) {
    if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80) {
      if (cols == width) break;
      cols++;
    }
  }
  return s.substr(0, i);
}

}  // namespace

Table::Table(std::vector<std::string> headers, std::vector<bool> numeric)
    : headers_(std::move(headers)), numeric_(std::move(numeric)) {}

void Table::add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
void Table::add_rule() { rows_.emplace_back(); }

std::string Table::render(size_t max_width) const {
  std::vector<size_t> width(headers_.size());
  for (size_t c = 0; c < headers_.size(); c++) width[c] = display_width(headers_[c]);
  for (const auto& r : rows_)
    for (size_t c = 0; c < r.size() && c < width.size(); c++) width[c] = std::max(width[c], display_width(r[c]));
  auto line = [&](const std::vector<std::string>& r) {
    std::string out;
    for (size_t c = 0; c < headers_.size(); c++) {
      const std::string& cell = c < r.size() ? r[c] : std::string();
      bool last = c + 1 == headers_.size();
      size_t pad = width[c] - display_width(cell);
      if (numeric_[c])
        out += std::string(pad, ' ') + cell;
      else
        out += last ? cell : cell + std::string(pad, ' ');
      if (!last) out += "  ";
    }
    if (max_width > 0) out = fit(out, max_width);
    while (!out.empty() && out.back() == ' ') out.pop_back();
    return out + "\n";
  };
  std::string out = line(headers_);
  // The rule spans the columns, the last one (free text) only as far as its header.
  size_t total = 0;
  for (size_t c = 0; c < width.size(); c++) {
    bool last = c + 1 == width.size();
    total += (last && !numeric_[c] ? headers_[c].size() : width[c]) + (c ? 2 : 0);
  }
  if (max_width > 0) total = std::min(total, max_width);
  for (const auto& r : rows_) out += r.empty() ? std::string(total, '-') + "\n" : line(r);
  return out;
}

void error(const std::string& cmd, const std::string& message) { fmt::print(stderr, "ebb {}: {}\n", cmd, message); }

}  // namespace ebb::cli
