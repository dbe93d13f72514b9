#include "symbols.h"

#include <cxxabi.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace ebb::profile {

namespace {

// A file mapped read-only for as long as it is read.
struct Mapped {
  const uint8_t* data = nullptr;
  size_t size = 0;
  explicit Mapped(const std::string& path) {
    const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    struct stat st {};
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0) {
      void* m = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
      if (m != MAP_FAILED) {
        data = static_cast<const uint8_t*>(m);
        size = static_cast<size_t>(st.st_size);
      }
    }
    close(fd);
  }
  ~Mapped() {
    if (data != nullptr) munmap(const_cast<uint8_t*>(data), size);
  }
  Mapped(const Mapped&) = delete;
  Mapped& operator=(const Mapped&) = delete;
  // The bytes [off, off + n), or nullptr if the file is shorter.
  const uint8_t* at(uint64_t off, uint64_t n) const { return off <= size && n <= size - off ? data + off : nullptr; }
};

std::string demangle(const char* name) {
  if (name[0] != '_' || name[1] != 'Z') return name;
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  if (d == nullptr) return name;
  std::string out = d;
  std::free(d);
  return out;
}

std::vector<uint8_t> build_id_of(const Mapped& f, const Elf64_Shdr* sections, size_t count) {
  for (size_t i = 0; i < count; i++) {
    if (sections[i].sh_type != SHT_NOTE) continue;
    const uint8_t* p = f.at(sections[i].sh_offset, sections[i].sh_size);
    if (p == nullptr) continue;
    const uint8_t* end = p + sections[i].sh_size;
    while (static_cast<size_t>(end - p) >= sizeof(Elf64_Nhdr)) {
      Elf64_Nhdr nh;
      std::memcpy(&nh, p, sizeof nh);
      const uint64_t name_at = sizeof nh, desc_at = name_at + ((uint64_t{nh.n_namesz} + 3) & ~uint64_t{3});
      if (desc_at + nh.n_descsz > static_cast<size_t>(end - p)) break;
      if (nh.n_type == NT_GNU_BUILD_ID && nh.n_namesz == 4 && std::memcmp(p + name_at, "GNU", 4) == 0)
        return {p + desc_at, p + desc_at + nh.n_descsz};
      // The padding may run past a section whose size is not a multiple of 4.
      const uint64_t step = desc_at + ((uint64_t{nh.n_descsz} + 3) & ~uint64_t{3});
      if (step >= static_cast<size_t>(end - p)) break;
      p += step;
    }
  }
  return {};
}

}  // namespace

namespace {

const Elf64_Ehdr* elf_header(const Mapped& f) {
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(f.at(0, sizeof(Elf64_Ehdr)));
  if (eh == nullptr || std::memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
      eh->e_shentsize != sizeof(Elf64_Shdr))
    return nullptr;
  return eh;
}

const Elf64_Shdr* section_headers(const Mapped& f, const Elf64_Ehdr* eh) {
  return reinterpret_cast<const Elf64_Shdr*>(f.at(eh->e_shoff, uint64_t{eh->e_shnum} * sizeof(Elf64_Shdr)));
}

// The functions of .symtab, else of .dynsym (a .symtab has everything .dynsym has).
template <typename Symbol>
void read_functions(const Mapped& f, std::vector<Symbol>* out) {
  const Elf64_Ehdr* eh = elf_header(f);
  const Elf64_Shdr* sections = eh != nullptr ? section_headers(f, eh) : nullptr;
  if (sections == nullptr) return;
  for (const uint32_t type : {SHT_SYMTAB, SHT_DYNSYM}) {
    for (size_t i = 0; i < eh->e_shnum; i++) {
      const Elf64_Shdr& s = sections[i];
      if (s.sh_type != type || s.sh_entsize != sizeof(Elf64_Sym) || s.sh_link >= eh->e_shnum) continue;
      const auto* syms = reinterpret_cast<const Elf64_Sym*>(f.at(s.sh_offset, s.sh_size));
      const Elf64_Shdr& strtab = sections[s.sh_link];
      const auto* strings = reinterpret_cast<const char*>(f.at(strtab.sh_offset, strtab.sh_size));
      if (syms == nullptr || strings == nullptr) continue;
      for (size_t k = 0; k < s.sh_size / sizeof(Elf64_Sym); k++) {
        const Elf64_Sym& sym = syms[k];
        const unsigned kind = ELF64_ST_TYPE(sym.st_info);
        if ((kind != STT_FUNC && kind != STT_GNU_IFUNC) || sym.st_value == 0 || sym.st_name >= strtab.sh_size) continue;
        const char* name = strings + sym.st_name;
        if (std::memchr(name, 0, strtab.sh_size - sym.st_name) == nullptr) continue;
        out->push_back({sym.st_value, sym.st_size, demangle(name)});
      }
    }
    if (!out->empty()) return;
  }
}

// Where Debian's -dbgsym packages put a file's symbols: by its build id.
std::string debug_file(const std::vector<uint8_t>& id) {
  if (id.size() < 2) return "";
  static const char* hex = "0123456789abcdef";
  std::string path = "/usr/lib/debug/.build-id/";
  for (size_t i = 0; i < id.size(); i++) {
    path += hex[id[i] >> 4];
    path += hex[id[i] & 15];
    if (i == 0) path += '/';
  }
  return path + ".debug";
}

}  // namespace

const Symbols::File& Symbols::file(const NativeModule& m) {
  auto& slot = files_[m.path];
  if (slot) return *slot;
  slot = std::make_unique<File>();
  File& out = *slot;
  if (m.path.empty() || m.path[0] != '/') return out;  // the vdso, or a name the loader was given
  const Mapped f(m.path);
  const Elf64_Ehdr* eh = elf_header(f);
  const Elf64_Shdr* sections = eh != nullptr ? section_headers(f, eh) : nullptr;
  if (sections == nullptr) return out;
  // A file rebuilt or upgraded since the capture would give wrong names.
  const std::vector<uint8_t> id = build_id_of(f, sections, eh->e_shnum);
  if (!m.build_id.empty() && id != m.build_id) return out;
  out.usable = true;
  // Installed debug symbols name the static functions too (a stripped
  // program's .dynsym has only what it exports).
  const Mapped debug(debug_file(id));
  read_functions(debug, &out.symbols);
  if (out.symbols.empty()) read_functions(f, &out.symbols);
  std::sort(out.symbols.begin(), out.symbols.end(), [](const Symbol& a, const Symbol& b) { return a.value < b.value; });
  return out;
}

std::string Symbols::function(const NativeModule& m, uint64_t pc) {
  const File& f = file(m);
  if (!f.usable || f.symbols.empty()) return "";
  // A return address is just past its call: the call is one byte before.
  const uint64_t at = pc - 1 - m.base;
  auto it =
      std::upper_bound(f.symbols.begin(), f.symbols.end(), at, [](uint64_t v, const Symbol& s) { return v < s.value; });
  if (it == f.symbols.begin()) return "";
  --it;
  // A symbol of unknown size holds everything up to the next one.
  if (it->size != 0 && at >= it->value + it->size) return "";
  return it->name;
}

}  // namespace ebb::profile
