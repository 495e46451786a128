/* IEEE binary16 -> binary32, shared by lmmlab's C kernels (kv/csrc/kivi_attention.c, models/csrc/sparse_matvec.c).
 * Included after <stdint.h> and <string.h>. */
#ifndef LMMLAB_HALF_H
#define LMMLAB_HALF_H

static inline float half_to_float(uint16_t h) {
#if defined(__FLT16_MAX__) /* the compiler has _Float16 (GCC 12+, recent clang) */
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
#else /* IEEE binary16 -> binary32 by hand */
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    uint32_t bits;
    float f;
    if (exponent == 0) { /* zero or subnormal: mantissa · 2^-24 */
        f = (float)mantissa * (1.0f / 16777216.0f);
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
#endif
}

#endif
