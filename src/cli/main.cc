// ebb: see and control the memory of Python worker fleets.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>

#include "commands.h"

static int run(int argc, char** argv) {
  CLI::App app{"ebb: keep long-running Python worker fleets lean.\nSee docs/ for a page per command."};
  app.name("ebb");
  app.set_version_flag("--version", "ebb " EBB_VERSION_STRING);
  app.require_subcommand(1);
  app.fallthrough(false);
  int rc = 0;
  ebb::cli::register_ps(app, rc);
  ebb::cli::register_top(app, rc);
  ebb::cli::register_trim(app, rc);
  ebb::cli::register_compare(app, rc);
  ebb::cli::register_run(app, rc);
  ebb::cli::register_profile(app, rc);
  ebb::cli::register_imports(app, rc);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? 0 : 2;  // usage errors: exit status 2, as getopt tools do
  }
  return rc;
}

int main(int argc, char** argv) {
  // The commands report their own errors; what escapes them (out of memory,
  // a library's exception) ends the program with one line, not an abort.
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ebb: %s\n", e.what());
    return 1;
  }
}
