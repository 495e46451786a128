/* Decode attention over KIVI's packed KV store (lmmlab.attention), without a float copy of the store.

   Keys are quantized per channel (a group is G consecutive tokens of one channel), so a group's scale s and zero z
   fold into the query:
       q·k_t = Σ_c (q_c·s_gc)·code_tc + Σ_c q_c·z_gc        (g = t / G)                          kivi_scores
   Values are quantized per token (a group is G consecutive channels of one token), so their scale and zero fold into
   the attention weights:
       o_c   = Σ_t (p_t·s_t,c/G)·code_tc + Σ_t p_t·z_t,c/G                                        kivi_values
   Codes are bit-packed along channels (lmmlab.kvcache.pack): a chunk of CB bytes holds PC codes, code i of chunk k
   being channel c = k·PC + i at bits [b·i, b·i + b) of the chunk's little-endian word. They are unpacked in
   registers; the folded query (keys) and the per-chunk accumulators (values) are kept as PC "planes" of
   ceil(D/PC) floats, plane i holding channels i, PC + i, 2·PC + i, ..., so each inner loop runs over whole chunks.

   Shapes (BH = batch × KV heads, R = query rows per KV head = GQA group × query length; contiguous within a head,
   the stores' heads `codes_stride` and `scale_stride` elements apart, as they lie in buffers with spare room; the
   rows of scores and p `ld` ≥ T floats apart, so that they can be the first T columns of the step's whole row):
       keys:   codes uint8 [BH, T, P]   scale, zero fp16 [BH, T/G, D]   q fp32 [BH, R, D]   scores fp32 [BH, R, ld]
       values: codes uint8 [BH, T, P]   scale, zero fp16 [BH, T, D/G]   p fp32 [BH, R, ld]  out fp32 [BH, R, D]
   Work is split over (BH, blocks of tokens) with OpenMP (the runtime torch itself uses). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define BLOCK_GROUPS 8 /* token blocks of 8 key groups (or 8·G value tokens) per work item */

#include "half.h"

/* The code of plane i in chunk k, for BITS-bit codes packed CB bytes at a time. */
#define CODE(row, k, i, BITS, CB)                                                                         \
    ((CB) == 1 ? (float)(((row)[k] >> ((BITS) * (i))) & ((1u << (BITS)) - 1u))                            \
               : (float)((((uint32_t)(row)[3 * (k)] | (uint32_t)(row)[3 * (k) + 1] << 8 |                 \
                           (uint32_t)(row)[3 * (k) + 2] << 16) >> ((BITS) * (i))) & ((1u << (BITS)) - 1u)))

/* ---- keys: scores[r, t] = Σ_c qs[r, c]·code[t, c] + bias[r] for the tokens of one block ----------------------- */
#define DEFINE_SCORES(BITS, PC, CB)                                                                       \
static void scores_##BITS(const uint8_t *codes, const uint16_t *scale, const uint16_t *zero, const float *q,  \
                          float *scores, int ld, int D, int G, int R, int P, int t0, int t1, float *qs,        \
                          float *bias) {                                                                  \
    const int n = (D + (PC) - 1) / (PC); /* chunks per token */                                           \
    for (int g = t0 / G; g < t1 / G; g++) {                                                               \
        const uint16_t *s = scale + (size_t)g * D, *z = zero + (size_t)g * D;                              \
        for (int r = 0; r < R; r++) { /* fold the group's scale and zero into the query */                \
            float *planes = qs + (size_t)r * (PC) * n, b = 0.f;                                           \
            const float *qr = q + (size_t)r * D;                                                          \
            for (int c = 0; c < (PC) * n; c++) planes[(c % (PC)) * n + c / (PC)] = 0.f;                    \
            for (int c = 0; c < D; c++) {                                                                 \
                planes[(c % (PC)) * n + c / (PC)] = qr[c] * half_to_float(s[c]);                          \
                b += qr[c] * half_to_float(z[c]);                                                         \
            }                                                                                             \
            bias[r] = b;                                                                                  \
        }                                                                                                 \
        for (int t = g * G; t < (g + 1) * G; t++) {                                                       \
            const uint8_t *row = codes + (size_t)t * P;                                                   \
            for (int r = 0; r < R; r++) {                                                                 \
                const float *planes = qs + (size_t)r * (PC) * n;                                          \
                float acc = 0.f;                                                                          \
                for (int i = 0; i < (PC); i++) {                                                          \
                    const float *pl = planes + (size_t)i * n;                                             \
                    for (int k = 0; k < n; k++) acc += pl[k] * CODE(row, k, i, BITS, CB);                 \
                }                                                                                         \
                scores[(size_t)r * ld + t] = acc + bias[r];                                                \
            }                                                                                             \
        }                                                                                                 \
    }                                                                                                     \
}

