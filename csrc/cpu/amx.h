#pragma once
// AMX tile plumbing shared by the tile kernels (amx_linear.cpp, amx_attention.h): built only with the
// AMX-BF16 and AVX512-BF16 flags (setup.py adds them where the CPU has them).

#include "vec.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define PAGEDLM_AMX 1

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string_view>

namespace pagedlm::cpu::amx {

// The 64-byte operand of ldtilecfg (Intel SDM, LDTILECFG): palette 1, per tile its rows and bytes per row.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};

  void set(int tile, int rows_, int colsb_) {
    rows[tile] = static_cast<uint8_t>(rows_);
    colsb[tile] = static_cast<uint16_t>(colsb_);
  }

  // ldtilecfg through an asm memory operand: GCC 12 treats _tile_loadconfig's operand as unread and
  // drops the stores that filled it (seen here: the tiles kept palette 1's all-zero shapes).
  void load() const { asm volatile("ldtilecfg %0" : : "m"(*this)); }
};

// Whether the tile kernels run: Linux hands AMX state to a process only on request (arch_prctl
// ARCH_REQ_XCOMP_PERM, XTILEDATA); PAGEDLM_DISABLE_AMX=1 keeps the AVX-512 kernels (read once;
// pagedlm.ops refuses values other than 0 and 1 before the extension loads).
inline bool permitted() {
  static const bool granted = [] {
    const char* disable = std::getenv("PAGEDLM_DISABLE_AMX");
    if (disable != nullptr && std::string_view(disable) == "1") return false;
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return granted;
}

}  // namespace pagedlm::cpu::amx

#endif
