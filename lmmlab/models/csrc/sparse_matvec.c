/* Products with a pruned linear kept compressed (lmmlab.models.sparse_linear), without ever building its dense weight.

   Layout of W [R, C] with Z kept (non-zero) weights:
       mask     uint8 [R, P]   bit (j mod 8) of byte (j div 8) of row r is 1 where W[r, j] is kept; P = row bytes, a
                               multiple of 8 (rows padded with 0 bits to whole 64-column words)
       vals     [Z + pad]      the kept weights row by row, fp32, fp16 or bf16 (`kind`); at least VALUE_PAD elements
                               past the last one may be read (never used), so vector loads need no tail
       offsets  int64 [R + 1]  where row r starts in vals (offsets[R] = Z)
   sparse_matvec:  y[b, r] = Σ_{j kept in row r} W[r, j]·x[b, j]  for b < B ≤ 4 (decode tokens), x fp32 [B, ldx] with
                   ldx ≥ 8·P and zeros from C on, y fp32 [B, ldy]. Per row, a mask chunk (8 or 16 columns) expands the
                   next popcount(chunk) values into the kept lanes of a vector (zeros elsewhere) that multiplies x:
                     avx2     a 256-entry table per mask byte moving values into lanes (vpshufb, vpermps)
                     avx512   vexpandps under the 16-bit mask (kmask) on 16 loaded, converted values
                     portable column by column, the mask bit gating value and advance
                   fp16 values are widened with F16C (vcvtph2ps), bf16 by a 16-bit shift. Rows are split over OpenMP
                   threads; each thread streams its rows' mask and values once, with software prefetch ahead.
   sparse_unpack:  rows [r0, r1) of the dense W (raw 2- or 4-byte elements, zeros where not kept), for prefill.
   The vector paths are compiled with target attributes, so one library holds all three; `path` picks one (0: the
   best the CPU runs, 1: portable, 2: avx2, 3: avx512). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SPARSE_X86 1
#endif

#define VALUE_PAD 32  /* elements readable past the last kept value */
#define MAX_TOKENS 4
#define ROW_BLOCK 16  /* rows per OpenMP work item: 64 bytes of y per token, no false sharing */
#define PREFETCH 1024 /* bytes ahead of the values stream to prefetch */

enum { KIND_F32 = 0, KIND_F16 = 1, KIND_BF16 = 2 };
enum { PATH_AUTO = 0, PATH_PORTABLE = 1, PATH_AVX2 = 2, PATH_AVX512 = 3 };

#include "../../kv/csrc/half.h"