/* ---- values: acc[r, c] += (p[r, t]·s[t, c/G])·code[t, c], zsum[r, c/G] += p[r, t]·z[t, c/G] ------------------ */
#define DEFINE_VALUES(BITS, PC, CB)                                                                       \
static void values_##BITS(const uint8_t *codes, const uint16_t *scale, const uint16_t *zero, const float *p,  \
                          float *out, int ld, int D, int G, int R, int P, int t0, int t1, float *acc,          \
                          float *zsum, float *w) {                                                        \
    const int n = (D + (PC) - 1) / (PC), groups = D / G, per_group = G / (PC); /* G % PC == 0 */         \
    memset(acc, 0, sizeof(float) * (size_t)R * (PC) * n);                                                 \
    memset(zsum, 0, sizeof(float) * (size_t)R * groups);                                                  \
    for (int t = t0; t < t1; t++) {                                                                       \
        const uint8_t *row = codes + (size_t)t * P;                                                       \
        const uint16_t *s = scale + (size_t)t * groups, *z = zero + (size_t)t * groups;                    \
        for (int r = 0; r < R; r++) {                                                                     \
            const float pt = p[(size_t)r * ld + t];                                                        \
            for (int j = 0; j < groups; j++) {                                                            \
                w[j] = pt * half_to_float(s[j]);                                                          \
                zsum[(size_t)r * groups + j] += pt * half_to_float(z[j]);                                 \
            }                                                                                             \
            float *a = acc + (size_t)r * (PC) * n;                                                        \
            for (int i = 0; i < (PC); i++) {                                                              \
                float *pl = a + (size_t)i * n;                                                            \
                for (int j = 0; j < groups; j++) {                                                        \
                    const float wj = w[j];                                                                \
                    for (int k = j * per_group; k < (j + 1) * per_group; k++)                             \
                        pl[k] += wj * CODE(row, k, i, BITS, CB);                                          \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
    }                                                                                                     \
    for (int r = 0; r < R; r++)                                                                           \
        for (int c = 0; c < D; c++)                                                                       \
            out[(size_t)r * D + c] = acc[(size_t)r * (PC) * n + (size_t)(c % (PC)) * n + c / (PC)] +       \
                                     zsum[(size_t)r * groups + c / G];                                    \
}

DEFINE_SCORES(2, 4, 1)
DEFINE_SCORES(3, 8, 3)
DEFINE_SCORES(4, 2, 1)
DEFINE_SCORES(6, 4, 3)
DEFINE_SCORES(8, 1, 1)
DEFINE_VALUES(2, 4, 1)
DEFINE_VALUES(3, 8, 3)
DEFINE_VALUES(4, 2, 1)
DEFINE_VALUES(6, 4, 3)
DEFINE_VALUES(8, 1, 1)


/* ---- the same two products, vectorized, for byte-aligned widths (2, 4, 8 bits) ------------------------------------
   A token's P code bytes are read 16 at a time ("pieces"); plane i of piece m holds the codes of channels
   (16·m + l)·PC + i, l = 0..15, converted to 16 floats. Taken when P % 16 == 0, D % 32 == 0, D ≤ 256, and for values D/G ≤ 16
   and G % PC == 0 (a chunk never straddles two groups), as at LLaVA's and SmolLM2's head sizes. GCC's vector
   extensions compile to AVX-512, AVX2 or SSE, whichever the CPU has. */
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
/* lanes of w picked by idx (every idx < 16): one permute instruction with GCC, a loop elsewhere */
#if defined(__clang__)
static inline v16f permute16(v16f w, v16i idx) {
    v16f out;
    for (int l = 0; l < 16; l++) out[l] = w[idx[l] & 15];
    return out;
}
#else
#define permute16(w, idx) __builtin_shuffle(w, idx)
#endif
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
#define MAXV 16 /* D / 16 code vectors per token, D ≤ 256 */

static inline float hsum(v16f x) {
#if defined(__clang__) || __GNUC__ >= 12 /* halving adds */
    v8f h = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
            __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    v4f f = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (f[0] + f[2]) + (f[1] + f[3]);
#else
    float s = 0.f;
    for (int l = 0; l < 16; l++) s += x[l];
    return s;
#endif
}

/* 16 bytes -> 16 int32 lanes (zero-extended): one instruction where the CPU has AVX-512 or two with AVX2 (GCC's
   generic conversion inserts lane by lane). */
static inline v16i widen(const uint8_t *src) {
#if defined(__AVX512F__)
    return (v16i)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)src));
#elif defined(__AVX2__)
    const __m128i b = _mm_loadu_si128((const __m128i *)src);
    const __m256i lo = _mm256_cvtepu8_epi32(b), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
    v16i out;
    memcpy(&out, &lo, 32);
    memcpy((char *)&out + 32, &hi, 32);
    return out;
#else
    v16i out;
    for (int l = 0; l < 16; l++) out[l] = src[l];
    return out;
#endif
}

