#include "fleet_imports.h"

#include <fmt/core.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <vector>

#include "format.h"

namespace ebb::cli {

namespace {

std::string read_text(const std::string& path, bool* ok) {
  std::ifstream in(path);
  *ok = static_cast<bool>(in);
  std::ostringstream text;
  if (*ok) text << in.rdbuf();
  return text.str();
}

// The worker's <base>.<pid>.jsonl: one JSON object per line; a line being
// written as we read (no newline yet) is left for the next time.
nlohmann::json worker_lines(const std::string& path) {
  nlohmann::json lines = nlohmann::json::array();
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (in.eof()) break;  // no newline: not complete
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.is_object()) lines.push_back(j);
  }
  return lines;
}

uint64_t live_of(const nlohmann::json& j) {
  const auto& v = j.value("live", nlohmann::json());
  return v.is_number_integer() && v.get<int64_t>() > 0 ? v.get<uint64_t>() : 0;
}

}  // namespace

bool add_imports(nlohmann::json& fleet, std::string* why) {
  if (!fleet.contains("zygote") || !fleet["zygote"].contains("imports")) {
    *why =
        "this fleet has no fork server: the import trees need `ebb run --preload MODULES --status-socket PATH` "
        "(or it is being restarted)";
    return false;
  }
  const std::string base = fleet["zygote"]["imports"].get<std::string>();
  bool ok = false;
  const std::string text = read_text(base + ".json", &ok);
  if (!ok) {
    *why = "the fork server has not written its import tree yet (" + base + ".json): is it still importing?";
    return false;
  }
  auto preload = nlohmann::json::parse(text, nullptr, false);
  if (preload.is_discarded()) {
    *why = base + ".json is not JSON";
    return false;
  }
  nlohmann::json workers = nlohmann::json::object();
  for (const auto& w : fleet["workers"]) {
    const std::string pid = std::to_string(w["pid"].get<int>());
    std::string path = base;
    path.append(".").append(pid).append(".jsonl");
    workers[pid] = worker_lines(path);
  }
  fleet["imports"] = {{"preload", preload}, {"workers", workers}};
  return true;
}

void print_imports(const nlohmann::json& fleet) {
  const auto& imports = fleet["imports"];
  const auto& preload = imports["preload"];
  fmt::print("\nImported by the fork server before the fork, shared by every worker:\n");
  if (preload.contains("error")) {
    fmt::print("  not measured: {} (the import trees need libebb's counters)\n", preload["error"].get<std::string>());
    return;  // the workers' imports were not measured either
  }
  {
    bool ok = false;
    const std::string text = read_text(fleet["zygote"]["imports"].get<std::string>() + ".txt", &ok);
    fmt::print("{}", ok ? text : "  (the text form is missing; --json has the tree)\n");
  }
  fmt::print("\nImported by each worker after the fork, its own copy:\n");
  Table t({"WORKER", "PID", "MODULES", "LIVE", "LARGEST"}, {true, true, true, true, false});
  for (const auto& w : fleet["workers"]) {
    const std::string pid = std::to_string(w["pid"].get<int>());
    const nlohmann::json mine = imports["workers"].value(pid, nlohmann::json::array());
    std::vector<nlohmann::json> lines(mine.begin(), mine.end());
    uint64_t modules = 0, live = 0;
    for (const auto& l : lines) {
      modules += l.value("modules", 0UL);
      live += live_of(l);
    }
    std::sort(lines.begin(), lines.end(), [](const auto& a, const auto& b) { return live_of(a) > live_of(b); });
    std::string largest;
    for (size_t i = 0; i < lines.size() && i < 3; i++)
      largest += fmt::format("{}{} ({})", i ? ", " : "", lines[i].value("name", std::string("?")),
                             human_bytes(live_of(lines[i])));
    if (lines.size() > 3) largest += ", ...";
    const std::string id = w["state"] == "master" ? "master" : std::to_string(w["id"].get<int>());
    t.add({id, pid, std::to_string(modules), human_bytes(live), largest.empty() ? "-" : largest});
  }
  fmt::print("{}", t.render());
}

}  // namespace ebb::cli