static inline float value_at(const void *vals, int64_t i, int kind) {
    if (kind == KIND_F32) return ((const float *)vals)[i];
    const uint16_t h = ((const uint16_t *)vals)[i];
    if (kind == KIND_F16) return half_to_float(h);
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Calls FN(m, vals, off, KIND, x, ldx, B, P, out) with the value kind and token count as constants, so that every
   combination compiles into its own loop (no branch on either per column). */
#define SPECIALIZE_B(FN, KIND)                                                                            \
    switch (B) {                                                                                          \
    case 1: FN(m, vals, off, KIND, x, ldx, 1, P, out); break;                                             \
    case 2: FN(m, vals, off, KIND, x, ldx, 2, P, out); break;                                             \
    case 3: FN(m, vals, off, KIND, x, ldx, 3, P, out); break;                                             \
    default: FN(m, vals, off, KIND, x, ldx, 4, P, out); break;                                            \
    }
#define SPECIALIZE(FN)                                                                                    \
    if (kind == KIND_F16) {                                                                               \
        SPECIALIZE_B(FN, KIND_F16)                                                                        \
    } else if (kind == KIND_BF16) {                                                                       \
        SPECIALIZE_B(FN, KIND_BF16)                                                                       \
    } else {                                                                                              \
        SPECIALIZE_B(FN, KIND_F32)                                                                        \
    }

/* ---- portable: each column in turn, a kept one taking the next value (branch-free: a column's bit gates both) ---- */
static inline __attribute__((always_inline)) void row_portable_b(const uint8_t *m, const void *vals, int64_t off,
                                                                 int kind, const float *x, long ldx, int B, int P,
                                                                 float *out) {
    float acc[MAX_TOKENS] = {0.f, 0.f, 0.f, 0.f};
    for (int k = 0; k < P; k++) {
        const unsigned bits = m[k];
        if (!bits) continue;
        for (int l = 0; l < 8; l++) {
            const unsigned on = (bits >> l) & 1u;
            const float v = value_at(vals, off, kind); /* off ≤ Z: within the padding */
            uint32_t u;
            float w;
            memcpy(&u, &v, 4);
            u &= 0u - on; /* +0 where the column is not kept (a bit mask, not a branch the CPU would mispredict) */
            memcpy(&w, &u, 4);
            for (int b = 0; b < B; b++) acc[b] += w * x[(size_t)b * ldx + 8 * k + l];
            off += on;
        }
    }
    for (int b = 0; b < B; b++) out[b] = acc[b];
}

static void row_portable(const uint8_t *m, const void *vals, int64_t off, int kind, const float *x, long ldx, int B,
                         int P, float *out) {
    SPECIALIZE(row_portable_b);
}

#ifdef SPARSE_X86
/* ---- avx2: 8 columns per mask byte m, the next popcount(m) values moved into m's set lanes by a table per byte:
   fp32   vpermps with lane indices (the rank of lane l among m's set bits), off lanes blended to 0 (index -1)
   fp16   vpshufb of the 8 halves (off lanes take byte index 0x80, which vpshufb zeroes), then vcvtph2ps
   bf16   vpshufb of the 8 halves, broadcast to both 128-bit lanes, into the high half of each 32-bit lane */
#define AVX2 __attribute__((target("avx2,fma,f16c,popcnt")))
static int32_t perm32[256][8] __attribute__((aligned(32)));
static uint8_t shuf16[256][16] __attribute__((aligned(32))), shufbf[256][32] __attribute__((aligned(32)));

__attribute__((constructor)) static void fill_tables(void) { /* when the library loads */
    for (int m = 0; m < 256; m++)
        for (int l = 0, rank = 0; l < 8; l++) {
            const int on = (m >> l) & 1;
            perm32[m][l] = on ? rank : -1;
            shuf16[m][2 * l] = on ? (uint8_t)(2 * rank) : 0x80;
            shuf16[m][2 * l + 1] = on ? (uint8_t)(2 * rank + 1) : 0x80;
            shufbf[m][4 * l] = shufbf[m][4 * l + 1] = 0x80;
            shufbf[m][4 * l + 2] = on ? (uint8_t)(2 * rank) : 0x80;
            shufbf[m][4 * l + 3] = on ? (uint8_t)(2 * rank + 1) : 0x80;
            rank += on;
        }
}

/* The 8 weights of mask byte m: values vals[off ..] moved into m's set lanes, 0 in the others. */
static inline AVX2 __m256 expand8(const void *vals, int64_t off, unsigned m, int kind) {
    if (kind == KIND_F16) {
        const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)vals + off));
        return _mm256_cvtph_ps(_mm_shuffle_epi8(h, _mm_load_si128((const __m128i *)shuf16[m])));
    }
    if (kind == KIND_BF16) {
        const __m256i h = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)((const uint16_t *)vals + off)));
        return _mm256_castsi256_ps(_mm256_shuffle_epi8(h, _mm256_load_si256((const __m256i *)shufbf[m])));
    }
    const __m256i idx = _mm256_load_si256((const __m256i *)perm32[m]);
    const __m256 v = _mm256_permutevar8x32_ps(_mm256_loadu_ps((const float *)vals + off), idx);
    return _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_castsi256_ps(idx));
}

static inline AVX2 float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* One row, B tokens (a constant once inlined), two mask bytes (16 columns) per step into two accumulators. */
static inline AVX2 __attribute__((always_inline)) void row_avx2_b(const uint8_t *m, const void *vals, int64_t off,
                                                                  int kind, const float *x, long ldx, int B, int P,
                                                                  float *out) {
    __m256 acc[MAX_TOKENS][2];
    const int es = kind == KIND_F32 ? 4 : 2;
    for (int b = 0; b < B; b++) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
    for (int k = 0; k < P; k += 2) {
        const unsigned m0 = m[k], m1 = m[k + 1];
        _mm_prefetch((const char *)vals + (off * es) + PREFETCH, _MM_HINT_T0);
        const __m256 w0 = expand8(vals, off, m0, kind);
        off += __builtin_popcount(m0);
        const __m256 w1 = expand8(vals, off, m1, kind);
        off += __builtin_popcount(m1);
        for (int b = 0; b < B; b++) {
            const float *xb = x + (size_t)b * ldx + 8 * k;
            acc[b][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc[b][0]);
            acc[b][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), acc[b][1]);
        }
    }
    for (int b = 0; b < B; b++) out[b] = hsum8(_mm256_add_ps(acc[b][0], acc[b][1]));
}

static AVX2 void row_avx2(const uint8_t *m, const void *vals, int64_t off, int kind, const float *x, long ldx, int B,
                          int P, float *out) {
    SPECIALIZE(row_avx2_b);
}

/* ---- avx512: 16 columns per 16-bit mask; 16 values loaded, widened, expanded under the mask (vexpandps) ---------- */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")))

static inline AVX512 __m512 expand16(const void *vals, int64_t off, __mmask16 m, int kind) {
    __m512 v;
    if (kind == KIND_F32) {
        v = _mm512_loadu_ps((const float *)vals + off);
    } else {
        const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)vals + off));
        v = kind == KIND_F16 ? _mm512_cvtph_ps(h)
                             : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_expand_ps(m, v);
}