/* codes[i·pieces + m] = plane i of piece m of one token's row */
#define UNPACK(row, codes, BITS, PC, pieces)                                                              \
    for (int m = 0; m < (pieces); m++) {                                                                  \
        const v16i word = widen((row) + 16 * m);                                                          \
        for (int i = 0; i < (PC); i++)                                                                    \
            (codes)[i * (pieces) + m] =                                                                   \
                __builtin_convertvector((word >> (BITS) * i) & (int32_t)((1u << (BITS)) - 1u), v16f);     \
    }

/* 16 fp16 -> 16 floats: one instruction with AVX-512 or F16C. */
static inline v16f half16(const uint16_t *src) {
#if defined(__AVX512F__)
    return (v16f)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)src));
#elif defined(__F16C__)
    const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)src));
    const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 8)));
    v16f out;
    memcpy(&out, &lo, 32);
    memcpy((char *)&out + 32, &hi, 32);
    return out;
#else
    v16f out;
    for (int l = 0; l < 16; l++) out[l] = half_to_float(src[l]);
    return out;
#endif
}

/* Ask for a later token's code bytes now: the stores stream from memory once per step, and the hardware prefetcher
   alone left the kernels at half the bandwidth they reach on cached data. (Prefetches past the end are harmless.) */
#define AHEAD_BYTES 4096 /* 4 KiB ahead: 0.5 KiB was 40 % slower, 1-4 KiB alike */
#define PREFETCH(ptr, bytes)                                                                              \
    for (int o = 0; o < (bytes); o += 64) __builtin_prefetch((const char *)(ptr) + o, 0, 0);

