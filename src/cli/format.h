// Output helpers shared by the subcommands: human sizes, tables, errors.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ebb::cli {

// 1536 -> "1.5K", 3 GiB -> "3.0G"; binary units, as ps/top/smem print them.
std::string human_bytes(uint64_t bytes);

// Parses "512M", "2G", "1.5GiB", "1048576" into bytes; false on bad input.
bool parse_size(const std::string& text, uint64_t* out);

// Parses "30", "30s", "500ms", "5m", "2h", "1d", "1.5m" into seconds
// (a bare number is seconds); false on bad input or a negative value.
bool parse_duration(const std::string& text, double* seconds);

// A left/right aligned text table; columns marked numeric are right-aligned.
class Table {
 public:
  explicit Table(std::vector<std::string> headers, std::vector<bool> numeric);
  void add(std::vector<std::string> row);
  void add_rule();
  std::string render(size_t max_width = 0) const;

 private:
  std::vector<std::string> headers_;
  std::vector<bool> numeric_;
  std::vector<std::vector<std::string>> rows_;  // an empty row is a rule
};

// "ebb <cmd>: <message>" on stderr.
void error(const std::string& cmd, const std::string& message);

}  // namespace ebb::cli