/* One row, B tokens, one 64-bit mask word (64 columns, four vectors into four accumulators) per step. */
static inline AVX512 __attribute__((always_inline)) void row_avx512_b(const uint8_t *m, const void *vals, int64_t off,
                                                                      int kind, const float *x, long ldx, int B,
                                                                      int P, float *out) {
    __m512 acc[MAX_TOKENS][4];
    const int es = kind == KIND_F32 ? 4 : 2;
    for (int b = 0; b < B; b++) acc[b][0] = acc[b][1] = acc[b][2] = acc[b][3] = _mm512_setzero_ps();
    for (int k = 0; k < P; k += 8) {
        uint64_t word;
        memcpy(&word, m + k, 8);
        _mm_prefetch((const char *)vals + (off * es) + PREFETCH, _MM_HINT_T0);
        __m512 w[4];
        for (int q = 0; q < 4; q++) {
            const __mmask16 mq = (__mmask16)(word >> (16 * q));
            w[q] = expand16(vals, off, mq, kind);
            off += __builtin_popcount(mq);
        }
        for (int b = 0; b < B; b++) {
            const float *xb = x + (size_t)b * ldx + 8 * k;
            for (int q = 0; q < 4; q++) acc[b][q] = _mm512_fmadd_ps(w[q], _mm512_loadu_ps(xb + 16 * q), acc[b][q]);
        }
    }
    for (int b = 0; b < B; b++)
        out[b] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]),
                                                    _mm512_add_ps(acc[b][2], acc[b][3])));
}

static AVX512 void row_avx512(const uint8_t *m, const void *vals, int64_t off, int kind, const float *x, long ldx,
                              int B, int P, float *out) {
    SPECIALIZE(row_avx512_b);
}
#endif /* SPARSE_X86 */

/* Which paths this CPU runs: bit 1 portable, bit 2 avx2, bit 3 avx512 (bit i is path i). */
int sparse_paths(void) {
    int paths = 1 << PATH_PORTABLE;
#ifdef SPARSE_X86
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (avx2) paths |= 1 << PATH_AVX2;
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        paths |= 1 << PATH_AVX512;
#endif
    return paths;
}

typedef void (*row_fn)(const uint8_t *, const void *, int64_t, int, const float *, long, int, int, float *);

static row_fn pick_row(int path) {
    const int paths = sparse_paths();
    if (path == PATH_AUTO) path = paths & (1 << PATH_AVX512) ? PATH_AVX512 : paths & (1 << PATH_AVX2) ? PATH_AVX2
                                                                                                 : PATH_PORTABLE;
    if (path < PATH_PORTABLE || path > PATH_AVX512 || !(paths & (1 << path))) return NULL;
#ifdef SPARSE_X86
    if (path == PATH_AVX2) return row_avx2;
    if (path == PATH_AVX512) return row_avx512;
#endif
    return row_portable;
}

/* 0 on success; -1 for a bad shape (B outside 1..4, P not a multiple of 8, x rows shorter than 8·P), -2 for a path
   this CPU (or this build) cannot run. */
int sparse_matvec(const uint8_t *mask, const void *vals, const int64_t *offsets, int kind, const float *x, float *y,
                  int R, int P, int B, long ldx, long ldy, int path, int threads) {
    if (B < 1 || B > MAX_TOKENS || P % 8 || ldx < 8L * P || kind < KIND_F32 || kind > KIND_BF16) return -1;
    const row_fn row = pick_row(path);
    if (!row) return -2;
    const int blocks = (R + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for schedule(dynamic, 8) num_threads(threads)
    for (int blk = 0; blk < blocks; blk++) {
        const int r1 = (blk + 1) * ROW_BLOCK < R ? (blk + 1) * ROW_BLOCK : R;
        for (int r = blk * ROW_BLOCK; r < r1; r++) {
            float out[MAX_TOKENS];
            __builtin_prefetch(mask + (size_t)(r + 1) * P, 0, 0);
            row(mask + (size_t)r * P, vals, offsets[r], kind, x, ldx, B, P, out);
            for (int b = 0; b < B; b++) y[(size_t)b * ldy + r] = out[b];
        }
    }
    return 0;
}

/* Rows [r0, r1) of the dense weight into out [r1 - r0, C] (elements of es = 2 or 4 bytes, zeros where not kept).
   0 on success, -1 for a bad element size or a row width the mask cannot hold. */
int sparse_unpack(const uint8_t *mask, const void *vals, const int64_t *offsets, int es, void *out, int r0, int r1,
                  int P, int C, int threads) {
    if ((es != 2 && es != 4) || C > 8 * P) return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = r0; r < r1; r++) {
        char *dst = (char *)out + (size_t)(r - r0) * C * es;
        const char *src = (const char *)vals + (size_t)offsets[r] * es;
        const uint8_t *m = mask + (size_t)r * P;
        memset(dst, 0, (size_t)C * es);
        for (int k = 0; k < P; k++) {
            unsigned bits = m[k];
            while (bits) {
                memcpy(dst + (size_t)(8 * k + __builtin_ctz(bits)) * es, src, es);
                src += es;
                bits &= bits - 1;
            }
        }
    }
    return 0;
}