#define DEFINE_FAST(BITS, PC, NAME, DIM)                                                                             \
static void fast_scores_##BITS##NAME(const uint8_t *codes, const uint16_t *scale, const uint16_t *zero,            \
                               const float *q, float *scores, int ld, int D_, int G, int R, int P, int t0,      \
                               int t1, v16f *planes, float *bias) {                                       \
    const int D = (DIM), pieces = P / 16, nv = D / 16; /* DIM: a constant (64, 128) or the argument D_ */     \
    for (int g = t0 / G; g < t1 / G; g++) {                                                               \
        const uint16_t *s = scale + (size_t)g * D, *z = zero + (size_t)g * D;                              \
        v16f sf[MAXV], zf[MAXV];                                                                          \
        float qs[16 * MAXV];                                                                              \
        for (int v = 0; v < nv; v++) {                                                                    \
            sf[v] = half16(s + 16 * v);                                                                   \
            zf[v] = half16(z + 16 * v);                                                                   \
        }                                                                                                 \
        for (int r = 0; r < R; r++) { /* fold the group's scale and zero into the query, as planes */      \
            const float *qr = q + (size_t)r * D;                                                          \
            float b = 0.f, *pf = (float *)(planes + (size_t)r * nv);                                      \
            v16f bv = {0};                                                                                \
            for (int v = 0; v < nv; v++) {                                                                \
                v16f qv;                                                                                  \
                memcpy(&qv, qr + 16 * v, 64);                                                             \
                const v16f prod = qv * sf[v];                                                             \
                memcpy(qs + 16 * v, &prod, 64);                                                           \
                bv += qv * zf[v];                                                                         \
            }                                                                                             \
            b = hsum(bv);                                                                                 \
            for (int i = 0; i < (PC); i++)                                                                \
                for (int k = 0; k < P; k++) pf[i * P + k] = qs[k * (PC) + i];                             \
            bias[r] = b;                                                                                  \
        }                                                                                                 \
        for (int t = g * G; t < (g + 1) * G; t++) {                                                       \
            v16f cv[MAXV];                                                                                \
            PREFETCH(codes + (size_t)t * P + AHEAD_BYTES, P)                                                  \
            UNPACK(codes + (size_t)t * P, cv, BITS, PC, pieces)                                           \
            for (int r = 0; r < R; r++) {                                                                 \
                const v16f *pl = planes + (size_t)r * nv;                                                 \
                v16f acc0 = pl[0] * cv[0], acc1 = pl[1] * cv[1]; /* two chains: nv is even (D % 32 == 0) */  \
                for (int v = 2; v < nv; v += 2) {                                                         \
                    acc0 += pl[v] * cv[v];                                                                \
                    acc1 += pl[v + 1] * cv[v + 1];                                                        \
                }                                                                                         \
                scores[(size_t)r * ld + t] = hsum(acc0 + acc1) + bias[r];                                  \
            }                                                                                             \
        }                                                                                                 \
    }                                                                                                     \
}                                                                                                         \
static void fast_values_##BITS##NAME(const uint8_t *codes, const uint16_t *scale, const uint16_t *zero,            \
                               const float *p, float *out, int ld, int D_, int G, int R, int P, int t0, int t1, \
                               v16f *acc, v16f *zacc, float *sf, float *zf) {                             \
    const int D = (DIM), pieces = P / 16, nv = D / 16, groups = D / G, n = (t1 - t0) * groups;           \
    int e = 0; /* the block's scales and zeros as floats, 16 at a time (sf, zf hold n + 16) */           \
    for (; e + 16 <= n; e += 16) {                                                                        \
        const v16f a = half16(scale + (size_t)t0 * groups + e), b = half16(zero + (size_t)t0 * groups + e); \
        memcpy(sf + e, &a, 64);                                                                           \
        memcpy(zf + e, &b, 64);                                                                           \
    }                                                                                                     \
    for (; e < n + 16; e++) {                                                                             \
        sf[e] = e < n ? half_to_float(scale[(size_t)t0 * groups + e]) : 0.f;                              \
        zf[e] = e < n ? half_to_float(zero[(size_t)t0 * groups + e]) : 0.f;                               \
    }                                                                                                     \
    v16i lane_group[MAXV]; /* piece m, lane l -> the value group of chunk 16·m + l */                     \
    for (int m = 0; m < pieces; m++)                                                                      \
        for (int l = 0; l < 16; l++) lane_group[m][l] = (16 * m + l) * (PC) / G;                          \
    if (R == 1) { /* one query row (MHA decode): the accumulators stay in registers */                  \
        v16f a[MAXV], za = {0};                                                                           \
        for (int v = 0; v < nv; v++) a[v] = (v16f){0};                                                    \
        for (int t = t0; t < t1; t++) {                                                                   \
            v16f cv[MAXV], sv, zv;                                                                        \
            PREFETCH(codes + (size_t)t * P + AHEAD_BYTES, P)                                              \
            UNPACK(codes + (size_t)t * P, cv, BITS, PC, pieces)                                           \
            memcpy(&sv, sf + (size_t)(t - t0) * groups, 64);                                              \
            memcpy(&zv, zf + (size_t)(t - t0) * groups, 64);                                              \
            const float pt = p[t];                                                                        \
            const v16f w = pt * sv;                                                                       \
            za += pt * zv;                                                                                \
            for (int m = 0; m < pieces; m++) {                                                            \
                const v16f wm = permute16(w, lane_group[m]);                                      \
                for (int i = 0; i < (PC); i++) a[i * pieces + m] += wm * cv[i * pieces + m];              \
            }                                                                                             \
        }                                                                                                 \
        for (int c = 0; c < D; c++) {                                                                     \
            const int k = c / (PC), i = c % (PC);                                                         \
            out[c] = a[i * pieces + k / 16][k % 16] + za[c / G];                                          \
        }                                                                                                 \
        return;                                                                                           \
    }                                                                                                     \
    for (int v = 0; v < R * nv; v++) acc[v] = (v16f){0};                                                  \
    for (int r = 0; r < R; r++) zacc[r] = (v16f){0};                                                      \
    for (int t = t0; t < t1; t++) {                                                                       \
        v16f cv[MAXV], sv, zv; /* lanes j < groups: this token's; the rest are never read out */         \
        PREFETCH(codes + (size_t)t * P + AHEAD_BYTES, P)                                                      \
        UNPACK(codes + (size_t)t * P, cv, BITS, PC, pieces)                                               \
        memcpy(&sv, sf + (size_t)(t - t0) * groups, 64);                                                  \
        memcpy(&zv, zf + (size_t)(t - t0) * groups, 64);                                                  \
        for (int r = 0; r < R; r++) {                                                                     \
            const float pt = p[(size_t)r * ld + t];                                                        \
            const v16f w = pt * sv; /* p_t · s_tj, lane j */                                              \
            zacc[r] += pt * zv;                                                                           \
            for (int m = 0; m < pieces; m++) {                                                            \
                const v16f wm = permute16(w, lane_group[m]);                                      \
                for (int i = 0; i < (PC); i++) acc[(size_t)r * nv + i * pieces + m] += wm * cv[i * pieces + m]; \
            }                                                                                             \
        }                                                                                                 \
    }                                                                                                     \
    for (int r = 0; r < R; r++)                                                                           \
        for (int c = 0; c < D; c++) {                                                                     \
            const int k = c / (PC), i = c % (PC);                                                         \
            out[(size_t)r * D + c] = acc[(size_t)r * nv + i * pieces + k / 16][k % 16] + zacc[r][c / G];   \
        }                                                                                                 \
}

