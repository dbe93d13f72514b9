// Every subcommand registers itself on the top-level CLI11 app; the callback
// stores the subcommand's exit status in `rc`.
#pragma once

#include <CLI/CLI.hpp>

namespace ebb::cli {

void register_ps(CLI::App& app, int& rc);
void register_trim(CLI::App& app, int& rc);
void register_top(CLI::App& app, int& rc);
void register_compare(CLI::App& app, int& rc);
void register_run(CLI::App& app, int& rc);
void register_profile(CLI::App& app, int& rc);
void register_imports(CLI::App& app, int& rc);

}  // namespace ebb::cli
