// ebb ps --fleet --imports: the import tree of the fork server of
// `ebb run --preload`, and what each worker imported after the fork
// (docs/imports.md).
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace ebb::cli {

// Adds "imports" to a fleet's status: {"preload": the fork server's report
// (ebb/imports.py's build()), "workers": {"PID": [one object per import that
// ended at the top, after the fork]}}. False, with *why, when the fleet has
// no tree to read.
bool add_imports(nlohmann::json& fleet, std::string* why);

// The text form of what add_imports() added.
void print_imports(const nlohmann::json& fleet);

}  // namespace ebb::cli
