// Software 16-bit float types shared by the MSL and CUDA shims.
#pragma once

#include <cstdint>
#include <cstring>

typedef _Float16 emu_half;  // IEEE binary16; g++ rounds after each operation

// bfloat: the top 16 bits of a float; conversions round to nearest even, like Metal's bfloat and CUDA's
// __float2bfloat16.
struct bfloat {
  uint16_t bits;
  bfloat() = default;
  static uint16_t round(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  // quiet NaN
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  bfloat(float f) : bits(round(f)) {}
  bfloat(double f) : bfloat((float)f) {}
  bfloat(int i) : bfloat((float)i) {}
  bfloat(emu_half h) : bfloat((float)h) {}
  operator float() const {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
#define EMU_BF_OP(op)                                                                    \
  inline bfloat operator op(bfloat a, bfloat b) { return bfloat((float)a op(float) b); } \
  inline bfloat& operator op##=(bfloat& a, bfloat b) { return a = a op b; }
EMU_BF_OP(+)
EMU_BF_OP(-)
EMU_BF_OP(*)
EMU_BF_OP(/)
#undef EMU_BF_OP
inline bfloat operator-(bfloat a) { return bfloat(-(float)a); }