DEFINE_FAST(2, 4, _any, D_)
DEFINE_FAST(4, 2, _any, D_)
DEFINE_FAST(8, 1, _any, D_)
DEFINE_FAST(2, 4, _64, 64)
DEFINE_FAST(4, 2, _64, 64)
DEFINE_FAST(8, 1, _64, 64)
DEFINE_FAST(2, 4, _128, 128)
DEFINE_FAST(4, 2, _128, 128)
DEFINE_FAST(8, 1, _128, 128)

/* The fast variant for this width and head size: unrolled for 64 and 128 channels, else looping over D. */
#define FAST_CALL(KIND, bits, D, ...)                                                                     \
    do {                                                                                                  \
        if ((D) == 128) {                                                                                 \
            if ((bits) == 2) KIND##_2_128(__VA_ARGS__); else if ((bits) == 4) KIND##_4_128(__VA_ARGS__);  \
            else KIND##_8_128(__VA_ARGS__);                                                               \
        } else if ((D) == 64) {                                                                           \
            if ((bits) == 2) KIND##_2_64(__VA_ARGS__); else if ((bits) == 4) KIND##_4_64(__VA_ARGS__);    \
            else KIND##_8_64(__VA_ARGS__);                                                                \
        } else {                                                                                          \
            if ((bits) == 2) KIND##_2_any(__VA_ARGS__); else if ((bits) == 4) KIND##_4_any(__VA_ARGS__);  \
            else KIND##_8_any(__VA_ARGS__);                                                               \
        }                                                                                                 \
    } while (0)

