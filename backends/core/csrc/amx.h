// AMX (Intel's tile matrix unit) helpers shared by our kernels: the tile configuration and the
// per-process permission the Linux kernel asks for before a process may use the tile state.
// Included only where the compiler targets AMX-BF16 (DISTSERVE_AMX).
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace distserve {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The kernel must allow this process the tile state (asked once; false where refused: the
// callers then take their AVX-512 paths).
inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}

// ldtilecfg. GCC's _tile_loadconfig tells the compiler it reads only the first 8 bytes of the
// configuration, so stores to the rest may be dropped as dead (seen: every colsb left 0, and
// ldtilecfg faulting): a compiler barrier first makes them land.
inline void load_config(const TileConfig& cfg) {
  asm volatile("" ::: "memory");
  _tile_loadconfig(&cfg);
}

// All eight tiles 16 rows x 64 bytes (16 x 32 bf16, or 16 x 16 float).
inline void load_square_tiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  load_config(cfg);
}

}  // namespace distserve
