// Names for native return addresses, read at report time from the ELF files
// of the objects a capture names (their .symtab, else .dynsym).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace ebb::profile {

struct NativeModule {  // a ModuleRecord (capture_format.h)
  std::string path;
  uint64_t base = 0;              // what the file's addresses are offset by
  uint64_t start = 0, end = 0;    // where it was loaded
  bool self = false;              // libebb
  std::vector<uint8_t> build_id;  // empty if it had none
};

class Symbols {
 public:
  // The function holding return address `pc` of module `m`, demangled; ""
  // when the file is gone, is not the one that ran (build id), or has no
  // symbol there.
  std::string function(const NativeModule& m, uint64_t pc);

 private:
  struct Symbol {
    uint64_t value, size;
    std::string name;
  };
  struct File {
    bool usable = false;
    std::vector<Symbol> symbols;  // by value
  };
  const File& file(const NativeModule& m);
  std::map<std::string, std::unique_ptr<File>> files_;
};

}  // namespace ebb::profile