static int fast_keys(int bits, int D, int G) {
    (void)G;
    return (bits == 2 || bits == 4 || bits == 8) && D * bits / 8 % 16 == 0 && D % 32 == 0 && D <= 256;
}
static int fast_values(int bits, int D, int G) { return fast_keys(bits, D, G) && D / G <= 16 && G % (8 / bits) == 0; }

/* Work item `item` of BH × blocks: its batch·head, and its tokens [t0, t1). */
/* One work item of a store: head bh, its tokens [t0, t1) (one block), and that head's codes, scales and zero points. */
typedef struct {
    long bh;
    int t0, t1;
    const uint8_t *c;
    const uint16_t *s, *z;
} work_t;

static inline work_t work_item(long item, int blocks, int block, int T, const uint8_t *codes, const uint16_t *scale,
                               const uint16_t *zero, long codes_stride, long scale_stride) {
    work_t w;
    w.bh = item / blocks;
    w.t0 = (int)(item % blocks) * block;
    w.t1 = w.t0 + block < T ? w.t0 + block : T;
    w.c = codes + (size_t)w.bh * codes_stride;
    w.s = scale + (size_t)w.bh * scale_stride;
    w.z = zero + (size_t)w.bh * scale_stride;
    return w;
}

static int codes_per_chunk(int bits) { return bits == 3 ? 8 : bits == 6 ? 4 : 8 / bits; }

/* A row's packed bytes P and 32-bit chunks n at `bits`, or -1 for a width the kernels do not know or a row that does
   not end on a whole 3-byte chunk (3 and 6 bits). */
static int row_layout(int bits, int D, int *P, int *pc, int *n) {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 6 && bits != 8) return -1;
    *P = (D * bits + 7) / 8, *pc = codes_per_chunk(bits), *n = (D + *pc - 1) / *pc;
    return *n * (bits == 3 || bits == 6 ? 3 : 1) > *P ? -1 : 0;
}

/* 0 on success, -1 for a width the kernels do not know, a store of part of a key group, or a 3-/6-bit row that does
   not end on a whole 3-byte chunk (the caller then uses the torch reference). */
int kivi_scores(const uint8_t *codes, const uint16_t *scale, const uint16_t *zero, const float *q, float *scores,
                int BH, int T, int D, int G, int R, int bits, long codes_stride, long scale_stride, int ld,
                int threads) {
    int P, pc, n;
    if (row_layout(bits, D, &P, &pc, &n) || T % G) return -1; /* whole key groups; no read past a row */
    const int block = BLOCK_GROUPS * G, blocks = (T + block - 1) / block;
#pragma omp parallel num_threads(threads)
    {
        float *qs = malloc(sizeof(float) * (size_t)R * pc * n), *bias = malloc(sizeof(float) * (size_t)R);
        v16f *planes = aligned_alloc(64, sizeof(v16f) * (size_t)R * MAXV);
        const int fast = fast_keys(bits, D, G);
#pragma omp for schedule(static)
        for (long item = 0; item < (long)BH * blocks; item++) {
            const work_t it = work_item(item, blocks, block, T, codes, scale, zero, codes_stride, scale_stride);
            const uint8_t *c = it.c;
            const uint16_t *s = it.s, *z = it.z;
            const int t0 = it.t0, t1 = it.t1;
            const float *qh = q + (size_t)it.bh * R * D;
            float *sc = scores + (size_t)it.bh * R * ld;
            if (fast) {
                FAST_CALL(fast_scores, bits, D, c, s, z, qh, sc, ld, D, G, R, P, t0, t1, planes, bias);
                continue;
            }
            switch (bits) {
            case 2: scores_2(c, s, z, qh, sc, ld, D, G, R, P, t0, t1, qs, bias); break;
            case 3: scores_3(c, s, z, qh, sc, ld, D, G, R, P, t0, t1, qs, bias); break;
            case 4: scores_4(c, s, z, qh, sc, ld, D, G, R, P, t0, t1, qs, bias); break;
            case 6: scores_6(c, s, z, qh, sc, ld, D, G, R, P, t0, t1, qs, bias); break;
            default: scores_8(c, s, z, qh, sc, ld, D, G, R, P, t0, t1, qs, bias); break;
            }
        }
        free(qs);
        free(bias);
        free(planes);
    }
    return 0;
}

