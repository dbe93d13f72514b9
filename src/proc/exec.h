// argv/envp for execve from strings, shared by everything that starts
// commands (ebb compare, ebb run).
#pragma once

#include <string>
#include <vector>

namespace ebb::proc {

// Pointers into `strings` (which must outlive them), null-terminated.
inline std::vector<char*> c_strings(std::vector<std::string>& strings) {
  std::vector<char*> out;
  out.reserve(strings.size() + 1);
  for (auto& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

}  // namespace ebb::proc