/* 0 on success, -1 for a width the kernels do not know or a group that splits a chunk (G % codes per chunk). */
int kivi_values(const uint8_t *codes, const uint16_t *scale, const uint16_t *zero, const float *p, float *out,
                int BH, int T, int D, int G, int R, int bits, long codes_stride, long scale_stride, int ld,
                int threads) {
    int P, pc, n;
    if (row_layout(bits, D, &P, &pc, &n) || G % pc || D % G) return -1;
    const int groups = D / G;
    const int block = BLOCK_GROUPS * G, blocks = T > 0 ? (T + block - 1) / block : 1;
    float *partial = calloc((size_t)BH * blocks * R * D, sizeof(float)); /* one [R, D] sum per work item */
    if (!partial) return -2;
#pragma omp parallel num_threads(threads)
    {
        float *acc = malloc(sizeof(float) * (size_t)R * pc * n), *zsum = malloc(sizeof(float) * (size_t)R * groups);
        float *w = malloc(sizeof(float) * (size_t)groups);
        v16f *vacc = aligned_alloc(64, sizeof(v16f) * (size_t)R * MAXV), *zacc = aligned_alloc(64, sizeof(v16f) * (size_t)R);
        float *sf = malloc(sizeof(float) * ((size_t)block * groups + 16)), *zf = malloc(sizeof(float) * ((size_t)block * groups + 16));
        const int fast = fast_values(bits, D, G);
#pragma omp for schedule(static)
        for (long item = 0; item < (long)BH * blocks; item++) {
            const work_t it = work_item(item, blocks, block, T, codes, scale, zero, codes_stride, scale_stride);
            const uint8_t *c = it.c;
            const uint16_t *s = it.s, *z = it.z;
            const int t0 = it.t0, t1 = it.t1;
            const float *ph = p + (size_t)it.bh * R * ld;
            float *o = partial + (size_t)item * R * D;
            if (fast) {
                FAST_CALL(fast_values, bits, D, c, s, z, ph, o, ld, D, G, R, P, t0, t1, vacc, zacc, sf, zf);
                continue;
            }
            switch (bits) {
            case 2: values_2(c, s, z, ph, o, ld, D, G, R, P, t0, t1, acc, zsum, w); break;
            case 3: values_3(c, s, z, ph, o, ld, D, G, R, P, t0, t1, acc, zsum, w); break;
            case 4: values_4(c, s, z, ph, o, ld, D, G, R, P, t0, t1, acc, zsum, w); break;
            case 6: values_6(c, s, z, ph, o, ld, D, G, R, P, t0, t1, acc, zsum, w); break;
            default: values_8(c, s, z, ph, o, ld, D, G, R, P, t0, t1, acc, zsum, w); break;
            }
        }
        free(acc);
        free(zsum);
        free(w);
        free(vacc);
        free(zacc);
        free(sf);
        free(zf);
#pragma omp for schedule(static)
        for (long bh = 0; bh < BH; bh++) { /* blocks summed in a fixed order: the same result for any thread count */
            float *o = out + (size_t)bh * R * D;
            memset(o, 0, sizeof(float) * (size_t)R * D);
            for (int b = 0; b < blocks; b++) {
                const float *part = partial + ((size_t)bh * blocks + b) * R * D;
                for (int e = 0; e < R * D; e++) o[e] += part[e];
            }
        }
    }
    free(partial);
    return 0;
}
