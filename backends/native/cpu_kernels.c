// Our CPU kernels, for the native backend and the torch backend on the CPU: the matmul on GGUF
// blocks (first), then RMSNorm, attention (RoPE, the KV cache write, causal attention) and
// SwiGLU's silu(gate) * up, each one call where torch takes several ops, each computing a
// prompt's row as that row decoded alone; last, all of a model's layers in one call
// (forward_layers), the same kernels in the modules' order.
//
// y = x W^T with W still in its GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K,
// Q5_K, Q6_K, IQ4_NL, IQ4_XS), on the CPU.
//
// Why our own kernel: decode reads every weight once per token, so its speed is bytes read
// per weight. torch's int4 matmul needs the blocks repacked (load time, a second copy in
// memory) and has no layout for Q6_K or Q8_0 at their file size; here the mapped file is the
// weight. As in llama.cpp, activations are quantized to int8 per block (32 values, or 256 for
// the 256-value blocks), so each block is one integer dot product; the result is exactly
// sum_j w_j * xq_j * dx, checked against that formula in tests/test_torch_native.py. Prefill
// takes the same activation blocks (an int8 GEMM: on AMX tiles where the CPU has them, past a
// few rows; else 16 or 8 weight rows' blocks side by side against each activation row's codes
// on VNNI's or AVX2's dots) and gives each row bitwise the result it gets decoded alone, for
// every row count, so a prompt's answer does not depend on how it is split into forward passes,
// and no path is less exact than llama.cpp's. Every SIMD build gives the same bits (bar Q8_0 on
// AVX-512 without AMX).
//
// Built at first use by backends/torch/native.py with -O3 -march=native -fopenmp; loaded
// after torch, so OpenMP here is torch's own runtime and thread pool.

#define _DEFAULT_SOURCE  // syscall(), for AMX's permission
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#if defined(__AVX2__) && defined(__FMA__) && !defined(SMOLLM3_SCALAR)
#define USE_AVX2 1
#include <immintrin.h>
// 512-bit integer dots (VNNI) for the K-quants: twice the codes per instruction
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define USE_AVX512 1
// Intel's tile unit: a prompt's int8 products 16 x 16 at a time (amx_matmul)
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define USE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
// AMD's Zen 4/5, Intel's before Sapphire Rapids: Q8_0's rows two blocks a 512-bit dot
// (signed_pair_rows), a prompt's too; every other type's prompts take the few-rows dots
#define USE_Q8_0_PAIRS 1
#endif
#endif
#endif

enum {
    GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q5_1 = 7, GGML_Q8_0 = 8, GGML_Q2_K = 10, GGML_Q3_K = 11,
    GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14, GGML_IQ4_NL = 20, GGML_IQ4_XS = 23,
};

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000 | (mant << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (!mant) {
        bits = sign;
    } else {  // subnormal half: normalize
        exp = 113;
        while (!(mant & 0x400)) { mant <<= 1; exp--; }
        bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline uint16_t read_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t read_u32(const void *p) { uint32_t v; memcpy(&v, p, 4); return v; }

// --- activations ---

// 32 values: scale d, sum s = d * sum(q) (for Q4_0's and Q4_1's offsets), codes.
typedef struct { float d, s; int8_t q[32]; } x_block32;
// 256 values (K-quants): scale d, sums of each 16 and each 32 codes (for the offsets), codes.
typedef struct { float d; int16_t sums[16], sums32[8]; int8_t q[256]; } x_block256;

static inline int8_t round_code(float v) { return (int8_t)(v >= 0 ? (int)(v + 0.5f) : -(int)(-v + 0.5f)); }

static void quantize_block(const float *x, int n, int8_t *q, float *d_out) {
    float amax = 0;
    for (int j = 0; j < n; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;  // fmaxf: a call (NaN rules)
    float d = amax / 127, id = d ? 1 / d : 0;
    for (int j = 0; j < n; j++) q[j] = round_code(x[j] * id);
    *d_out = d;
}

static void quantize_x32(const float *x, int K, x_block32 *out) {
    for (int b = 0; b < K / 32; b++) {
        quantize_block(x + 32 * b, 32, out[b].q, &out[b].d);
        int sum = 0;
        for (int j = 0; j < 32; j++) sum += out[b].q[j];
        out[b].s = out[b].d * sum;
    }
}

static void quantize_x256(const float *x, int K, x_block256 *out) {
    for (int b = 0; b < K / 256; b++) {
        quantize_block(x + 256 * b, 256, out[b].q, &out[b].d);
        for (int g = 0; g < 16; g++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) sum += out[b].q[16 * g + j];
            out[b].sums[g] = (int16_t)sum;
        }
        for (int g = 0; g < 8; g++) out[b].sums32[g] = out[b].sums[2 * g] + out[b].sums[2 * g + 1];
    }
}

// --- SIMD helpers and tables the dots share ---

#ifdef USE_AVX2
static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// unsigned bytes times signed bytes, summed in fours into 8 int32, in a call for R rows (AVX-VNNI's
// 256-bit dot, Intel's Alder Lake on without AVX-512, for a prompt's rows only, as add_dot_i16)
static inline __m256i dot_u8_s8(__m256i u, __m256i s, const int R) {
    (void)R;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    if (R > 1) return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// 16 bytes of nibbles as 32 codes: low nibbles first, then high (Q4_0's and Q4_1's order)
static inline __m256i nibbles_32(const uint8_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}
#endif

// IQ4_NL's and IQ4_XS's 16 non-uniform levels (ggml's kvalues_iq4nl).
static const int8_t IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

#ifdef USE_AVX2
// 32 bits as 32 bytes, 0x10 where the bit is set (Q5_x's fifth bits): byte j takes byte j / 8 of
// the word, then tests its bit j % 8.
static inline __m256i bits_as_0x10(uint32_t bits) {
    const __m256i spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}
#endif

// --- one weight row, read straight off its blocks, against R activation rows ---
//
// R is a constant at each call (1 for a decoded token, DOT_ROWS for a prompt's rows), so the
// loops over r unroll and every sum stays in a register. Each block's weights are decoded into
// registers once for all R rows; each row then takes the operations it takes alone, in the same
// order, so its result is bitwise the same for every R (tests/test_torch_native.py). That is what
// makes a prompt's answer independent of how it is split into forward passes (a chat's cached
// history, the server's batching, a speculative draft): the real models have near-ties that a
// 1e-6 difference flips.

#define ROWS_INLINE static inline __attribute__((always_inline))
// Input rows per call for a prompt: R sets of sums in registers, 8 where AVX-512 gives 32 of
// them (the weights' unpacking shared by more rows: prefill GEMM 6-13% faster than 4), else 4;
// the rows left over (a speculative draft's few rows) all in one call: a row read apart from
// the others would decode every weight block again for itself.
#ifdef USE_AVX512
#define DOT_ROWS 8
#else
#define DOT_ROWS 4
#endif

// Activation row r's block b (rows are x_row bytes apart).
#define X_BLOCK(type, x, x_row, r, b) ((const type *)((x) + (size_t)(r) * (x_row)) + (b))

// A decoded token reads each weight byte once, from memory, and a core busy on the blocks keeps
// too few loads in flight to cover DRAM's latency: each block loop asks for the bytes
// PREFETCH_AHEAD ahead of it (3B shapes, 2 threads: Q4_K 8.3 -> 14.3 GB/s, Q8_0 12.4 -> 17.5,
// Q6_K 12.7 -> 15.5; a plain read 25.4). A call for several rows reads its weights from memory
// too, the first rows of a prompt or a speculative draft's (3B Q4_K_M's matmuls for 2 rows:
// 214 -> 99 ms; for 4: 222 -> 134 ms; 16 rows on these kernels, 8 a call: 451 -> 418 ms). A
// prefetch never changes a result.
#define PREFETCH_AHEAD 4096
ROWS_INLINE void prefetch_ahead(const uint8_t *w, const int bytes) {
    for (int o = 0; o < bytes; o += 64) __builtin_prefetch(w + PREFETCH_AHEAD + o);
}

#ifdef USE_AVX2
// The integer sums of 16-bit products p * s, added into 8 int32 lanes, in a call for R rows. The
// 256-bit VNNI multiply-add (AVX-VNNI) takes a prompt's rows only: on it a decoded token's Q6_K
// and Q5_K dots went 20% and 11% slower (Sapphire Rapids), its prompts' 1.2x faster.
static inline __m256i add_dot_i16(__m256i sum, __m256i p, __m256i s, const int R) {
    (void)R;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(sum, p, s);
#elif defined(__AVXVNNI__)
    return R > 1 ? _mm256_dpwssd_avx_epi32(sum, p, s) : _mm256_add_epi32(sum, _mm256_madd_epi16(p, s));
#else
    return _mm256_add_epi32(sum, _mm256_madd_epi16(p, s));
#endif
}

static inline int hsum_i32_128(__m128i v) {
    v = _mm_add_epi32(v, _mm_unpackhi_epi64(v, v));
    return _mm_cvtsi128_si32(_mm_add_epi32(v, _mm_shuffle_epi32(v, 1)));
}

static inline int hsum_i32(__m256i v) { return hsum_i32_128(_mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1))); }

// [sum(a), sum(b), sum(c), sum(d)] of 8 int32 each
static inline __m128i hsum4_i32(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i all = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(all), _mm256_extracti128_si256(all, 1));
}
#endif

// Q8_0: w = d q; IQ4_NL (d, qs[16]): w = d level[q] with 4-bit q in Q4_0's order. The 32-value
// blocks are each a short dependent chain (dot, convert, multiply-add), so four blocks go in
// flight at once on separate accumulators (measured 1.6x on one core); the last K / 32 % 4
// blocks go on the first.
#ifdef USE_AVX2
// a Q8_0 or IQ4_NL block's 32 codes as signed bytes
static inline __m256i signed_codes(const uint8_t *w, const int iq4) {
    return iq4 ? _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_LEVELS)), nibbles_32(w + 2))
               : _mm256_loadu_si256((const __m256i *)(w + 2));
}
#endif

#ifdef USE_Q8_0_PAIRS
// One block against R rows, into acc[r] (the pairs' last)
ROWS_INLINE void signed_block(const uint8_t *w, const uint8_t *x, size_t x_row, int b, __m256 acc[], const int iq4, const int R) {
    __m256i q = signed_codes(w, iq4), magnitude = _mm256_sign_epi8(q, q);
    float d = f16_to_f32(read_u16(w));
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        const x_block32 *xb = X_BLOCK(x_block32, x, x_row, r, b);
        // |q| as unsigned times x with q's sign: a signed product on an unsigned-signed op
        __m256i p = dot_u8_s8(magnitude, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xb->q), q), R);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xb->d), acc[r]);
    }
}

// Two 32-value blocks a 512-bit register: lanes 0-7 of a sum are block b's, 8-15 block b + 1's
// (the AVX2 dots' work on half the instructions where the CPU has 512-bit units).
static inline __m512 halves_ps(float lo, float hi) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(lo)), _mm256_castps_pd(_mm256_set1_ps(hi)), 1));
}

// Activation row blocks b and b + 1's codes, and their scales in the lanes their sums take
static inline __m512i pair_x_codes(const x_block32 *xb) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)xb[0].q)),
                              _mm256_loadu_si256((const __m256i *)xb[1].q), 1);
}

// Blocks b and b + 1 (size bytes apart) of Q8_0 or IQ4_NL against R rows, into acc[r]
ROWS_INLINE void signed_pair(const uint8_t *w, int size, const uint8_t *x, size_t x_row, int b, __m512 acc[], const int iq4,
                             const int R) {
    __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(signed_codes(w, iq4)), signed_codes(w + size, iq4), 1);
    // |q| as unsigned times x negated where q < 0: a signed product on the unsigned-signed dot
    __mmask64 negative = _mm512_movepi8_mask(q);
    __m512i magnitude = _mm512_abs_epi8(q);
    __m512 dw = halves_ps(f16_to_f32(read_u16(w)), f16_to_f32(read_u16(w + size)));
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        const x_block32 *xb = X_BLOCK(x_block32, x, x_row, r, b);
        __m512i xq = pair_x_codes(xb);
        __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), magnitude, _mm512_mask_sub_epi8(xq, negative, _mm512_setzero_si512(), xq));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw, halves_ps(xb[0].d, xb[1].d)), acc[r]);
    }
}

// Q8_0 on pairs of blocks; two pairs in flight on separate accumulators, the last pair on the first
ROWS_INLINE void signed_pair_rows(const uint8_t *w, const uint8_t *x, size_t x_row, int K, float *y, size_t y_step,
                                  const int iq4, const int R) {
    int nb = K / 32, size = iq4 ? 18 : 34, b = 0;
    __m512 acc[2][DOT_ROWS];
    for (int u = 0; u < 2; u++)
        for (int r = 0; r < R; r++) acc[u][r] = _mm512_setzero_ps();
    for (; b + 3 < nb; b += 4) {
        prefetch_ahead(w + size * b, 4 * size);
        signed_pair(w + size * b, size, x, x_row, b, acc[0], iq4, R);
        signed_pair(w + size * (b + 2), size, x, x_row, b + 2, acc[1], iq4, R);
    }
    if (b + 1 < nb) signed_pair(w + size * b, size, x, x_row, b, acc[0], iq4, R), b += 2;
    __m256 last[DOT_ROWS];
    for (int r = 0; r < R; r++) last[r] = _mm256_setzero_ps();
    if (b < nb) signed_block(w + size * b, x, x_row, b, last, iq4, R);
    for (int r = 0; r < R; r++)
        y[r * y_step] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r])) + hsum_ps(last[r]);
}
#endif

ROWS_INLINE void signed_rows(const uint8_t *w, const uint8_t *x, size_t x_row, int K, float *y, size_t y_step,
                           const int iq4, const int R) {
    int nb = K / 32, size = iq4 ? 18 : 34, b = 0;
#ifdef USE_Q8_0_PAIRS
    // Q8_0 keeps these row kernels on AVX-512 without AMX, prompts too: with the per-block steps
    // below it decodes 1.2x slower than on these 512-bit dots (3B, 2 threads; eight blocks' sums
    // reduced together did not close it), and decoding is where a chat spends its time, though
    // its prompts then miss the few-rows dots, which take those steps (as they took the tiles
    // there, ~2x faster)
    if (!iq4) {
        signed_pair_rows(w, x, x_row, K, y, y_step, iq4, R);
        return;
    }
#endif
#if defined(USE_AVX2)
    // Each block's integer sum, then one multiply-add into chain b % 4 (the blocks past the last
    // four on chain 0), the chains added in pairs: the steps AMX's tiles take too
    // (amx_signed_task), so a prompt's rows there are bitwise a token decoded here.
    __m128 acc[DOT_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm_setzero_ps();
    for (; b + 3 < nb; b += 4) {
        const uint8_t *wb = w + size * b;
        prefetch_ahead(wb, 4 * size);
        __m256i q[4], magnitude[4];
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) q[u] = signed_codes(wb + size * u, iq4), magnitude[u] = _mm256_sign_epi8(q[u], q[u]);
        // the four scales in registers: four stores and a wider load would stall forwarding
        __m128 dw = _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, (short)read_u16(wb + 3 * size), (short)read_u16(wb + 2 * size),
                                               (short)read_u16(wb + size), (short)read_u16(wb)));
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const x_block32 *xb = X_BLOCK(x_block32, x, x_row, r, b);
            __m256i p[4];
#pragma GCC unroll 4
            for (int u = 0; u < 4; u++)
                p[u] = dot_u8_s8(magnitude[u], _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xb[u].q), q[u]), R);
            __m128 scale = _mm_mul_ps(dw, _mm_set_ps(xb[3].d, xb[2].d, xb[1].d, xb[0].d));
            acc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(hsum4_i32(p[0], p[1], p[2], p[3])), scale, acc[r]);
        }
    }
    for (; b < nb; b++) {
        const uint8_t *wb = w + size * b;
        __m256i q = signed_codes(wb, iq4), magnitude = _mm256_sign_epi8(q, q);
        float d = f16_to_f32(read_u16(wb));
        for (int r = 0; r < R; r++) {
            const x_block32 *xb = X_BLOCK(x_block32, x, x_row, r, b);
            int sum = hsum_i32(dot_u8_s8(magnitude, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xb->q), q), R));
            acc[r] = _mm_move_ss(acc[r], _mm_fmadd_ss(_mm_cvtepi32_ps(_mm_cvtsi32_si128(sum)), _mm_set_ss(d * xb->d), acc[r]));
        }
    }
    for (int r = 0; r < R; r++) {
        float lanes[4];
        _mm_storeu_ps(lanes, acc[r]);
        y[r * y_step] = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    }
#else
    float acc[DOT_ROWS];
    for (int r = 0; r < R; r++) acc[r] = 0;
    for (; b < nb; b++, w += size) {
        prefetch_ahead(w, size);
        int8_t q[32];
        for (int j = 0; j < 16 && iq4; j++) q[j] = IQ4_LEVELS[w[2 + j] & 15], q[j + 16] = IQ4_LEVELS[w[2 + j] >> 4];
        if (!iq4) memcpy(q, w + 2, 32);
        float d = f16_to_f32(read_u16(w));
        for (int r = 0; r < R; r++) {
            const x_block32 *xb = X_BLOCK(x_block32, x, x_row, r, b);
            int sum = 0;
            for (int j = 0; j < 32; j++) sum += q[j] * xb->q[j];
            acc[r] += d * xb->d * sum;
        }
    }
    for (int r = 0; r < R; r++) y[r * y_step] = acc[r];
#endif
}

// Q4_0: w = d (q - 8); Q4_1: w = d q + m; Q5_0 and Q5_1 the same with a fifth bit (qh, a u32
// after d and m: bit j is code j's bit 4) and Q5_0's zero at 16. All: sum_j w_j x_j =
// d dx sum(q xq) + c sx, with c = m or -zero d. Blocks in flight as Q8_0's.

#ifdef USE_AVX2
// A block's codes and its [d, c] scales (c = m, or d for the zero's term)
static inline __m256i q4_q5_codes(const uint8_t *w, const int with_min, const int with_high, __m128 *weight_scales) {
    int qh_at = with_min ? 4 : 2;
    __m256i q = nibbles_32(w + qh_at + (with_high ? 4 : 0));
    if (with_high) {
        uint32_t qh;
        memcpy(&qh, w + qh_at, 4);
        q = _mm256_or_si256(q, bits_as_0x10(qh));
    }
    uint32_t bits;
    if (with_min) memcpy(&bits, w, 4);
    else bits = read_u16(w) * 0x10001u;
    *weight_scales = _mm_cvtph_ps(_mm_cvtsi32_si128((int)bits));
    return q;
}
#endif


ROWS_INLINE void q4_q5_rows(const uint8_t *w, const uint8_t *x, size_t x_row, int K, float *y, size_t y_step,
                            const int with_min, const int with_high, const int R) {
    int nb = K / 32, size = (with_min ? 20 : 18) + (with_high ? 4 : 0), zero = with_high ? 16 : 8, b = 0;
#if defined(USE_AVX2)
    // Each block's integer sum, one multiply-add into chain b % 4 (the blocks past the last four on
    // chain 0), the chains added in pairs, the offsets' chain beside: AMX's steps (amx_q4_q5_task)
    __m128 acc[DOT_ROWS], offsets[DOT_ROWS];
    for (int r = 0; r < R; r++) acc[r] = offsets[r] = _mm_setzero_ps();
    for (; b + 3 < nb; b += 4) {
        const uint8_t *wb = w + size * b;
        prefetch_ahead(wb, 4 * size);
        __m256i q[4];
        __m128 weight_scales[4];
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) q[u] = q4_q5_codes(wb + size * u, with_min, with_high, &weight_scales[u]);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const x_block32 *xb = X_BLOCK(x_block32, x, x_row, r, b);
            __m128 scales[4];
            __m256i p[4];
#pragma GCC unroll 4
            for (int u = 0; u < 4; u++) {
                scales[u] = _mm_mul_ps(weight_scales[u], _mm_castpd_ps(_mm_load_sd((const double *)&xb[u].d)));
                offsets[r] = _mm_add_ps(offsets[r], scales[u]);
                p[u] = dot_u8_s8(q[u], _mm256_loadu_si256((const __m256i *)xb[u].q), R);
            }
            __m128 d4 = _mm_movelh_ps(_mm_unpacklo_ps(scales[0], scales[1]), _mm_unpacklo_ps(scales[2], scales[3]));
            acc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(hsum4_i32(p[0], p[1], p[2], p[3])), d4, acc[r]);
        }
    }
    for (; b < nb; b++) {
        __m128 weight_scales;
        __m256i q = q4_q5_codes(w + size * b, with_min, with_high, &weight_scales);
        for (int r = 0; r < R; r++) {
            const x_block32 *xb = X_BLOCK(x_block32, x, x_row, r, b);
            __m128 scales = _mm_mul_ps(weight_scales, _mm_castpd_ps(_mm_load_sd((const double *)&xb->d)));
            offsets[r] = _mm_add_ps(offsets[r], scales);
            int sum = hsum_i32(dot_u8_s8(q, _mm256_loadu_si256((const __m256i *)xb->q), R));
            acc[r] = _mm_move_ss(acc[r], _mm_fmadd_ss(_mm_cvtepi32_ps(_mm_cvtsi32_si128(sum)), scales, acc[r]));
        }
    }
    for (int r = 0; r < R; r++) {
        float lanes[4], offset = _mm_cvtss_f32(_mm_shuffle_ps(offsets[r], offsets[r], 1)) * (with_min ? 1 : -zero);
        _mm_storeu_ps(lanes, acc[r]);
        y[r * y_step] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + offset;
    }
#else
    int qh_at = with_min ? 4 : 2, codes = qh_at + (with_high ? 4 : 0);
    float sum[DOT_ROWS], offset[DOT_ROWS];
    for (int r = 0; r < R; r++) sum[r] = offset[r] = 0;
    for (; b < nb; b++, w += size) {
        prefetch_ahead(w, size);
        float d = f16_to_f32(read_u16(w)), c = with_min ? f16_to_f32(read_u16(w + 2)) : -zero * d;
        uint32_t qh = 0;
        if (with_high) memcpy(&qh, w + qh_at, 4);
        int q[32];
        for (int j = 0; j < 16; j++) {
            q[j] = (w[codes + j] & 15) | ((qh >> j) & 1) << 4;
            q[j + 16] = (w[codes + j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
        }
        for (int r = 0; r < R; r++) {
            const x_block32 *xb = X_BLOCK(x_block32, x, x_row, r, b);
            offset[r] += c * xb->s;
            int dot = 0;
            for (int j = 0; j < 32; j++) dot += q[j] * xb->q[j];
            sum[r] += d * xb->d * dot;
        }
    }
    for (int r = 0; r < R; r++) y[r * y_step] = sum[r] + offset[r];
#endif
}

// Q4_K: 8 groups of 32 with 6-bit scales and mins: w = d sc q - dmin m; Q5_K the same with
// qh[32] after the scales (bit 4 of group s's code l is bit s of qh[l]) and qs after qh. The 12 scale bytes as
// three words a, b, c: scales 0-3 = a & 63, mins 0-3 = b & 63, scales 4-7 = low nibbles of c
// with a's top 2 bits above, mins 4-7 = high nibbles of c with b's top bits (ggml's get_scale_min_k4).
static inline void q4_k_scales(const uint8_t *s, uint32_t sc[2], uint32_t mn[2]) {
    uint32_t a, b, c;
    memcpy(&a, s, 4);
    memcpy(&b, s + 4, 4);
    memcpy(&c, s + 8, 4);
    sc[0] = a & 0x3f3f3f3f;
    mn[0] = b & 0x3f3f3f3f;
    sc[1] = (c & 0x0f0f0f0f) | ((a >> 2) & 0x30303030);
    mn[1] = ((c >> 4) & 0x0f0f0f0f) | ((b >> 2) & 0x30303030);
}

#ifdef USE_AVX2
// Sub-blocks 2j (lo: low nibbles) and 2j + 1 (hi: high nibbles) of a Q4_K or Q5_K block's codes;
// Q5_K's fifth bits are bit 2j (lo) and 2j + 1 (hi) of qh[l].
static inline void q4_q5_k_codes(const uint8_t *w, int qs_at, int j, const int with_high, __m256i *lo, __m256i *hi) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
    __m256i q = _mm256_loadu_si256((const __m256i *)(w + qs_at + 32 * j));
    *lo = _mm256_and_si256(q, low4), *hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
    if (with_high) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(w + 16));
        *lo = _mm256_or_si256(*lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * j)), one), 4));
        *hi = _mm256_or_si256(*hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * j + 1)), one), 4));
    }
}
#endif

ROWS_INLINE void q4_q5_k_rows(const uint8_t *w, const uint8_t *x, size_t x_row, int K, float *y, size_t y_step,
                              const int with_high, const int R) {
    int nb = K / 256, size = with_high ? 176 : 144, qs_at = with_high ? 48 : 16;
#if defined(USE_AVX512)
    float acc[DOT_ROWS], acc_min[DOT_ROWS];
    for (int r = 0; r < R; r++) acc[r] = acc_min[r] = 0;
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    // 32 bytes of nibbles in both halves: the low nibbles kept in the lower half, the high ones
    // shifted down in the upper, so 64 codes lie in the activations' order
    const __m512i nibble_shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    for (int b = 0; b < nb; b++, w += size) {
        prefetch_ahead(w, size);
        float d = f16_to_f32(read_u16(w)), dmin = f16_to_f32(read_u16(w + 2));
        uint32_t sc[2], mn[2];
        q4_k_scales(w + 4, sc, mn);
        __m128i mins = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, mn[1], mn[0]));
        __m512i scales = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_set_epi32(0, 0, sc[1], sc[0])));
        __m512i sum[DOT_ROWS];
        for (int r = 0; r < R; r++) sum[r] = _mm512_setzero_si512();
        for (int j = 0; j < 4; j++) {
            __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w + qs_at + 32 * j)));
            __m512i codes = _mm512_and_si512(_mm512_srlv_epi16(q, nibble_shift), low4);
            if (with_high) {  // bit 2j of qh[l] to bit 4 of the low code, bit 2j + 1 to the high's
                __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w + 16)));
                __m512i at = _mm512_inserti64x4(_mm512_set1_epi16((short)(2 * j)), _mm256_set1_epi16((short)(2 * j + 1)), 1);
                codes = _mm512_or_si512(codes, _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(h, at), _mm512_set1_epi8(1)), 4));
            }
            // int16 lanes of the low 32 codes take scale 2j, the high 32's scale 2j + 1
            __m512i lanes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16((short)(2 * j))), _mm256_set1_epi16((short)(2 * j + 1)), 1);
            __m512i s = _mm512_permutexvar_epi16(lanes, scales);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                const int8_t *xq = X_BLOCK(x_block256, x, x_row, r, b)->q + 64 * j;
                // codes <= 15, |x| <= 127: the int16 pair sums cannot saturate
                sum[r] = _mm512_dpwssd_epi32(sum[r], _mm512_maddubs_epi16(codes, _mm512_loadu_si512(xq)), s);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const x_block256 *xb = X_BLOCK(x_block256, x, x_row, r, b);
            __m128i m = _mm_madd_epi16(mins, _mm_loadu_si128((const __m128i *)xb->sums32));
            // each block's integer sums, then one multiply-add each: the steps the tiles take
            // too (amx_q4_q5_k_task), so a prompt's rows there are bitwise a token decoded here
            acc_min[r] = fmaf((float)hsum_i32_128(m), dmin * xb->d, acc_min[r]);
            acc[r] = fmaf((float)_mm512_reduce_add_epi32(sum[r]), d * xb->d, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) y[r * y_step] = acc[r] - acc_min[r];
#elif defined(USE_AVX2)
    float acc[DOT_ROWS], acc_min[DOT_ROWS];  // the AVX-512 form's steps (and bits): the tiles' (amx_q4_q5_k_task)
    for (int r = 0; r < R; r++) acc[r] = acc_min[r] = 0;
    for (int b = 0; b < nb; b++, w += size) {
        prefetch_ahead(w, size);
        float d = f16_to_f32(read_u16(w)), dmin = f16_to_f32(read_u16(w + 2));
        uint32_t sc[2], mn[2];
        q4_k_scales(w + 4, sc, mn);
        __m128i mins = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, mn[1], mn[0]));
        // the 8 scales as int16 in both lanes; shuffles broadcast one to a whole register
        __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_set_epi32(0, 0, sc[1], sc[0])));
        __m256i sum[DOT_ROWS];
        for (int r = 0; r < R; r++) sum[r] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            __m256i lo, hi;
            q4_q5_k_codes(w, qs_at, j, with_high, &lo, &hi);
            __m256i slo = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short)((4 * j + 1) << 8 | 4 * j)));
            __m256i shi = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short)((4 * j + 3) << 8 | (4 * j + 2))));
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                const int8_t *xq = X_BLOCK(x_block256, x, x_row, r, b)->q + 64 * j;
                // codes <= 15, |x| <= 127: the int16 pair sums cannot saturate; scales fold in via madd
                __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xq));
                __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + 32)));
                sum[r] = add_dot_i16(add_dot_i16(sum[r], plo, slo, R), phi, shi, R);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const x_block256 *xb = X_BLOCK(x_block256, x, x_row, r, b);
            __m128i m = _mm_madd_epi16(mins, _mm_loadu_si128((const __m128i *)xb->sums32));
            acc_min[r] = fmaf((float)hsum_i32_128(m), dmin * xb->d, acc_min[r]);
            acc[r] = fmaf((float)hsum_i32(sum[r]), d * xb->d, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) y[r * y_step] = acc[r] - acc_min[r];
#else
    float acc[DOT_ROWS];
    for (int r = 0; r < R; r++) acc[r] = 0;
    for (int b = 0; b < nb; b++, w += size) {
        prefetch_ahead(w, size);
        float d = f16_to_f32(read_u16(w)), dmin = f16_to_f32(read_u16(w + 2));
        uint32_t scw[2], mnw[2];
        q4_k_scales(w + 4, scw, mnw);
        const uint8_t *sc = (const uint8_t *)scw, *mn = (const uint8_t *)mnw;
        for (int r = 0; r < R; r++) {
            const x_block256 *xb = X_BLOCK(x_block256, x, x_row, r, b);
            const uint8_t *qs = w + qs_at, *qh = w + 16;
            const int8_t *xq = xb->q;
            int sum = 0, mins = 0;
            for (int j = 0; j < 8; j++) mins += mn[j] * xb->sums32[j];
            for (int j = 0; j < 4; j++, qs += 32, xq += 64) {
                int lo = 0, hi = 0;
                for (int l = 0; l < 32; l++) {
                    int h = with_high ? qh[l] >> 2 * j : 0;
                    lo += ((qs[l] & 15) | (h & 1) << 4) * xq[l];
                    hi += ((qs[l] >> 4) | (h & 2) << 3) * xq[l + 32];
                }
                sum += sc[2 * j] * lo + sc[2 * j + 1] * hi;
            }
            acc[r] += d * xb->d * sum - dmin * xb->d * mins;
        }
    }
    for (int r = 0; r < R; r++) y[r * y_step] = acc[r];
#endif
}

// Q6_K: 16 groups of 16 with int8 scales: w = d sc (q - 32), q = 4 low bits (ql) | 2 high (qh).
// Per half of 128: codes l, l+32, l+64, l+96 take ql[l] low, ql[l+32] low, ql[l] high,
// ql[l+32] high nibbles and bits 0-1, 2-3, 4-5, 6-7 of qh[l] (ggml's dequantize_row_q6_K).
#ifdef USE_AVX512
// Q6_K's int16 lanes of 64 codes (after maddubs) to their scale among a half's 8: 16 codes a scale.
static const int16_t Q6_K_SCALE_LANES[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                             2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
#endif

#ifdef USE_AVX2
// A half's 128 codes, 32 at a time in the activations' order, from its ql[64] and qh[32].
static inline void q6_k_codes(const uint8_t *ql, const uint8_t *qh, __m256i q[4]) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), low2 = _mm256_set1_epi8(0x03);
    __m256i h = _mm256_loadu_si256((const __m256i *)qh);
    __m256i l0 = _mm256_loadu_si256((const __m256i *)ql), l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
    q[0] = _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_slli_epi16(_mm256_and_si256(h, low2), 4));
    q[1] = _mm256_or_si256(_mm256_and_si256(l1, low4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), low2), 4));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), low2), 4));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), low2), 4));
}
#endif

ROWS_INLINE void q6_k_rows(const uint8_t *w, const uint8_t *x, size_t x_row, int K, float *y, size_t y_step, const int R) {
    int nb = K / 256;
#if defined(USE_AVX512)
    float block_acc[DOT_ROWS];  // each block's integer sum less its shift, one multiply-add: the tiles' steps (amx_q6_k_task)
    int shifts[DOT_ROWS];
    for (int r = 0; r < R; r++) block_acc[r] = 0;
    const __m512i low4 = _mm512_set1_epi8(0x0f), low2 = _mm512_set1_epi8(0x03);
    const __m512i scale_lanes = _mm512_loadu_si512(Q6_K_SCALE_LANES);
    // codes 0-63 of a half take qh's bits 0-1 (lower 32) and 2-3 (upper); codes 64-127 bits 4-5 and 6-7
    const __m512i shift_01 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    const __m512i shift_23 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1);
    for (int b = 0; b < nb; b++, w += 210) {
        prefetch_ahead(w, 210);
        const uint8_t *ql = w, *qh = w + 128;
        float d = f16_to_f32(read_u16(w + 208));
        __m256i scales = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 192)));
        __m512i sum[DOT_ROWS];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const x_block256 *xb = X_BLOCK(x_block256, x, x_row, r, b);
            __m256i shift = _mm256_madd_epi16(scales, _mm256_loadu_si256((const __m256i *)xb->sums));
            shifts[r] = hsum_i32(shift);
            sum[r] = _mm512_setzero_si512();
        }
        for (int half = 0; half < 2; half++, ql += 64, qh += 32) {
            __m512i l = _mm512_loadu_si512(ql), h = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)qh));
            __m512i q01 = _mm512_or_si512(_mm512_and_si512(l, low4), _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(h, shift_01), low2), 4));
            __m512i q23 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), low4),
                                          _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(h, shift_23), low2), 4));
            __m512i lanes = _mm512_add_epi16(scale_lanes, _mm512_set1_epi16((short)(8 * half)));
            __m512i s01 = _mm512_permutexvar_epi16(lanes, _mm512_castsi256_si512(scales));
            __m512i s23 = _mm512_permutexvar_epi16(_mm512_add_epi16(lanes, _mm512_set1_epi16(4)), _mm512_castsi256_si512(scales));
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                const int8_t *xq = X_BLOCK(x_block256, x, x_row, r, b)->q + 128 * half;
                // codes <= 63, |x| <= 127: no int16 saturation
                sum[r] = _mm512_dpwssd_epi32(sum[r], _mm512_maddubs_epi16(q01, _mm512_loadu_si512(xq)), s01);
                sum[r] = _mm512_dpwssd_epi32(sum[r], _mm512_maddubs_epi16(q23, _mm512_loadu_si512(xq + 64)), s23);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++)
            block_acc[r] = fmaf((float)(_mm512_reduce_add_epi32(sum[r]) - 32 * shifts[r]), d * X_BLOCK(x_block256, x, x_row, r, b)->d, block_acc[r]);
    }
    for (int r = 0; r < R; r++) y[r * y_step] = block_acc[r];
#elif defined(USE_AVX2)
    float block_acc[DOT_ROWS];  // the AVX-512 form's steps (and bits)
    int shifts[DOT_ROWS];
    for (int r = 0; r < R; r++) block_acc[r] = 0;
    for (int b = 0; b < nb; b++, w += 210) {
        prefetch_ahead(w, 210);
        const uint8_t *ql = w, *qh = w + 128;
        float d = f16_to_f32(read_u16(w + 208));
        __m256i scales = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 192)));
        __m256i sum[DOT_ROWS];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const x_block256 *xb = X_BLOCK(x_block256, x, x_row, r, b);
            shifts[r] = hsum_i32(_mm256_madd_epi16(scales, _mm256_loadu_si256((const __m256i *)xb->sums)));
            sum[r] = _mm256_setzero_si256();
        }
        for (int half = 0; half < 2; half++, ql += 64, qh += 32) {
            __m256i half_scales = _mm256_broadcastsi128_si256(half ? _mm256_extracti128_si256(scales, 1) : _mm256_castsi256_si128(scales));
            __m256i q[4];
            q6_k_codes(ql, qh, q);
            // scale 2k for the low 16 codes, 2k + 1 for the high: int16 lanes of this half's 8
            __m256i s[4];
            for (int k = 0; k < 4; k++)
                s[k] = _mm256_shuffle_epi8(half_scales, _mm256_set_m128i(_mm_set1_epi16((short)((4 * k + 3) << 8 | (4 * k + 2))),
                                                                        _mm_set1_epi16((short)((4 * k + 1) << 8 | 4 * k))));
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                const int8_t *xq = X_BLOCK(x_block256, x, x_row, r, b)->q + 128 * half;
                // codes <= 63, |x| <= 127: no int16 saturation; each 16 codes take their own scale
                for (int k = 0; k < 4; k++)
                    sum[r] = add_dot_i16(sum[r], _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i *)(xq + 32 * k))), s[k], R);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++)
            block_acc[r] = fmaf((float)(hsum_i32(sum[r]) - 32 * shifts[r]), d * X_BLOCK(x_block256, x, x_row, r, b)->d, block_acc[r]);
    }
    for (int r = 0; r < R; r++) y[r * y_step] = block_acc[r];
#else
    float acc[DOT_ROWS];
    for (int r = 0; r < R; r++) acc[r] = 0;
    for (int b = 0; b < nb; b++, w += 210) {
        prefetch_ahead(w, 210);
        float d = f16_to_f32(read_u16(w + 208));
        for (int r = 0; r < R; r++) {
            const x_block256 *xb = X_BLOCK(x_block256, x, x_row, r, b);
            const uint8_t *ql = w, *qh = w + 128;
            const int8_t *sc = (const int8_t *)(w + 192), *xq = xb->q;
            int sum = 0, shift = 0;
            for (int g = 0; g < 16; g++) shift += sc[g] * xb->sums[g];
            for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8, xq += 128) {
                for (int l = 0; l < 32; l++) {
                    int g = l / 16;
                    sum += sc[g] * ((ql[l] & 15) | ((qh[l] & 3) << 4)) * xq[l];
                    sum += sc[g + 2] * ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) * xq[l + 32];
                    sum += sc[g + 4] * ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) * xq[l + 64];
                    sum += sc[g + 6] * ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) * xq[l + 96];
                }
            }
            acc[r] += d * xb->d * (sum - 32 * shift);
        }
    }
    for (int r = 0; r < R; r++) y[r * y_step] = acc[r];
#endif
}

// Q2_K: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin: 16 groups of 16,
// w = d sc q - dmin m. Q3_K: hmask[32], qs[64], scales[12], d: 16 groups of 16 with 6-bit scales
// minus 32, w = d sc (q - 4), q's third bit from hmask. Code 32 j + l of each half n (128 values)
// is 2 bits of qs[32 n + l] at shift 2 j (and Q3_K's bit 4 n + j of hmask[l]) (ggml's
// dequantize_row_q2_K and _q3_K). Both offsets are per group: m (Q2_K) or 4 sc (Q3_K).
// Q3_K's 16 scales from its 12 bytes (before the -32) as four words: low 4 bits from the nibbles
// of bytes 0-7, top 2 from pairs of bits of bytes 8-11, four at a time (as ggml does).
static inline void q3_k_scale_words(const uint8_t *s, uint32_t out[4]) {
    uint32_t a[3];
    memcpy(a, s, 12);
    out[0] = (a[0] & 0x0f0f0f0f) | (a[2] & 0x03030303) << 4;
    out[1] = (a[1] & 0x0f0f0f0f) | ((a[2] >> 2) & 0x03030303) << 4;
    out[2] = ((a[0] >> 4) & 0x0f0f0f0f) | ((a[2] >> 4) & 0x03030303) << 4;
    out[3] = ((a[1] >> 4) & 0x0f0f0f0f) | ((a[2] >> 6) & 0x03030303) << 4;
}

// The 16 groups' scales and offsets as int16: Q2_K's scale and min nibbles, Q3_K's scale twice.
static inline void q2_q3_k_scales(const uint8_t *w, const int q3, int16_t sc[16], int16_t off[16]) {
    uint32_t words[4];
    q3_k_scale_words(w + 96, words);
    for (int g = 0; g < 16; g++) {
        sc[g] = q3 ? ((const uint8_t *)words)[g] - 32 : w[g] & 15;
        off[g] = q3 ? sc[g] : w[g] >> 4;
    }
}

#ifdef USE_AVX2
// Codes 32 j to 32 j + 31 of half n: two bits of the half's 32 qs bytes at shift 2 j, and Q3_K's
// third from bit 4 n + j of the 32 hmask bytes (high)
static inline __m256i q2_q3_k_codes(__m256i bits, __m256i high, int n, int j, const int q3) {
    __m256i q = _mm256_and_si256(_mm256_srl_epi16(bits, _mm_cvtsi32_si128(2 * j)), _mm256_set1_epi8(3));
    if (q3) q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(high, _mm_cvtsi32_si128(4 * n + j)), _mm256_set1_epi8(1)), 2));
    return q;
}

// The int16 scales of codes 32 j to 32 j + 31 of a half (its 8 scales in both lanes): the low 16
// codes take scale 2j, the high 16 scale 2j + 1
static inline __m256i q2_q3_k_scale_lanes(__m256i half_scales, int j) {
    return _mm256_shuffle_epi8(half_scales, _mm256_set_m128i(_mm_set1_epi16((short)((4 * j + 3) << 8 | (4 * j + 2))),
                                                             _mm_set1_epi16((short)((4 * j + 1) << 8 | 4 * j))));
}
#endif

ROWS_INLINE void q2_q3_k_rows(const uint8_t *w, const uint8_t *x, size_t x_row, int K, float *y, size_t y_step,
                              const int q3, const int R) {
    int nb = K / 256, size = q3 ? 110 : 84, qs_at = q3 ? 32 : 16;
#ifdef USE_AVX2
    // each block's integer sums, one multiply-add each: the tiles' and the few-rows dots' steps;
    // Q3_K's offset in the integer sum (sc (q - 4) summed), Q2_K's mins on their own chain
    float acc[DOT_ROWS], acc_off[DOT_ROWS];
    int offset[DOT_ROWS];
    for (int r = 0; r < R; r++) acc[r] = acc_off[r] = 0;
    for (int b = 0; b < nb; b++, w += size) {
        prefetch_ahead(w, size);
        float d = f16_to_f32(read_u16(w + (q3 ? 108 : 80))), off_scale = q3 ? 4 * d : f16_to_f32(read_u16(w + 82));
        __m256i scales, offsets;
        if (q3) {
            uint32_t words[4];  // in registers: a store and a wider load would stall forwarding
            q3_k_scale_words(w + 96, words);
            __m128i sc = _mm_sub_epi8(_mm_set_epi32((int)words[3], (int)words[2], (int)words[1], (int)words[0]), _mm_set1_epi8(32));
            scales = offsets = _mm256_cvtepi8_epi16(sc);
        } else {
            __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)w));
            scales = _mm256_and_si256(bytes, _mm256_set1_epi16(15));
            offsets = _mm256_srli_epi16(bytes, 4);
        }
        __m256i sum[DOT_ROWS];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const x_block256 *xb = X_BLOCK(x_block256, x, x_row, r, b);
            __m256i o = _mm256_madd_epi16(offsets, _mm256_loadu_si256((const __m256i *)xb->sums));
            offset[r] = hsum_i32(o);
            sum[r] = _mm256_setzero_si256();
        }
        for (int n = 0; n < 2; n++) {
            __m256i half_scales = _mm256_broadcastsi128_si256(n ? _mm256_extracti128_si256(scales, 1) : _mm256_castsi256_si128(scales));
            __m256i bits = _mm256_loadu_si256((const __m256i *)(w + qs_at + 32 * n)), high = _mm256_loadu_si256((const __m256i *)w);
            for (int j = 0; j < 4; j++) {
                __m256i q = q2_q3_k_codes(bits, high, n, j, q3), s = q2_q3_k_scale_lanes(half_scales, j);
#pragma GCC unroll 8
                for (int r = 0; r < R; r++) {
                    const int8_t *xq = X_BLOCK(x_block256, x, x_row, r, b)->q + 128 * n + 32 * j;
                    // codes <= 7, |x| <= 127: no int16 saturation
                    sum[r] = add_dot_i16(sum[r], _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)xq)), s, R);
                }
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            float dx = X_BLOCK(x_block256, x, x_row, r, b)->d;
            if (q3) acc[r] = fmaf((float)(hsum_i32(sum[r]) - 4 * offset[r]), d * dx, acc[r]);
            else acc[r] = fmaf((float)hsum_i32(sum[r]), d * dx, acc[r]), acc_off[r] = fmaf((float)offset[r], off_scale * dx, acc_off[r]);
        }
    }
    for (int r = 0; r < R; r++) y[r * y_step] = acc[r] - acc_off[r];
#else
    float acc[DOT_ROWS];
    for (int r = 0; r < R; r++) acc[r] = 0;
    for (int b = 0; b < nb; b++, w += size) {
        prefetch_ahead(w, size);
        float d = f16_to_f32(read_u16(w + (q3 ? 108 : 80))), off_scale = q3 ? 4 * d : f16_to_f32(read_u16(w + 82));
        int16_t sc[16], off[16];
        q2_q3_k_scales(w, q3, sc, off);
        for (int r = 0; r < R; r++) {
            const x_block256 *xb = X_BLOCK(x_block256, x, x_row, r, b);
            int sum = 0, offset = 0;
            for (int g = 0; g < 16; g++) offset += off[g] * xb->sums[g];
            for (int n = 0; n < 2; n++)
                for (int j = 0; j < 4; j++)
                    for (int l = 0; l < 32; l++) {
                        int q = (w[qs_at + 32 * n + l] >> 2 * j) & 3;
                        if (q3) q |= ((w[l] >> (4 * n + j)) & 1) << 2;
                        sum += sc[8 * n + 2 * j + l / 16] * q * xb->q[128 * n + 32 * j + l];
                    }
            acc[r] += d * xb->d * sum - off_scale * xb->d * offset;
        }
    }
    for (int r = 0; r < R; r++) y[r * y_step] = acc[r];
#endif
}

// IQ4_XS: d, scales_h (u16), scales_l[4], qs[128]: 8 sub-blocks of 32 with 6-bit scales minus 32
// (low 4 bits from scales_l's nibbles, top 2 from scales_h), w = d * (ls - 32) * level[q], the
// 4-bit q of each sub-block in Q4_0's order.
static inline int iq4_xs_scale(const uint8_t *w, int s) {
    return (((w[4 + s / 2] >> 4 * (s % 2)) & 15) | ((read_u16(w + 2) >> 2 * s) & 3) << 4) - 32;
}

ROWS_INLINE void iq4_xs_rows(const uint8_t *w, const uint8_t *x, size_t x_row, int K, float *y, size_t y_step, const int R) {
    int nb = K / 256;
#if defined(USE_AVX2)
    float acc[DOT_ROWS];  // each block's integer sum, one multiply-add: AMX's steps (amx_iq4_xs_task)
    for (int r = 0; r < R; r++) acc[r] = 0;
    const __m256i levels = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_LEVELS));
    for (int b = 0; b < nb; b++, w += 136) {
        prefetch_ahead(w, 136);
        float d = f16_to_f32(read_u16(w));
        __m256i sum[DOT_ROWS];
        for (int r = 0; r < R; r++) sum[r] = _mm256_setzero_si256();
        for (int s = 0; s < 8; s++) {
            __m256i q = _mm256_shuffle_epi8(levels, nibbles_32(w + 8 + 16 * s)), magnitude = _mm256_sign_epi8(q, q);
            __m256i scale = _mm256_set1_epi16((short)iq4_xs_scale(w, s));
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                const int8_t *xq = X_BLOCK(x_block256, x, x_row, r, b)->q + 32 * s;
                // |level| <= 127 and |x| <= 127: the int16 pair sums cannot saturate
                __m256i p = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xq), q));
                sum[r] = add_dot_i16(sum[r], p, scale, R);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            float dx = X_BLOCK(x_block256, x, x_row, r, b)->d;
            acc[r] = fmaf((float)hsum_i32(sum[r]), d * dx, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) y[r * y_step] = acc[r];
#else
    float acc[DOT_ROWS];
    for (int r = 0; r < R; r++) acc[r] = 0;
    for (int b = 0; b < nb; b++, w += 136) {
        prefetch_ahead(w, 136);
        float d = f16_to_f32(read_u16(w));
        for (int r = 0; r < R; r++) {
            const int8_t *xq = X_BLOCK(x_block256, x, x_row, r, b)->q;
            int sum = 0;
            for (int s = 0; s < 8; s++, xq += 32) {
                const uint8_t *qs = w + 8 + 16 * s;
                int dot = 0;
                for (int j = 0; j < 16; j++) dot += IQ4_LEVELS[qs[j] & 15] * xq[j] + IQ4_LEVELS[qs[j] >> 4] * xq[j + 16];
                sum += iq4_xs_scale(w, s) * dot;
            }
            acc[r] += d * X_BLOCK(x_block256, x, x_row, r, b)->d * sum;
        }
    }
    for (int r = 0; r < R; r++) y[r * y_step] = acc[r];
#endif
}

// Each type's row function with R as a constant, from one input row (decode) to DOT_ROWS.
typedef void (*rows_fn)(const uint8_t *w, const uint8_t *x, size_t x_row, int K, float *y, size_t y_step, int R);

#if DOT_ROWS == 8
#define ROWS_PAST_4(name) \
        else if (R == 7) name##_rows(w, x, x_row, K, y, y_step, 7); \
        else if (R == 6) name##_rows(w, x, x_row, K, y, y_step, 6); \
        else if (R == 5) name##_rows(w, x, x_row, K, y, y_step, 5);
#else
#define ROWS_PAST_4(name)
#endif
#define ROWS_FN(name) \
    static void dot_##name(const uint8_t *w, const uint8_t *x, size_t x_row, int K, float *y, size_t y_step, int R) { \
        if (R == DOT_ROWS) name##_rows(w, x, x_row, K, y, y_step, DOT_ROWS); \
        ROWS_PAST_4(name) \
        else if (R == 4) name##_rows(w, x, x_row, K, y, y_step, 4); \
        else if (R == 3) name##_rows(w, x, x_row, K, y, y_step, 3); \
        else if (R == 2) name##_rows(w, x, x_row, K, y, y_step, 2); \
        else name##_rows(w, x, x_row, K, y, y_step, 1); \
    }
#define q4_k_rows(w, x, x_row, K, y, y_step, R) q4_q5_k_rows(w, x, x_row, K, y, y_step, 0, R)
#define q5_k_rows(w, x, x_row, K, y, y_step, R) q4_q5_k_rows(w, x, x_row, K, y, y_step, 1, R)
#define q2_k_rows(w, x, x_row, K, y, y_step, R) q2_q3_k_rows(w, x, x_row, K, y, y_step, 0, R)
#define q3_k_rows(w, x, x_row, K, y, y_step, R) q2_q3_k_rows(w, x, x_row, K, y, y_step, 1, R)
#define q4_0_rows(w, x, x_row, K, y, y_step, R) q4_q5_rows(w, x, x_row, K, y, y_step, 0, 0, R)
#define q4_1_rows(w, x, x_row, K, y, y_step, R) q4_q5_rows(w, x, x_row, K, y, y_step, 1, 0, R)
#define q5_0_rows(w, x, x_row, K, y, y_step, R) q4_q5_rows(w, x, x_row, K, y, y_step, 0, 1, R)
#define q5_1_rows(w, x, x_row, K, y, y_step, R) q4_q5_rows(w, x, x_row, K, y, y_step, 1, 1, R)
#define q8_0_rows(w, x, x_row, K, y, y_step, R) signed_rows(w, x, x_row, K, y, y_step, 0, R)
#define iq4_nl_rows(w, x, x_row, K, y, y_step, R) signed_rows(w, x, x_row, K, y, y_step, 1, R)
ROWS_FN(q4_0)
ROWS_FN(q4_1)
ROWS_FN(q5_0)
ROWS_FN(q5_1)
ROWS_FN(q8_0)
ROWS_FN(iq4_nl)
ROWS_FN(q4_k)
ROWS_FN(q5_k)
ROWS_FN(q6_k)
ROWS_FN(q2_k)
ROWS_FN(q3_k)
ROWS_FN(iq4_xs)

#ifdef USE_AVX2
// A thread's scratch for one task's unpacked weights (the tiles', the few-rows dots'), kept
// between calls (threads are torch's pool).
static _Thread_local uint8_t *scratch_memory;
static _Thread_local size_t scratch_size;

static uint8_t *scratch(size_t bytes) {
    if (bytes > scratch_size) {
        free(scratch_memory);
        scratch_memory = aligned_alloc(64, (bytes + 63) / 64 * 64);
        scratch_size = scratch_memory ? bytes : 0;
    }
    return scratch_memory;
}
#endif

#ifdef USE_AMX
// --- a prompt's rows on AMX tiles ---
//
// One tile multiply takes 16 weight rows and 16 activation rows over 32 or 64 values into their
// 16 x 16 integer sums, ~1000 int8 products a cycle where the AVX-512 dots above reach ~20. A
// 32-value block with a float scale (Q4_0 to Q8_0, IQ4_NL) is one multiply. A K-quant's integer
// sub-block scales are folded into copies of the weight codes, one per digit of the scale (each
// copy's products still fit a byte), so its tiles accumulate a whole block 64 values at a time
// with no work between sub-blocks; IQ4_XS, whose levels leave no room, takes one multiply a
// sub-block. The sums then take, lane by lane, the float steps the row kernels take for one row
// (each block's integer sum, one multiply-add), so every output is bitwise the token decoded
// alone. The weights are unpacked once per 16 rows into a thread's scratch (A, row-major), the
// activations once per call into B's layout. Without AMX the few-rows dots (below) take a
// prompt's rows. The float steps take a tile's 16 activation rows in the lanes of one vector.

#define TILE 16
// tile registers (the intrinsics take literal numbers)
#define TILE_C 0  // 0-3: four results
#define TILE_A 4  // 4-5
#define TILE_B 6  // 6-7

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static int amx_allowed = 1;  // gguf_matmul_allow_amx (SMOLLM3_AMX)

// Linux hands out the tile registers' state only on request.
static int amx_usable(void) {
    static int state;  // 0: not asked yet, 1: granted, -1: refused (an older kernel, a sandbox)
    if (!state) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : -1;
    return amx_allowed && state > 0;
}

// Tiles for groups of 32 values (a block with one scale) or 64 (the K-quants', scales folded in)
static void amx_begin(int group) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 2; i++) {
        c.rows[TILE_A + i] = TILE, c.colsb[TILE_A + i] = group;          // a group's codes of each weight row
        c.rows[TILE_B + i] = group / 4, c.colsb[TILE_B + i] = 4 * TILE;  // of each activation row, 4 at a time
    }
    for (int i = 0; i < 4; i++) c.rows[TILE_C + i] = TILE, c.colsb[TILE_C + i] = 4 * TILE;  // int32: weight rows x activation rows
    _tile_loadconfig(&c);
}

// Four groups' sums, sums[j][weight row][activation row]: weight codes a (rows K bytes apart,
// group j at a + group j) by packed activations bx (group j at bx + 16 group j). Unsigned weight
// codes (the K-quants') or signed (Q8_0's, IQ4_NL's levels).
#define TILE_SUMS4(name, dp)                                                                                                          \
    static inline void name(const void *a, int K, const int8_t *bx, int group, int32_t sums[4][TILE][TILE]) {                      \
        const uint8_t *w = a;                                                                                                         \
        _tile_loadd(4, w, K);                                                                                                         \
        _tile_loadd(6, bx, 64);                                                                                                       \
        _tile_zero(0);                                                                                                                \
        dp(0, 4, 6);                                                                                                                  \
        _tile_loadd(5, w + group, K);                                                                                                 \
        _tile_loadd(7, bx + 16 * group, 64);                                                                                          \
        _tile_zero(1);                                                                                                                \
        dp(1, 5, 7);                                                                                                                  \
        _tile_loadd(4, w + 2 * group, K);                                                                                             \
        _tile_loadd(6, bx + 32 * group, 64);                                                                                          \
        _tile_zero(2);                                                                                                                \
        dp(2, 4, 6);                                                                                                                  \
        _tile_loadd(5, w + 3 * group, K);                                                                                             \
        _tile_loadd(7, bx + 48 * group, 64);                                                                                          \
        _tile_zero(3);                                                                                                                \
        dp(3, 5, 7);                                                                                                                  \
        _tile_stored(0, sums[0], 64);                                                                                                 \
        _tile_stored(1, sums[1], 64);                                                                                                 \
        _tile_stored(2, sums[2], 64);                                                                                                 \
        _tile_stored(3, sums[3], 64);                                                                                                 \
    }
TILE_SUMS4(tile_sums4_u8, _tile_dpbusd)
TILE_SUMS4(tile_sums4_s8, _tile_dpbssd)

// A K-quant block's integer sums, sums[p][weight row][activation row] for each of its copies
// p < planes of the weight codes (plane bytes apart, rows K apart, 256 values from a): the block
// 64 values a multiply into one tile a copy, against its packed activations bx. Unsigned codes,
// or signed.
static inline void block_sums(const uint8_t *a, size_t plane, const int planes, int K, const int8_t *bx, const int is_signed,
                              int32_t sums[][TILE][TILE]) {
    _tile_zero(0);
    if (planes > 1) _tile_zero(1);
    if (planes > 2) _tile_zero(2);
    for (int k = 0; k < 4; k++) {
        _tile_loadd(6, bx + 1024 * k, 64);
        _tile_loadd(4, a + 64 * k, K);
        if (is_signed) _tile_dpbssd(0, 4, 6);
        else _tile_dpbusd(0, 4, 6);
        if (planes > 1) {
            _tile_loadd(5, a + plane + 64 * k, K);
            if (is_signed) _tile_dpbssd(1, 5, 6);
            else _tile_dpbusd(1, 5, 6);
        }
        if (planes > 2) {
            _tile_loadd(4, a + 2 * plane + 64 * k, K);
            if (is_signed) _tile_dpbssd(2, 4, 6);
            else _tile_dpbusd(2, 4, 6);
        }
    }
    _tile_stored(0, sums[0], 64);
    if (planes > 1) _tile_stored(1, sums[1], 64);
    if (planes > 2) _tile_stored(2, sums[2], 64);
}

// The activations as the tiles take them, per 16 rows (rows past M are zeros): codes [G][8][64]
// for each group g of 32 values, code k of row m at (k / 4) * 64 + m * 4 + k % 4 (a group of 16
// is half of that); scales [blocks][16]; and for the K-quants the codes' sums as int16 pairs
// [blocks][pairs][16], of each 32 (pairs 4: Q4_K's and Q5_K's mins) or each 16 (pairs 8: Q2_K's).
typedef struct {
    const int8_t *codes;
    const float *dx, *sx;  // sx: the 32-value blocks' d * sum(q) [blocks][16] (Q4_0's to Q5_1's offsets)
    const int32_t *sums;
    int tiles;
} amx_x;

static void amx_pack_x(const uint8_t *xq, size_t x_row, int block, int pairs, int M, int K, int tile, int8_t *codes, float *dx,
                       float *sx, int32_t *sums) {
    int G = K / 32, nb = K / block;
    codes += (size_t)tile * G * 512, dx += (size_t)tile * nb * TILE, sx += (size_t)tile * nb * TILE, sums += (size_t)tile * nb * pairs * TILE;
    memset(codes, 0, (size_t)G * 512);
    for (int m = 0; m < TILE; m++) {
        int r = tile * TILE + m;
        for (int b = 0; b < nb; b++) {
            const int8_t *q = NULL;
            if (block == 32) {
                const x_block32 *xb = r < M ? X_BLOCK(x_block32, xq, x_row, r, b) : NULL;
                dx[b * TILE + m] = xb ? xb->d : 0, sx[b * TILE + m] = xb ? xb->s : 0, q = xb ? xb->q : NULL;
            } else {
                const x_block256 *xb = r < M ? X_BLOCK(x_block256, xq, x_row, r, b) : NULL;
                dx[b * TILE + m] = xb ? xb->d : 0, q = xb ? xb->q : NULL;
                const int16_t *group_sums = !xb ? NULL : pairs == 4 ? xb->sums32 : xb->sums;
                for (int k = 0; k < pairs; k++)
                    sums[(b * pairs + k) * TILE + m] =
                        xb ? (int32_t)((uint16_t)group_sums[2 * k] | (uint32_t)(uint16_t)group_sums[2 * k + 1] << 16) : 0;
            }
            for (int g = 0; q && g < block / 32; g++) {
                int8_t *dst = codes + (size_t)(b * block / 32 + g) * 512 + m * 4;
                for (int k = 0; k < 32; k += 4) memcpy(dst + (k / 4) * 64, q + 32 * g + k, 4);
            }
        }
    }
}

// A task's outputs, [16 weight rows][16 activation rows] per tile of activation rows, into y.
static void amx_store(const float out[TILE][TILE], int rows, int tile, int M, float *y, size_t y_row) {
    for (int m = 0; m < TILE && tile * TILE + m < M; m++)
        for (int n = 0; n < rows; n++) y[(size_t)(tile * TILE + m) * y_row + n] = out[n][m];
}

// A block's step for a vector of outputs (activation rows), as a row kernel takes it for one:
// acc + sum * (w * dx), dx the activation rows' scales, w the weight row's
static inline __m512 add_block(__m512 acc, __m512i sum, float w, __m512 dx) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(_mm512_set1_ps(w), dx), acc);
}

// Q8_0, IQ4_NL: one tile multiply a block; chain b % 4 of each output takes the block's
// multiply-add (the blocks past the last four chain 0), the chains added in pairs (signed_rows).
static int amx_signed_task(const uint8_t *const *row, int rows, int K, const amx_x *x, int M, float *y, size_t y_row, const int iq4) {
    int nb = K / 32, size = iq4 ? 18 : 34, last4 = nb & ~3;
    // codes [16][K] (96: a fourth block read past the last); per block: dw [16]
    uint8_t *mem = scratch((size_t)TILE * K + 96 + sizeof(float) * nb * TILE);
    if (!mem) return -2;
    int8_t *codes = (int8_t *)mem;
    float *dw = (float *)(mem + (size_t)TILE * K + 96);
    for (int n = 0; n < TILE; n++)
        for (int b = 0; b < nb; b++) {
            const uint8_t *w = n < rows ? row[n] + (size_t)size * b : NULL;
            if (w) prefetch_ahead(w, size);
            __m256i q = w ? signed_codes(w, iq4) : _mm256_setzero_si256();
            _mm256_storeu_si256((__m256i *)(codes + (size_t)n * K + 32 * b), q);
            dw[b * TILE + n] = w ? f16_to_f32(read_u16(w)) : 0;
        }
    int32_t sums[4][TILE][TILE] __attribute__((aligned(64)));
    float out[TILE][TILE] __attribute__((aligned(64)));
    for (int t = 0; t < x->tiles; t++) {
        __m512 acc[4][TILE];
        for (int u = 0; u < 4; u++)
            for (int n = 0; n < TILE; n++) acc[u][n] = _mm512_setzero_ps();
        for (int b0 = 0; b0 < nb; b0 += 4) {  // the codes have room for a fourth past the last block
            tile_sums4_s8(codes + 32 * b0, K, x->codes + ((size_t)t * nb + b0) * 512, 32, sums);
            for (int b = b0; b < b0 + 4 && b < nb; b++) {
                int u = b < last4 ? b % 4 : 0;
                __m512 dx = _mm512_loadu_ps(x->dx + ((size_t)t * nb + b) * TILE);
                for (int n = 0; n < TILE; n++) acc[u][n] = add_block(acc[u][n], _mm512_load_si512(sums[b - b0][n]), dw[b * TILE + n], dx);
            }
        }
        for (int n = 0; n < TILE; n++)
            _mm512_store_ps(out[n], _mm512_add_ps(_mm512_add_ps(acc[0][n], acc[1][n]), _mm512_add_ps(acc[2][n], acc[3][n])));
        amx_store(out, rows, t, M, y, y_row);
    }
    return 0;
}

// Per activation row, sum_k of the int16 pairs xs[k] (a tile's rows, 16 apart) dotted with the
// weight row's pair w[k * 16]
static inline __m512i pair_dots(const int32_t *xs, const int32_t *w, int pairs) {
    __m512i sum = _mm512_setzero_si512();
    for (int k = 0; k < pairs; k++) sum = _mm512_dpwssd_epi32(sum, _mm512_loadu_si512(xs + k * TILE), _mm512_set1_epi32(w[k * TILE]));
    return sum;
}

// Bytes times int16 constants per 16-bit lane (products under 256)
static inline __m256i mul_u8_lanes(__m256i q, __m256i k) {
    const __m256i low = _mm256_set1_epi16(0xff);
    __m256i even = _mm256_mullo_epi16(_mm256_and_si256(q, low), k), odd = _mm256_mullo_epi16(_mm256_srli_epi16(q, 8), k);
    return _mm256_or_si256(_mm256_and_si256(even, low), _mm256_slli_epi16(odd, 8));
}

static inline __m256i mul_u8(__m256i q, int c) { return mul_u8_lanes(q, _mm256_set1_epi16((short)c)); }

// int16 lanes 0-7 taking lane g of v, 8-15 lane g + 1 (a scale each for two groups of 16 bytes)
static inline __m256i two_groups(__m256i v, int g) {
    __m256i half = g < 8 ? _mm256_permute2x128_si256(v, v, 0x00) : _mm256_permute2x128_si256(v, v, 0x11);
    return q2_q3_k_scale_lanes(half, (g % 8) / 2);  // g even
}

// Q4_K, Q5_K: each sub-block's 6-bit scale split in two 3-bit digits, sc = 8 hi + lo, folded into
// two copies of the codes (q lo, q hi <= 31 * 7 fit a byte), so two tiles accumulate a whole
// block 64 values a multiply, and the block's integer sum is 8 hi + lo with no per-sub-block work;
// then the block's sum and its mins' term, one multiply-add each (q4_q5_k_rows).
static int amx_q4_q5_k_task(const uint8_t *const *row, int rows, int K, const amx_x *x, int M, float *y, size_t y_row, const int with_high) {
    int nb = K / 256, size = with_high ? 176 : 144, qs_at = with_high ? 48 : 16;
    // codes times the low digits [16][K] and the high [16][K]; per block: mins as int16 pairs [4][16], d [16], dmin [16]
    const int planes = 2;
    uint8_t *mem = scratch(planes * (size_t)TILE * K + (size_t)nb * TILE * 4 * (4 + 2));
    if (!mem) return -2;
    uint8_t *low = mem, *high = mem + (size_t)TILE * K;
    int32_t *mins = (int32_t *)(mem + planes * (size_t)TILE * K);
    float *d = (float *)(mins + (size_t)nb * 4 * TILE), *dmin = d + (size_t)nb * TILE;
    for (int n = 0; n < TILE; n++)
        for (int b = 0; b < nb; b++) {
            size_t at = (size_t)n * K + 256 * b;
            if (n >= rows) {
                for (int i = 0; i < planes; i++) memset(mem + i * (size_t)TILE * K + at, 0, 256);
                for (int k = 0; k < 4; k++) mins[(b * 4 + k) * TILE + n] = 0;
                d[b * TILE + n] = dmin[b * TILE + n] = 0;
                continue;
            }
            const uint8_t *w = row[n] + (size_t)size * b;
            uint32_t scw[2], mnw[2];
            q4_k_scales(w + 4, scw, mnw);
            const uint8_t *sc = (const uint8_t *)scw, *mn = (const uint8_t *)mnw;
            for (int j = 0; j < 4; j++) {
                __m256i lo, hi;
                q4_q5_k_codes(w, qs_at, j, with_high, &lo, &hi);
                _mm256_storeu_si256((__m256i *)(low + at + 64 * j), mul_u8(lo, sc[2 * j] & 7));
                _mm256_storeu_si256((__m256i *)(low + at + 64 * j + 32), mul_u8(hi, sc[2 * j + 1] & 7));
                _mm256_storeu_si256((__m256i *)(high + at + 64 * j), mul_u8(lo, sc[2 * j] >> 3));
                _mm256_storeu_si256((__m256i *)(high + at + 64 * j + 32), mul_u8(hi, sc[2 * j + 1] >> 3));
            }
            for (int k = 0; k < 4; k++) mins[(b * 4 + k) * TILE + n] = (int32_t)(mn[2 * k] | (uint32_t)mn[2 * k + 1] << 16);
            d[b * TILE + n] = f16_to_f32(read_u16(w)), dmin[b * TILE + n] = f16_to_f32(read_u16(w + 2));
        }
    float out[TILE][TILE] __attribute__((aligned(64)));
    for (int t = 0; t < x->tiles; t++) {
        __m512 acc[TILE], acc_min[TILE];
        for (int n = 0; n < TILE; n++) acc[n] = acc_min[n] = _mm512_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const int8_t *bx = x->codes + ((size_t)t * nb * 8 + b * 8) * 512;
            int32_t sums[2][TILE][TILE] __attribute__((aligned(64)));  // the codes times the low digits, times the high
            block_sums(low + 256 * b, high - low, 2, K, bx, 0, sums);
            const int32_t *mn = mins + b * 4 * TILE;
            const __m512 dx = _mm512_loadu_ps(x->dx + ((size_t)t * nb + b) * TILE);
            const int32_t *xs = x->sums + ((size_t)t * nb + b) * 4 * TILE;
            for (int n = 0; n < TILE; n++) {
                const __m512i block = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(sums[1][n]), 3), _mm512_load_si512(sums[0][n]));
                acc_min[n] = add_block(acc_min[n], pair_dots(xs, mn + n, 4), dmin[b * TILE + n], dx);
                acc[n] = add_block(acc[n], block, d[b * TILE + n], dx);
            }
        }
        for (int n = 0; n < TILE; n++) _mm512_store_ps(out[n], _mm512_sub_ps(acc[n], acc_min[n]));
        amx_store(out, rows, t, M, y, y_row);
    }
    return 0;
}

// Signed bytes times int16 constants per 16-bit lane (products within a byte)
static inline __m256i mul_s8(__m256i q, __m256i k) {
    __m256i even = _mm256_mullo_epi16(_mm256_srai_epi16(_mm256_slli_epi16(q, 8), 8), k), odd = _mm256_mullo_epi16(_mm256_srai_epi16(q, 8), k);
    return _mm256_or_si256(_mm256_and_si256(even, _mm256_set1_epi16(0xff)), _mm256_slli_epi16(odd, 8));
}

// Q6_K: each group's int8 scale as three balanced base-7 digits (sc = d0 + 7 d1 + 49 d2, digits
// -3..3), folded into three copies of the signed codes (q - 32) d (|.| <= 96 fit a byte), so
// three tiles accumulate a whole block 64 values a multiply; its integer sum d0 + 7 d1 + 49 d2
// is exactly q6_k_rows' sum less 32 times its shift, and takes one multiply-add.
static int amx_q6_k_task(const uint8_t *const *row, int rows, int K, const amx_x *x, int M, float *y, size_t y_row) {
    int nb = K / 256;
    // the codes times each digit [3][16][K]; per block: d [16]
    uint8_t *mem = scratch(3 * (size_t)TILE * K + (size_t)nb * TILE * 4);
    if (!mem) return -2;
    int8_t *digits = (int8_t *)mem;
    float *d = (float *)(mem + 3 * (size_t)TILE * K);
    const __m256i centre = _mm256_set1_epi8(32);
    for (int n = 0; n < TILE; n++)
        for (int b = 0; b < nb; b++) {
            size_t at = (size_t)n * K + 256 * b, plane = (size_t)TILE * K;
            const uint8_t *w = n < rows ? row[n] + (size_t)210 * b : NULL;
            if (w) prefetch_ahead(w, 210);
            d[b * TILE + n] = w ? f16_to_f32(read_u16(w + 208)) : 0;
            if (!w) {
                for (int i = 0; i < 3; i++) memset(digits + i * plane + at, 0, 256);
                continue;
            }
            // the 16 scales' digits as int16 lanes: with v = sc + 143 >= 0, q = v / 7 (as v * 9363 >> 16,
            // exact below 300), the digit is v - 7 q - 3 and the rest (sc - digit) / 7 = q - 20
            __m256i sc = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 192))), digit[3];
            for (int i = 0; i < 3; i++) {
                __m256i v = _mm256_add_epi16(sc, _mm256_set1_epi16(143)), q = _mm256_mulhi_epu16(v, _mm256_set1_epi16(9363));
                digit[i] = _mm256_sub_epi16(_mm256_sub_epi16(v, _mm256_mullo_epi16(q, _mm256_set1_epi16(7))), _mm256_set1_epi16(3));
                sc = _mm256_sub_epi16(q, _mm256_set1_epi16(20));
            }
            for (int half = 0; half < 2; half++) {
                const uint8_t *ql = w + 64 * half, *qh = w + 128 + 32 * half;
                __m256i q[4];
                q6_k_codes(ql, qh, q);
                for (int j = 0; j < 4; j++) {
                    int g = 8 * half + 2 * j;  // 32 codes: groups g and g + 1
                    __m256i centred = _mm256_sub_epi8(q[j], centre);
                    __m256i lanes = _mm256_set_m128i(_mm_set1_epi16((short)(g + 1)), _mm_set1_epi16((short)g));
                    for (int i = 0; i < 3; i++) {
                        __m256i k = _mm256_permutexvar_epi16(lanes, digit[i]);
                        _mm256_storeu_si256((__m256i *)(digits + i * plane + at + 128 * half + 32 * j), mul_s8(centred, k));
                    }
                }
            }
        }
    const size_t plane = (size_t)TILE * K;
    int32_t sums[3][TILE][TILE] __attribute__((aligned(64)));
    float out[TILE][TILE] __attribute__((aligned(64)));
    for (int t = 0; t < x->tiles; t++) {
        __m512 acc[TILE];
        for (int n = 0; n < TILE; n++) acc[n] = _mm512_setzero_ps();
        for (int b = 0; b < nb; b++) {
            block_sums((const uint8_t *)digits + 256 * b, plane, 3, K, x->codes + ((size_t)t * nb * 8 + b * 8) * 512, 1, sums);
            const __m512 dx = _mm512_loadu_ps(x->dx + ((size_t)t * nb + b) * TILE);
            for (int n = 0; n < TILE; n++) {
                __m512i block = _mm512_add_epi32(_mm512_load_si512(sums[0][n]),
                                                 _mm512_add_epi32(_mm512_mullo_epi32(_mm512_load_si512(sums[1][n]), _mm512_set1_epi32(7)),
                                                                  _mm512_mullo_epi32(_mm512_load_si512(sums[2][n]), _mm512_set1_epi32(49))));
                acc[n] = add_block(acc[n], block, d[b * TILE + n], dx);
            }
        }
        for (int n = 0; n < TILE; n++) _mm512_store_ps(out[n], acc[n]);
        amx_store(out, rows, t, M, y, y_row);
    }
    return 0;
}

// Q2_K and Q3_K: codes 32 j + l of each half n are 2 bits of qs[32 n + l] at shift 2 j (Q3_K's
// third from bit 4 n + j of hmask[l]), group k / 16 (q2_q3_k_rows). Q2_K's 4-bit scale folds into
// its codes (q sc <= 45), one tile a block, its mins on their own chain; Q3_K's scale minus 32 as
// sc = 8 hi + lo (lo 0..7, hi -4..3) into two copies of (q - 4), whose sum 8 hi + lo is the
// rows' sum less 4 times their offset.
static int amx_q2_q3_k_task(const uint8_t *const *row, int rows, int K, const amx_x *x, int M, float *y, size_t y_row, const int q3) {
    int nb = K / 256, size = q3 ? 110 : 84, qs_at = q3 ? 32 : 16, planes = q3 ? 2 : 1;
    // codes times scales (Q2_K) or digits (Q3_K) [planes][16][K]; per block: mins as int16 pairs [8][16], d [16], dmin [16]
    uint8_t *mem = scratch(planes * (size_t)TILE * K + (size_t)nb * TILE * 4 * (8 + 2));
    if (!mem) return -2;
    const size_t plane = (size_t)TILE * K;
    uint8_t *codes = mem;
    int32_t *mins = (int32_t *)(mem + planes * plane);
    float *d = (float *)(mins + (size_t)nb * 8 * TILE), *dmin = d + (size_t)nb * TILE;
    const __m256i four = _mm256_set1_epi8(4);
    for (int n = 0; n < TILE; n++)
        for (int b = 0; b < nb; b++) {
            size_t at = (size_t)n * K + 256 * b;
            const uint8_t *w = n < rows ? row[n] + (size_t)size * b : NULL;
            if (w) prefetch_ahead(w, size);
            if (!w) {
                for (int i = 0; i < planes; i++) memset(codes + i * plane + at, 0, 256);
                for (int k = 0; k < 8; k++) mins[(b * 8 + k) * TILE + n] = 0;
                d[b * TILE + n] = dmin[b * TILE + n] = 0;
                continue;
            }
            int16_t sc[16], off[16];
            q2_q3_k_scales(w, q3, sc, off);
            __m256i scales = _mm256_loadu_si256((const __m256i *)sc);
            __m256i lo = _mm256_and_si256(scales, _mm256_set1_epi16(7)), hi = _mm256_srai_epi16(scales, 3);
            __m256i high = _mm256_loadu_si256((const __m256i *)w);
            for (int h = 0; h < 2; h++) {
                __m256i bits = _mm256_loadu_si256((const __m256i *)(w + qs_at + 32 * h));
                for (int j = 0; j < 4; j++) {
                    __m256i q = q2_q3_k_codes(bits, high, h, j, q3);
                    int g = 8 * h + 2 * j;
                    uint8_t *dst = codes + at + 128 * h + 32 * j;
                    if (q3) {
                        q = _mm256_sub_epi8(q, four);
                        _mm256_storeu_si256((__m256i *)dst, mul_s8(q, two_groups(lo, g)));
                        _mm256_storeu_si256((__m256i *)(dst + plane), mul_s8(q, two_groups(hi, g)));
                    } else {
                        _mm256_storeu_si256((__m256i *)dst, mul_u8_lanes(q, two_groups(scales, g)));
                    }
                }
            }
            for (int k = 0; k < 8; k++) mins[(b * 8 + k) * TILE + n] = q3 ? 0 : (int32_t)((uint16_t)off[2 * k] | (uint32_t)(uint16_t)off[2 * k + 1] << 16);
            d[b * TILE + n] = f16_to_f32(read_u16(w + (q3 ? 108 : 80)));
            dmin[b * TILE + n] = q3 ? 0 : f16_to_f32(read_u16(w + 82));
        }
    int32_t sums[2][TILE][TILE] __attribute__((aligned(64)));
    float out[TILE][TILE] __attribute__((aligned(64)));
    for (int t = 0; t < x->tiles; t++) {
        __m512 acc[TILE], acc_off[TILE];
        for (int n = 0; n < TILE; n++) acc[n] = acc_off[n] = _mm512_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const int8_t *bx = x->codes + ((size_t)t * nb * 8 + b * 8) * 512;
            if (q3) block_sums(codes + 256 * b, plane, 2, K, bx, 1, sums);
            else block_sums(codes + 256 * b, plane, 1, K, bx, 0, sums);
            const int32_t *mn = mins + b * 8 * TILE;
            const __m512 dx = _mm512_loadu_ps(x->dx + ((size_t)t * nb + b) * TILE);
            const int32_t *xs = x->sums + ((size_t)t * nb + b) * 8 * TILE;
            for (int n = 0; n < TILE; n++) {
                __m512i block = _mm512_load_si512(sums[0][n]);
                if (q3) {
                    block = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(sums[1][n]), 3), block);
                } else {
                    acc_off[n] = add_block(acc_off[n], pair_dots(xs, mn + n, 8), dmin[b * TILE + n], dx);
                }
                acc[n] = add_block(acc[n], block, d[b * TILE + n], dx);
            }
        }
        for (int n = 0; n < TILE; n++) _mm512_store_ps(out[n], _mm512_sub_ps(acc[n], acc_off[n]));
        amx_store(out, rows, t, M, y, y_row);
    }
    return 0;
}

// IQ4_XS: levels (-127..113) leave no room for the scale, so one tile multiply a sub-block of 32,
// its sums times the rows' scales (minus 32) into the block's integer sum; one multiply-add a
// block (iq4_xs_rows).
static int amx_iq4_xs_task(const uint8_t *const *row, int rows, int K, const amx_x *x, int M, float *y, size_t y_row) {
    int nb = K / 256;
    // levels [16][K]; per block: scales [8][16], d [16]
    uint8_t *mem = scratch((size_t)TILE * K + (size_t)nb * TILE * 4 * (8 + 1));
    if (!mem) return -2;
    int8_t *codes = (int8_t *)mem;
    int32_t *scales = (int32_t *)(mem + (size_t)TILE * K);
    float *d = (float *)(scales + (size_t)nb * 8 * TILE);
    for (int n = 0; n < TILE; n++)
        for (int b = 0; b < nb; b++) {
            const uint8_t *w = n < rows ? row[n] + (size_t)136 * b : NULL;
            if (w) prefetch_ahead(w, 136);
            for (int j = 0; j < 8; j++) {
                __m256i q = w ? _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_LEVELS)), nibbles_32(w + 8 + 16 * j))
                              : _mm256_setzero_si256();
                _mm256_storeu_si256((__m256i *)(codes + (size_t)n * K + 256 * b + 32 * j), q);
                scales[(b * 8 + j) * TILE + n] = w ? iq4_xs_scale(w, j) : 0;
            }
            d[b * TILE + n] = w ? f16_to_f32(read_u16(w)) : 0;
        }
    int32_t sums[4][TILE][TILE] __attribute__((aligned(64)));
    float out[TILE][TILE] __attribute__((aligned(64)));
    for (int t = 0; t < x->tiles; t++) {
        __m512 acc[TILE];
        for (int n = 0; n < TILE; n++) acc[n] = _mm512_setzero_ps();
        for (int b = 0; b < nb; b++) {
            __m512i block[TILE];
            for (int n = 0; n < TILE; n++) block[n] = _mm512_setzero_si512();
            for (int j0 = 0; j0 < 8; j0 += 4) {
                tile_sums4_s8(codes + 256 * b + 32 * j0, K, x->codes + ((size_t)t * nb * 8 + b * 8 + j0) * 512, 32, sums);
                for (int j = 0; j < 4; j++) {
                    const int32_t *sc = scales + (b * 8 + j0 + j) * TILE;
                    for (int n = 0; n < TILE; n++)
                        block[n] = _mm512_add_epi32(block[n], _mm512_mullo_epi32(_mm512_load_si512(sums[j][n]), _mm512_set1_epi32(sc[n])));
                }
            }
            const __m512 dx = _mm512_loadu_ps(x->dx + ((size_t)t * nb + b) * TILE);
            for (int n = 0; n < TILE; n++) acc[n] = add_block(acc[n], block[n], d[b * TILE + n], dx);
        }
        for (int n = 0; n < TILE; n++) _mm512_store_ps(out[n], acc[n]);
        amx_store(out, rows, t, M, y, y_row);
    }
    return 0;
}

// Q4_0, Q4_1, Q5_0, Q5_1: one tile multiply a block (unsigned codes), chain b % 4 of each output
// taking d dx times the block's sum, the offsets' chain c sx beside (q4_q5_rows).
static int amx_q4_q5_task(const uint8_t *const *row, int rows, int K, const amx_x *x, int M, float *y, size_t y_row,
                          const int with_min, const int with_high) {
    int nb = K / 32, size = (with_min ? 20 : 18) + (with_high ? 4 : 0), zero = with_high ? 16 : 8, last4 = nb & ~3;
    // codes [16][K] (96: a fourth block read past the last); per block: d, c [16]
    uint8_t *mem = scratch((size_t)TILE * K + 96 + 2 * sizeof(float) * nb * TILE);
    if (!mem) return -2;
    uint8_t *codes = mem;
    float *d = (float *)(mem + (size_t)TILE * K + 96), *c = d + (size_t)nb * TILE;
    for (int n = 0; n < TILE; n++)
        for (int b = 0; b < nb; b++) {
            const uint8_t *w = n < rows ? row[n] + (size_t)size * b : NULL;
            if (w) prefetch_ahead(w, size);
            __m128 weight_scales = _mm_setzero_ps();
            __m256i q = w ? q4_q5_codes(w, with_min, with_high, &weight_scales) : _mm256_setzero_si256();
            _mm256_storeu_si256((__m256i *)(codes + (size_t)n * K + 32 * b), q);
            d[b * TILE + n] = _mm_cvtss_f32(weight_scales), c[b * TILE + n] = _mm_cvtss_f32(_mm_shuffle_ps(weight_scales, weight_scales, 1));
        }
    int32_t sums[4][TILE][TILE] __attribute__((aligned(64)));
    float out[TILE][TILE] __attribute__((aligned(64)));
    const __m512 factor = _mm512_set1_ps(with_min ? 1.0f : (float)-zero);
    for (int t = 0; t < x->tiles; t++) {
        __m512 acc[4][TILE], offsets[TILE];
        for (int n = 0; n < TILE; n++) {
            offsets[n] = _mm512_setzero_ps();
            for (int u = 0; u < 4; u++) acc[u][n] = _mm512_setzero_ps();
        }
        for (int b0 = 0; b0 < nb; b0 += 4) {  // the codes have room for a fourth past the last block
            tile_sums4_u8(codes + 32 * b0, K, x->codes + ((size_t)t * nb + b0) * 512, 32, sums);
            for (int b = b0; b < b0 + 4 && b < nb; b++) {
                int u = b < last4 ? b % 4 : 0;
                const __m512 dx = _mm512_loadu_ps(x->dx + ((size_t)t * nb + b) * TILE);
                const __m512 sx = _mm512_loadu_ps(x->sx + ((size_t)t * nb + b) * TILE);
                for (int n = 0; n < TILE; n++) {
                    offsets[n] = _mm512_add_ps(offsets[n], _mm512_mul_ps(_mm512_set1_ps(c[b * TILE + n]), sx));
                    acc[u][n] = add_block(acc[u][n], _mm512_load_si512(sums[b - b0][n]), d[b * TILE + n], dx);
                }
            }
        }
        for (int n = 0; n < TILE; n++) {
            __m512 total = _mm512_add_ps(_mm512_add_ps(acc[0][n], acc[1][n]), _mm512_add_ps(acc[2][n], acc[3][n]));
            _mm512_store_ps(out[n], _mm512_add_ps(total, _mm512_mul_ps(offsets[n], factor)));
        }
        amx_store(out, rows, t, M, y, y_row);
    }
    return 0;
}

typedef int (*amx_fn)(const uint8_t *const *row, int rows, int K, const amx_x *x, int M, float *y, size_t y_row);
static int amx_q8_0(const uint8_t *const *r, int n, int K, const amx_x *x, int M, float *y, size_t y_row) { return amx_signed_task(r, n, K, x, M, y, y_row, 0); }
static int amx_iq4_nl(const uint8_t *const *r, int n, int K, const amx_x *x, int M, float *y, size_t y_row) { return amx_signed_task(r, n, K, x, M, y, y_row, 1); }
static int amx_q4_0(const uint8_t *const *r, int n, int K, const amx_x *x, int M, float *y, size_t y_row) { return amx_q4_q5_task(r, n, K, x, M, y, y_row, 0, 0); }
static int amx_q4_1(const uint8_t *const *r, int n, int K, const amx_x *x, int M, float *y, size_t y_row) { return amx_q4_q5_task(r, n, K, x, M, y, y_row, 1, 0); }
static int amx_q5_0(const uint8_t *const *r, int n, int K, const amx_x *x, int M, float *y, size_t y_row) { return amx_q4_q5_task(r, n, K, x, M, y, y_row, 0, 1); }
static int amx_q5_1(const uint8_t *const *r, int n, int K, const amx_x *x, int M, float *y, size_t y_row) { return amx_q4_q5_task(r, n, K, x, M, y, y_row, 1, 1); }
static int amx_q4_k(const uint8_t *const *r, int n, int K, const amx_x *x, int M, float *y, size_t y_row) { return amx_q4_q5_k_task(r, n, K, x, M, y, y_row, 0); }
static int amx_q5_k(const uint8_t *const *r, int n, int K, const amx_x *x, int M, float *y, size_t y_row) { return amx_q4_q5_k_task(r, n, K, x, M, y, y_row, 1); }
static int amx_q2_k(const uint8_t *const *r, int n, int K, const amx_x *x, int M, float *y, size_t y_row) { return amx_q2_q3_k_task(r, n, K, x, M, y, y_row, 0); }
static int amx_q3_k(const uint8_t *const *r, int n, int K, const amx_x *x, int M, float *y, size_t y_row) { return amx_q2_q3_k_task(r, n, K, x, M, y, y_row, 1); }
#endif

#ifdef USE_AVX2
#define USE_FEW_ROWS 1
// --- a few activation rows (without AMX, a prompt's), the weight rows side by side ---
//
// A forward of a few rows (a speculative draft's, a short chat turn's) pays, on the row kernels,
// each block's steps (its integer sum reduced, a multiply-add) once for each row, and on the tile
// tasks for a tile's lanes of activation rows whatever their number. Here a register's lanes of
// weight rows (16 on AVX-512, 8 on AVX2) have their blocks unpacked side by side (lane n of
// register k: codes 4k..4k+3 of weight row n), so an activation row's 4 codes, broadcast, meet
// all of them in one dot: a block's integer sums come out in one register, and its steps cost one
// vector an activation row. The same integer sums and, lane by lane, the same steps as the row
// kernels' (each block's sum, one multiply-add into chain b % 4, the offsets' chain beside), so
// the same bits. Every matmul of a forward, 2 threads, ms (row kernels, or AMX tiles from 8 rows
// -> these): SmolLM2-135M Q4_1, 3 rows 8.7 -> 7.5, 4 rows 11.0 -> 8.5, 8 rows 15.3 -> 11.0, 16
// rows 17.9 -> 15.7; 3B-shaped Q4_K_M (its Q6_K tensors as they were), 4 rows 149 -> 141, 8 rows
// 256 -> 189, 16 rows 307 -> 267. AVX2 alone has no 4-code dot: byte-pair multiplies add up as
// int16 before a pair multiply widens them, by a group's scale where it has one
// (group_dot_times); what it saves over the row kernels is the steps and the sums' reductions.
// AVX2 builds (on AVX-VNNI's dots where the CPU has them, row kernels -> these): SmolLM2 Q4_1 at
// 8 rows 21.3 -> 17.6 (19.0 -> 15.9), 3B Q4_K_M at 8 rows 318 -> 267 (290 -> 246), 12 rows 468
// -> 350 (412 -> 304). Without AMX a prompt's rows take them too, FEW_X_ROWS at a time over each
// 16 (or 8) weight rows unpacked once: they beat tile tasks on VNNI's and AVX2's dots at every
// length (few_kind).

// FEW(op), FEW_SI(op): the intrinsic of the lanes' width
#ifdef USE_AVX512
#define FEW_LANES 16
#define FEW(op) _mm512_##op
#define FEW_SI(op) _mm512_##op##_si512
typedef __m512i few_i;
typedef __m512 few_f;
#else
#define FEW_LANES 8
#define FEW(op) _mm256_##op
#define FEW_SI(op) _mm256_##op##_si256
typedef __m256i few_i;
typedef __m256 few_f;
#endif
// A 4-code dot (VNNI): the signed codes (Q8_0, IQ4_NL, IQ4_XS) dot activations offset into
// unsigned bytes, up to 255 x 127 a product, which a byte-pair multiply would saturate on;
// without it they take their magnitudes against the activations given their signs
// (signed_dot_times)
#if defined(USE_AVX512) || defined(__AVXVNNI__)
#define FEW_SIGNED 1
#endif
#define FEW_VECTOR_BYTES (4 * FEW_LANES)
// Activation rows a pass over the unpacked blocks, their chains in registers (with AVX2's 16 some
// spill, and still 2 rows a pass are slower: SmolLM2's matmuls at 8 rows 16.4 -> 15.8 ms)
#define FEW_X_ROWS 4

static inline few_i load_few(const void *p) { return FEW_SI(load)((const few_i *)p); }
static inline void store_few(void *p, few_i v) { FEW_SI(store)((few_i *)p, v); }

#ifdef USE_AVX512
// Swapping a register-index bit for a lane bit p (4, 2 or 1) of register pairs z[i], z[i | bit]:
// two-source permutes, which take rows held a lane group each to a dword (of each row) a register.
static const int32_t LANE_SWAPS[3][2][16] = {
    {{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}, {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31}},
    {{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}, {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}},
    {{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}, {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}},
};

ROWS_INLINE void swap_lane_bit(__m512i *z, const int count, const int bit, const int swap) {
    const __m512i lo = _mm512_loadu_si512(LANE_SWAPS[swap][0]), hi = _mm512_loadu_si512(LANE_SWAPS[swap][1]);
    for (int i = 0; i < count; i++)
        if (!(i & bit)) {
            __m512i a = z[i], b = z[i | bit];
            z[i] = _mm512_permutex2var_epi32(a, lo, b), z[i | bit] = _mm512_permutex2var_epi32(a, hi, b);
        }
}

// A dword of each of the 16 weight rows' blocks p[n] (at byte `at`), lane n
static inline __m512i row_dwords(const uint8_t *const *p, int at) {
    return _mm512_setr_epi32((int)read_u32(p[0] + at), (int)read_u32(p[1] + at), (int)read_u32(p[2] + at), (int)read_u32(p[3] + at),
                             (int)read_u32(p[4] + at), (int)read_u32(p[5] + at), (int)read_u32(p[6] + at), (int)read_u32(p[7] + at),
                             (int)read_u32(p[8] + at), (int)read_u32(p[9] + at), (int)read_u32(p[10] + at), (int)read_u32(p[11] + at),
                             (int)read_u32(p[12] + at), (int)read_u32(p[13] + at), (int)read_u32(p[14] + at), (int)read_u32(p[15] + at));
}

// 16 rows' 32 bytes at offset `at` of their blocks p[n]: z[k] lane n holds dword k of row n's
ROWS_INLINE void row_bytes32(const uint8_t *const *p, int at, __m512i z[8]) {
    for (int i = 0; i < 8; i++)  // register i: rows i and 8 + i; swapped, row n at lane n
        z[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p[i] + at))),
                                  _mm256_loadu_si256((const __m256i *)(p[8 + i] + at)), 1);
    swap_lane_bit(z, 8, 4, 0), swap_lane_bit(z, 8, 2, 1), swap_lane_bit(z, 8, 1, 2);
}

// 16 rows' 16 bytes at offset `at`: z[k] lane n holds dword k of row n's
ROWS_INLINE void row_bytes16(const uint8_t *const *p, int at, __m512i z[4]) {
    for (int g = 0; g < 4; g++) {  // register g: rows g, 4 + g, 8 + g, 12 + g; swapped, row n at lane n
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p[g] + at)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p[4 + g] + at)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p[8 + g] + at)), 2);
        z[g] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p[12 + g] + at)), 3);
    }
    swap_lane_bit(z, 4, 2, 1), swap_lane_bit(z, 4, 1, 2);
}

// The float16 in the low half of each lane as floats; 16 float16s as floats; IQ4's levels in
// each 128-bit lane; the unsigned-by-signed byte dot and the int16 pair dot (each adding 4 and 2
// products into an int32 lane); the first `valid` lanes stored
static inline __m512 low_halves_ps(__m512i v) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)); }
static inline __m512 halves_ps16(const uint16_t *h) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h)); }
static inline __m512i few_levels(void) { return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)IQ4_LEVELS)); }
static inline __m512i dot_bytes(__m512i sum, __m512i u, __m512i s) { return _mm512_dpbusd_epi32(sum, u, s); }
// dot_bytes with the 4 signed codes at p broadcast by the dot itself ({1to16}), which GCC does
// not fold from a set1 (it broadcasts into a register first: an instruction more a dot). The
// few-rows dots of the unsigned codes, interleaved A/B, every matmul of a 3B forward, 2
// threads: Q5_K_M without AMX at 16 rows 1.09x, 128 rows 1.04-1.12x (three runs), 512 rows
// 1.10x; with AMX, Q4_K_M and Q5_K_M at 8 to 24 rows 1.05-1.09x (4 rows 0.97x), SmolLM2 Q4_1 at
// 16 and 48 rows 1.06x and 1.04x.
typedef int32_t __attribute__((may_alias)) int32_any;
static inline __m512i dot_bytes_at(__m512i sum, __m512i u, const int8_t *p) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(sum) : "v"(u), "m"(*(const int32_any *)p));
    return sum;
}
static inline __m512i dot_pairs(__m512i sum, __m512i a, __m512i b) { return _mm512_dpwssd_epi32(sum, a, b); }
static inline void store_lanes(float *y, __m512 v, int valid) { _mm512_mask_storeu_ps(y, (__mmask16)((1u << valid) - 1), v); }
#else
// The same for 8 weight rows, transposed by unpacks within 128-bit lanes and lane permutes
static inline __m256i row_dwords(const uint8_t *const *p, int at) {
    return _mm256_setr_epi32((int)read_u32(p[0] + at), (int)read_u32(p[1] + at), (int)read_u32(p[2] + at), (int)read_u32(p[3] + at),
                             (int)read_u32(p[4] + at), (int)read_u32(p[5] + at), (int)read_u32(p[6] + at), (int)read_u32(p[7] + at));
}

// Within each 128-bit lane, the 4 x 4 dwords of z[0..3] transposed
ROWS_INLINE void transpose_dwords4(__m256i z[4]) {
    const __m256i t0 = _mm256_unpacklo_epi32(z[0], z[1]), t1 = _mm256_unpackhi_epi32(z[0], z[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(z[2], z[3]), t3 = _mm256_unpackhi_epi32(z[2], z[3]);
    z[0] = _mm256_unpacklo_epi64(t0, t2), z[1] = _mm256_unpackhi_epi64(t0, t2);
    z[2] = _mm256_unpacklo_epi64(t1, t3), z[3] = _mm256_unpackhi_epi64(t1, t3);
}

ROWS_INLINE void row_bytes32(const uint8_t *const *p, int at, __m256i z[8]) {
    for (int i = 0; i < 8; i++) z[i] = _mm256_loadu_si256((const __m256i *)(p[i] + at));
    transpose_dwords4(z), transpose_dwords4(z + 4);  // rows 0-3 (z[0..3]) and 4-7: dwords k and 4 + k in register k
    for (int k = 0; k < 4; k++) {
        const __m256i a = z[k], b = z[4 + k];
        z[k] = _mm256_permute2x128_si256(a, b, 0x20), z[4 + k] = _mm256_permute2x128_si256(a, b, 0x31);
    }
}

ROWS_INLINE void row_bytes16(const uint8_t *const *p, int at, __m256i z[4]) {
    for (int g = 0; g < 4; g++)  // register g: rows g and 4 + g
        z[g] = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(p[4 + g] + at)), _mm_loadu_si128((const __m128i *)(p[g] + at)));
    transpose_dwords4(z);
}

static inline __m256 low_halves_ps(__m256i v) {
    const __m256i halves = _mm256_and_si256(v, _mm256_set1_epi32(0xffff));
    return _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(halves, halves), 0x08)));
}
static inline __m256 halves_ps16(const uint16_t *h) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h)); }
static inline __m256i few_levels(void) { return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_LEVELS)); }
#ifdef FEW_SIGNED
static inline __m256i dot_bytes(__m256i sum, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(sum, u, s); }
static inline __m256i dot_bytes_at(__m256i sum, __m256i u, const int8_t *p) {
    return dot_bytes(sum, u, _mm256_set1_epi32((int)read_u32(p)));
}
#endif
static inline __m256i dot_pairs(__m256i sum, __m256i a, __m256i b) { return _mm256_add_epi32(sum, _mm256_madd_epi16(a, b)); }
static inline void store_lanes(float *y, __m256 v, int valid) {
    _mm256_maskstore_ps(y, _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), v);
}
#endif

// The types taken here: 32-value blocks with a float scale, then the K-quants, the signed codes last
enum { FEW_Q4_0, FEW_Q4_1, FEW_Q5_0, FEW_Q5_1, FEW_Q4_K, FEW_Q5_K, FEW_Q6_K, FEW_Q2_K, FEW_Q3_K, FEW_Q8_0, FEW_IQ4_NL, FEW_IQ4_XS };
// Q6_K, Q2_K and Q3_K: 16 groups of 16 codes a block, each group with its scale
static inline int few_groups16(int kind) { return kind == FEW_Q6_K || kind == FEW_Q2_K || kind == FEW_Q3_K; }
static inline int few_k_quant(int kind) { return kind >= FEW_Q4_K && kind <= FEW_Q3_K; }
// The largest unsigned code of a kind (Q3_K's with its high bit, its offset taken apart)
static inline int few_top(int kind) {
    return kind == FEW_Q6_K                                          ? 63
           : kind == FEW_Q5_0 || kind == FEW_Q5_1 || kind == FEW_Q5_K ? 31
           : kind == FEW_Q3_K                                        ? 7
           : kind == FEW_Q2_K                                        ? 3
                                                                      : 15;
}

// The kind of a matmul of M rows here, or -1: from the row counts where these beat the row
// kernels on. The 32-value blocks from 3 rows (2 are level); IQ4_XS from 4, Q4_K and Q5_K too (5 on
// AVX2, as Q8_0); Q2_K and Q3_K from 5; Q6_K, whose unpacking costs most, from 7. Measured on
// SmolLM2-135M Q4_1 and 3B-shaped Q8_0, Q5_0, IQ4_NL, IQ4_XS, Q4_K_M, Q3_K_M, Q2_K and Q6_K, ms,
// row kernels or tiles -> these: 3B Q6_K at 4 rows 187 -> 217, 8 rows 281 -> 260, 9 rows 328 ->
// 273; 3B IQ4_XS (AMX) at 3 rows 183 -> 187, 4 224 -> 208, 8 303 -> 249; 3B Q3_K_M (AMX) at 4
// rows 155 -> 168, 5 201 -> 185; on AVX2 3B Q4_K_M at 4 rows 163 -> 174, 5 level, 6 274 -> 238,
// and on AVX-VNNI's dots 3B Q8_0 at 4 rows 221 -> 233, 5 level, 6 295 -> 276. On AVX2 alone the
// signed codes' extra sign step a product moves them later: Q8_0 from 13 (3B Q8_0 at 6 rows 324
// -> 376, 12 level, 14 633 -> 620, 16 680 -> 638), IQ4_NL from 6 (4 rows 212 -> 249, 6 332 ->
// 310), IQ4_XS from 8 (4 rows 176 -> 208, 6 level, 8 328 -> 315).
// Without AMX they take every row count from there, a prompt's too: they beat tile tasks on
// VNNI's or AVX2's dots at every length measured (16 to 512 rows; every matmul of the 3B files
// at 128 rows 1.07-1.31x, SmolLM2's 1.24-1.37x; on AVX2 alone the signed codes' 1.05-1.10x,
// IQ4_XS's 1.17-1.25x), since each activation row's codes, broadcast, meet 16 (or 8) weight rows'
// in one dot with no reduction or transpose after. AMX's tiles overtake them from 25 rows (3B
// Q4_K_M at 24 rows 349 -> 323 ms, at 32 362 -> 391; Q8_0, IQ4_NL, IQ4_XS alike, Q3_K_M level at
// 24), the 32-value blocks' from 65 (SmolLM2 Q4_1 at 48 rows 34.6 -> 31.6, 64 level, 512 271 ->
// 282), Q6_K's and Q2_K's from 10 (3B Q2_K at 9 rows 232 -> 212, 10 level, 12 223 -> 234).
static int few_kind(int type, int M) {
    int kind = -1;
    switch (type) {
    case GGML_Q4_0: kind = FEW_Q4_0; break;
    case GGML_Q4_1: kind = FEW_Q4_1; break;
    case GGML_Q5_0: kind = FEW_Q5_0; break;
    case GGML_Q5_1: kind = FEW_Q5_1; break;
    case GGML_Q4_K: kind = FEW_Q4_K; break;
    case GGML_Q5_K: kind = FEW_Q5_K; break;
    case GGML_Q6_K: kind = FEW_Q6_K; break;
    case GGML_Q2_K: kind = FEW_Q2_K; break;
    case GGML_Q3_K: kind = FEW_Q3_K; break;
#ifndef USE_Q8_0_PAIRS  // there Q8_0's row kernels take other steps (signed_pair_rows)
    case GGML_Q8_0: kind = FEW_Q8_0; break;
#endif
    case GGML_IQ4_NL: kind = FEW_IQ4_NL; break;
    case GGML_IQ4_XS: kind = FEW_IQ4_XS; break;
    }
#if defined(USE_AVX512)
    const int k_least = 4, q8_0_least = 3, iq4_nl_least = 3, iq4_xs_least = 4;
#elif defined(FEW_SIGNED)
    const int k_least = 5, q8_0_least = 5, iq4_nl_least = 3, iq4_xs_least = 4;
#else
    const int k_least = 5, q8_0_least = 13, iq4_nl_least = 6, iq4_xs_least = 8;
#endif
    const int least = kind == FEW_Q6_K                     ? 7
                      : kind == FEW_Q2_K || kind == FEW_Q3_K ? 5
                      : kind == FEW_Q4_K || kind == FEW_Q5_K ? k_least
                      : kind == FEW_Q8_0                     ? q8_0_least
                      : kind == FEW_IQ4_NL                   ? iq4_nl_least
                      : kind == FEW_IQ4_XS                   ? iq4_xs_least
                                                             : 3;
#ifdef USE_AMX
    // (where Linux grants the tiles and SMOLLM3_AMX leaves them on)
    const int most = !amx_usable() ? M : kind == FEW_Q6_K || kind == FEW_Q2_K ? 9 : kind <= FEW_Q5_1 ? 64 : 24;
#else
    const int most = M;
#endif
    return M >= least && M <= most ? kind : -1;
}

// Block b of FEW_LANES weight rows (p[n]: row n's block) side by side at out, 8 registers' worth:
// register k lane n holds codes 4k..4k+3 of row n. The rows' scales into d and c (c: Q4_1's and
// Q5_1's minimum, else d, for the zero's term); for the signed codes, -128 times each row's code
// sum into bias (their activations go in offset by 128, unsigned). The codes go straight into that
// layout: the rows' 16 bytes of nibbles (Q8_0: 32 codes) transposed; a row's fifth bits spread onto
// its bytes by a multiply.
ROWS_INLINE void few_unpack(const uint8_t *const *p, uint8_t *out, float *d, float *c, int32_t *bias, const int kind) {
    const int with_min = kind == FEW_Q4_1 || kind == FEW_Q5_1, with_high = kind == FEW_Q5_0 || kind == FEW_Q5_1;
    const few_i scales = row_dwords(p, 0);
    const few_f dw = low_halves_ps(scales);
    FEW(store_ps)(d, dw);
    FEW(store_ps)(c, with_min ? low_halves_ps(FEW(srli_epi32)(scales, 16)) : dw);
    few_i q[8];
    if (kind == FEW_Q8_0) {
        row_bytes32(p, 2, q);
    } else {
        const int qs_at = with_min ? 4 : 2, codes_at = qs_at + (with_high ? 4 : 0);
        few_i z[4];
        row_bytes16(p, codes_at, z);
        const few_i high = with_high ? row_dwords(p, qs_at) : FEW_SI(setzero)();
        for (int k = 0; k < 8; k++) {
            q[k] = FEW_SI(and)(k < 4 ? z[k] : FEW(srli_epi16)(z[k - 4], 4), FEW(set1_epi8)(15));
            if (kind == FEW_IQ4_NL) q[k] = FEW(shuffle_epi8)(few_levels(), q[k]);
            if (with_high) {  // bits 4k..4k+3 of a row's qh to bit 4 of its 4 bytes here
                few_i bits = FEW_SI(and)(FEW(srli_epi32)(high, 4 * k), FEW(set1_epi32)(15));
                bits = FEW_SI(and)(FEW(mullo_epi32)(bits, FEW(set1_epi32)(0x00204081)), FEW(set1_epi32)(0x01010101));
                q[k] = FEW_SI(or)(q[k], FEW(slli_epi32)(bits, 4));
            }
        }
    }
    for (int k = 0; k < 8; k++) store_few(out + FEW_VECTOR_BYTES * k, q[k]);
#ifdef FEW_SIGNED
    if (kind >= FEW_Q8_0) {
        few_i sum = FEW_SI(setzero)();
        for (int k = 0; k < 8; k++) sum = dot_bytes(sum, FEW(set1_epi8)(1), q[k]);
        store_few(bias, FEW(sub_epi32)(FEW_SI(setzero)(), FEW(slli_epi32)(sum, 7)));
    }
#else
    (void)bias;
#endif
}

// The weight rows' codes (4 a lane of each register w[k], none above top < 64) dotted with an
// activation row's codes xs, 4 broadcast a register: lane n the group's integer sum for weight
// row n (group_dot), or that sum times sc's lane n (scaled_group_dot)
#ifdef FEW_SIGNED
ROWS_INLINE few_i group_dot(const few_i *w, const int8_t *xs, const int dwords, const int top) {
    (void)top;
    few_i s0 = FEW_SI(setzero)(), s1 = FEW_SI(setzero)();  // two chains of dots
    for (int k = 0; k < dwords; k += 2) {
        s0 = dot_bytes_at(s0, w[k], xs + 4 * k);
        s1 = dot_bytes_at(s1, w[k + 1], xs + 4 * k + 4);
    }
    return FEW(add_epi32)(s0, s1);
}

ROWS_INLINE few_i scaled_group_dot(const few_i *w, const int8_t *xs, const int dwords, const int top, few_i sc) {
    return FEW(mullo_epi32)(group_dot(w, xs, dwords, top), sc);
}
#else
// Without a 4-code dot, a byte-pair multiply gives int16 sums of two products (each at most top
// x 128), added up in int16 while they cannot pass 2^15 - 1, up to 4 multiplies (Q6_K's codes 2;
// 8 for Q4's codes was slower: 3B Q4_K_M's matmuls at 512 rows 9.5 -> 10.3 s), then widened to
// int32 by a multiply-add of int16 pairs: by `times` (a value a lane, twice), so a group's scale
// costs no step of its own (a 32-bit multiply after is two micro-ops on the ports these take).
// Every sum is exact either way, so the same bits.
ROWS_INLINE few_i group_dot_times(const few_i *w, const int8_t *xs, const int dwords, const int top, few_i times) {
    const int fit = 32767 / (256 * top) < 4 ? 32767 / (256 * top) : 4, span = fit < dwords ? fit : dwords;
    few_i s = FEW_SI(setzero)();
    for (int k0 = 0; k0 < dwords; k0 += span) {
        few_i pairs = FEW(maddubs_epi16)(w[k0], FEW(set1_epi32)((int)read_u32(xs + 4 * k0)));
        for (int k = k0 + 1; k < k0 + span && k < dwords; k++)
            pairs = FEW(add_epi16)(pairs, FEW(maddubs_epi16)(w[k], FEW(set1_epi32)((int)read_u32(xs + 4 * k))));
        s = FEW(add_epi32)(s, FEW(madd_epi16)(pairs, times));
    }
    return s;
}

// int32 lanes (within int16's range) as pairs of int16 copies
static inline few_i int16_pairs(few_i v) { return FEW_SI(or)(FEW_SI(and)(v, FEW(set1_epi32)(0xffff)), FEW(slli_epi32)(v, 16)); }

ROWS_INLINE few_i group_dot(const few_i *w, const int8_t *xs, const int dwords, const int top) {
    return group_dot_times(w, xs, dwords, top, FEW(set1_epi16)(1));
}

ROWS_INLINE few_i scaled_group_dot(const few_i *w, const int8_t *xs, const int dwords, const int top, few_i sc) {
    return group_dot_times(w, xs, dwords, top, int16_pairs(sc));
}
#endif

#ifdef FEW_SIGNED
// The weight rows' signed codes (8 registers: 32 codes) dotted with an activation row's 32
// codes offset by 128 (xo, unsigned), added to `sum`: two chains of dots
ROWS_INLINE few_i offset_dot(const few_i *w, const uint8_t *xo, few_i sum) {
    few_i s1 = FEW_SI(setzero)();
    for (int k = 0; k < 8; k += 2) {
        sum = dot_bytes(sum, FEW(set1_epi32)((int)read_u32(xo + 4 * k)), w[k]);
        s1 = dot_bytes(s1, FEW(set1_epi32)((int)read_u32(xo + 4 * k + 4)), w[k + 1]);
    }
    return FEW(add_epi32)(sum, s1);
}
#else
// The weight rows' signed codes (8 registers: 32 codes) dotted with an activation row's signed
// codes, times `times` as group_dot_times: their magnitudes against the activations given their
// signs, as a byte-pair multiply takes one side unsigned; each pair of products (up to 2 x 127 x
// 127) widened on its own, as two would overflow int16
ROWS_INLINE few_i signed_dot_times(const few_i *w, const int8_t *xs, few_i times) {
    few_i s0 = FEW_SI(setzero)(), s1 = FEW_SI(setzero)();
    for (int k = 0; k < 8; k += 2) {
        const few_i x0 = FEW(set1_epi32)((int)read_u32(xs + 4 * k)), x1 = FEW(set1_epi32)((int)read_u32(xs + 4 * k + 4));
        s0 = FEW(add_epi32)(s0, FEW(madd_epi16)(FEW(maddubs_epi16)(FEW(abs_epi8)(w[k]), FEW(sign_epi8)(x0, w[k])), times));
        s1 = FEW(add_epi32)(s1, FEW(madd_epi16)(FEW(maddubs_epi16)(FEW(abs_epi8)(w[k + 1]), FEW(sign_epi8)(x1, w[k + 1])), times));
    }
    return FEW(add_epi32)(s0, s1);
}
#endif

// Activation rows m0..m0+R-1 against the unpacked blocks, into their outputs (the first `valid`)
ROWS_INLINE void few_steps(const uint8_t *codes, const float *d, const float *c, const int32_t *bias, int nb, const uint8_t *xq,
                           size_t x_row, const uint8_t *x_offset, int m0, float *y, size_t y_row, int valid, const int kind,
                           const int R) {
#ifndef FEW_SIGNED
    (void)bias, (void)x_offset;  // the signed codes' only
#endif
    const int is_signed = kind >= FEW_Q8_0, with_min = kind == FEW_Q4_1 || kind == FEW_Q5_1;
    const int zero = kind == FEW_Q5_0 || kind == FEW_Q5_1 ? 16 : 8, last4 = nb & ~3;
    few_f acc[4][FEW_X_ROWS], offsets[FEW_X_ROWS];
    for (int r = 0; r < R; r++) {
        offsets[r] = FEW(setzero_ps)();
        for (int u = 0; u < 4; u++) acc[u][r] = FEW(setzero_ps)();
    }
    for (int b = 0; b < nb; b++) {
        const int u = b < last4 ? b % 4 : 0;
        const few_f dw = FEW(load_ps)(d + FEW_LANES * b), cw = FEW(load_ps)(c + FEW_LANES * b);
        few_i w[8];
        for (int k = 0; k < 8; k++) w[k] = load_few(codes + (size_t)8 * FEW_VECTOR_BYTES * b + FEW_VECTOR_BYTES * k);
        for (int r = 0; r < R; r++) {
            const x_block32 *xb = X_BLOCK(x_block32, xq, x_row, m0 + r, b);
            // unsigned codes by the signed activations, or signed codes by the activations offset
            // into unsigned bytes (x_offset) and the bias taken off
            few_i dot;
#ifdef FEW_SIGNED
            if (is_signed)
                dot = offset_dot(w, x_offset + ((size_t)(m0 + r) * nb + b) * 32, load_few(bias + FEW_LANES * b));
            else
#else
            if (is_signed)
                dot = signed_dot_times(w, xb->q, FEW(set1_epi16)(1));
            else
#endif
                dot = group_dot(w, xb->q, 8, few_top(kind));
            few_f sum = FEW(cvtepi32_ps)(dot);
            acc[u][r] = FEW(fmadd_ps)(sum, FEW(mul_ps)(dw, FEW(set1_ps)(xb->d)), acc[u][r]);
            if (!is_signed) offsets[r] = FEW(add_ps)(offsets[r], FEW(mul_ps)(cw, FEW(set1_ps)(xb->s)));
        }
    }
    const few_f factor = FEW(set1_ps)(with_min ? 1.0f : (float)-zero);
    for (int r = 0; r < R; r++) {
        few_f total = FEW(add_ps)(FEW(add_ps)(acc[0][r], acc[1][r]), FEW(add_ps)(acc[2][r], acc[3][r]));
        if (!is_signed) total = FEW(add_ps)(total, FEW(mul_ps)(offsets[r], factor));
        store_lanes(y + (size_t)(m0 + r) * y_row, total, valid);
    }
}

// Q4_K and Q5_K: a block of 256 values is 8 sub-blocks of 32 codes, each with a 6-bit scale and
// minimum (q4_k_scales). Each sub-block's integer sums come out of 8 dots as above, times its
// scales (lane n: row n's) and added: the block's sum(sc_j sum_j), the minimums' sum(m_j xsum_j)
// beside, then the row kernels' two multiply-adds (q4_q5_k_rows), so the same bits.

// Block b of the rows at out: sub-block j's codes at out + 8 j vectors (as few_unpack's); scales
// [8][lanes] and minimums as int16 pairs [4][lanes] (pair i: m_2i, m_2i+1) in int32 lanes; d, dmin
ROWS_INLINE void few_unpack_k(const uint8_t *const *p, uint8_t *out, int32_t *scales, int32_t *mins, float *d, float *dmin,
                              const int with_high) {
    const few_i dd = row_dwords(p, 0);
    FEW(store_ps)(d, low_halves_ps(dd));
    FEW(store_ps)(dmin, low_halves_ps(FEW(srli_epi32)(dd, 16)));
    const few_i a = row_dwords(p, 4), b = row_dwords(p, 8), c = row_dwords(p, 12), six = FEW(set1_epi32)(0x3f3f3f3f);
    const few_i four = FEW(set1_epi32)(0x0f0f0f0f), tops = FEW(set1_epi32)(0x30303030), byte = FEW(set1_epi32)(0xff);
    const few_i sc[2] = {FEW_SI(and)(a, six), FEW_SI(or)(FEW_SI(and)(c, four), FEW_SI(and)(FEW(srli_epi32)(a, 2), tops))};
    const few_i mn[2] = {FEW_SI(and)(b, six), FEW_SI(or)(FEW_SI(and)(FEW(srli_epi32)(c, 4), four), FEW_SI(and)(FEW(srli_epi32)(b, 2), tops))};
    for (int j = 0; j < 8; j++) store_few(scales + FEW_LANES * j, FEW_SI(and)(FEW(srli_epi32)(sc[j / 4], 8 * (j % 4)), byte));
    for (int i = 0; i < 4; i++) {
        few_i v = FEW(srli_epi32)(mn[i / 2], 16 * (i % 2));
        store_few(mins + FEW_LANES * i, FEW_SI(or)(FEW_SI(and)(v, byte), FEW(slli_epi32)(FEW_SI(and)(FEW(srli_epi32)(v, 8), byte), 16)));
    }
    few_i high[8];
    if (with_high) row_bytes32(p, 16, high);
    const few_i low4 = FEW(set1_epi8)(15), one = FEW(set1_epi8)(1);
    for (int j = 0; j < 4; j++) {  // 32 bytes: low nibbles sub-block 2j, high ones 2j + 1
        few_i z[8];
        row_bytes32(p, (with_high ? 48 : 16) + 32 * j, z);
        for (int k = 0; k < 8; k++) {
            few_i lo = FEW_SI(and)(z[k], low4), hi = FEW_SI(and)(FEW(srli_epi16)(z[k], 4), low4);
            if (with_high) {  // bit 2j of qh[l] is bit 4 of code l of sub-block 2j, bit 2j + 1 of 2j + 1's
                lo = FEW_SI(or)(lo, FEW(slli_epi16)(FEW_SI(and)(FEW(srli_epi16)(high[k], 2 * j), one), 4));
                hi = FEW_SI(or)(hi, FEW(slli_epi16)(FEW_SI(and)(FEW(srli_epi16)(high[k], 2 * j + 1), one), 4));
            }
            store_few(out + FEW_VECTOR_BYTES * (8 * (2 * j) + k), lo);
            store_few(out + FEW_VECTOR_BYTES * (8 * (2 * j + 1) + k), hi);
        }
    }
}

// R activation rows' sums over a K-quant block's groups of `dwords` code registers (group g's at
// cb + dwords g vectors) times each group's scales (scales + lanes g): lane n of sum[r] is sum
// over g of sc_g(n) dot_g(n, r)
ROWS_INLINE void scaled_block_sums(const uint8_t *cb, const int32_t *scales, const int groups, const int dwords, const int top,
                                   const uint8_t *xq, size_t x_row, int m0, int b, few_i sum[], const int R) {
    for (int r = 0; r < R; r++) sum[r] = FEW_SI(setzero)();
    for (int g = 0; g < groups; g++) {
        few_i w[8];
        for (int k = 0; k < dwords; k++) w[k] = load_few(cb + FEW_VECTOR_BYTES * (dwords * g + k));
        const few_i sc = load_few(scales + FEW_LANES * g);
        for (int r = 0; r < R; r++) {
            const int8_t *xs = X_BLOCK(x_block256, xq, x_row, m0 + r, b)->q + 4 * dwords * g;
            sum[r] = FEW(add_epi32)(sum[r], scaled_group_dot(w, xs, dwords, top, sc));
        }
    }
}

// Q6_K: a block of 256 values is 16 groups of 16 6-bit codes (4 low bits in ql, 2 high in qh,
// as q6_k_codes lays them out) with int8 scales, w = d sc (q - 32). Each group's sums come out
// of 4 dots, times its scales and added; the shift 32 sum(sc_g xsum_g) by int16 pair dots; then
// the row kernels' one multiply-add (q6_k_rows), so the same bits.

// Block b of the rows at out: group g's codes at out + 4 g vectors; scales [16][lanes] and scale
// pairs [8][lanes] (pair i: sc_2i, sc_2i+1 as int16s) in int32 lanes; d
ROWS_INLINE void few_unpack_q6_k(const uint8_t *const *p, uint8_t *out, int32_t *scales, int32_t *pairs, float *d) {
    uint16_t half_d[FEW_LANES];  // the block's last 2 bytes (a dword read would pass the tensor's end)
    for (int n = 0; n < FEW_LANES; n++) half_d[n] = read_u16(p[n] + 208);
    FEW(store_ps)(d, halves_ps16(half_d));
    for (int i = 0; i < 4; i++) {  // scales 4i..4i+3
        const few_i v = row_dwords(p, 192 + 4 * i);
        for (int j = 0; j < 4; j++) store_few(scales + FEW_LANES * (4 * i + j), FEW(srai_epi32)(FEW(slli_epi32)(v, 24 - 8 * j), 24));
        const few_i even = FEW(srai_epi16)(FEW(slli_epi16)(v, 8), 8), odd = FEW(srai_epi16)(v, 8);  // bytes 0, 2 and 1, 3
        const few_i low16 = FEW(set1_epi32)(0xffff);
        store_few(pairs + FEW_LANES * (2 * i), FEW_SI(or)(FEW_SI(and)(even, low16), FEW(slli_epi32)(odd, 16)));
        store_few(pairs + FEW_LANES * (2 * i + 1), FEW_SI(or)(FEW(srli_epi32)(even, 16), FEW_SI(andnot)(low16, odd)));
    }
    const few_i low4 = FEW(set1_epi8)(15), low2 = FEW(set1_epi8)(3);
    for (int half = 0; half < 2; half++) {
        few_i l0[8], l1[8], h[8];
        row_bytes32(p, 64 * half, l0), row_bytes32(p, 64 * half + 32, l1), row_bytes32(p, 128 + 32 * half, h);
        for (int k = 0; k < 8; k++) {
            // runs of 32 codes: ql[l] low, ql[l + 32] low, ql[l] high, ql[l + 32] high, with qh[l]'s bits 0-1, 2-3, 4-5, 6-7
            const few_i run[4] = {
                FEW_SI(or)(FEW_SI(and)(l0[k], low4), FEW(slli_epi16)(FEW_SI(and)(h[k], low2), 4)),
                FEW_SI(or)(FEW_SI(and)(l1[k], low4), FEW(slli_epi16)(FEW_SI(and)(FEW(srli_epi16)(h[k], 2), low2), 4)),
                FEW_SI(or)(FEW_SI(and)(FEW(srli_epi16)(l0[k], 4), low4), FEW(slli_epi16)(FEW_SI(and)(FEW(srli_epi16)(h[k], 4), low2), 4)),
                FEW_SI(or)(FEW_SI(and)(FEW(srli_epi16)(l1[k], 4), low4), FEW(slli_epi16)(FEW_SI(and)(FEW(srli_epi16)(h[k], 6), low2), 4)),
            };
            for (int r = 0; r < 4; r++)  // dwords 0-3 of a run: group 8 half + 2r; 4-7: the next
                store_few(out + FEW_VECTOR_BYTES * (4 * (8 * half + 2 * r + k / 4) + k % 4), run[r]);
        }
    }
}

// Q2_K and Q3_K (q2_q3_k_rows): 16 groups of 16 2- or 3-bit codes, unsigned, each group's sums
// times its scale as Q6_K's; the offsets (Q3_K: 4 sc, in the integer sum; Q2_K: its minimums m,
// on a chain of their own) by int16 pair dots with the activations' group sums, so the same bits.

// Block b of the rows at out: group g's codes at out + 4 g vectors (as few_unpack_q6_k's); scales
// [16][lanes]; the offsets as int16 pairs [8][lanes]; d, and Q2_K's dmin
ROWS_INLINE void few_unpack_q2_q3_k(const uint8_t *const *p, uint8_t *out, int32_t *scales, int32_t *pairs, float *d, float *dmin,
                                    const int q3) {
    few_i sc[16], off[16];
    if (q3) {
        uint16_t half_d[FEW_LANES];  // the block's last 2 bytes (a dword read would pass the tensor's end)
        for (int n = 0; n < FEW_LANES; n++) half_d[n] = read_u16(p[n] + 108);
        FEW(store_ps)(d, halves_ps16(half_d));
        const few_i a0 = row_dwords(p, 96), a1 = row_dwords(p, 100), a2 = row_dwords(p, 104);
        const few_i low4 = FEW(set1_epi32)(0x0f0f0f0f), two = FEW(set1_epi32)(0x03030303);
        const few_i words[4] = {  // q3_k_scale_words, a row a lane
            FEW_SI(or)(FEW_SI(and)(a0, low4), FEW(slli_epi32)(FEW_SI(and)(a2, two), 4)),
            FEW_SI(or)(FEW_SI(and)(a1, low4), FEW(slli_epi32)(FEW_SI(and)(FEW(srli_epi32)(a2, 2), two), 4)),
            FEW_SI(or)(FEW_SI(and)(FEW(srli_epi32)(a0, 4), low4), FEW(slli_epi32)(FEW_SI(and)(FEW(srli_epi32)(a2, 4), two), 4)),
            FEW_SI(or)(FEW_SI(and)(FEW(srli_epi32)(a1, 4), low4), FEW(slli_epi32)(FEW_SI(and)(FEW(srli_epi32)(a2, 6), two), 4)),
        };
        for (int g = 0; g < 16; g++)
            sc[g] = off[g] = FEW(sub_epi32)(FEW_SI(and)(FEW(srli_epi32)(words[g / 4], 8 * (g % 4)), FEW(set1_epi32)(0xff)), FEW(set1_epi32)(32));
    } else {
        const few_i dd = row_dwords(p, 80);
        FEW(store_ps)(d, low_halves_ps(dd));
        FEW(store_ps)(dmin, low_halves_ps(FEW(srli_epi32)(dd, 16)));
        for (int i = 0; i < 4; i++) {  // scales[4i..4i+3]: scale in the low nibble, minimum in the high
            const few_i v = row_dwords(p, 4 * i);
            for (int j = 0; j < 4; j++) {
                sc[4 * i + j] = FEW_SI(and)(FEW(srli_epi32)(v, 8 * j), FEW(set1_epi32)(15));
                off[4 * i + j] = FEW_SI(and)(FEW(srli_epi32)(v, 8 * j + 4), FEW(set1_epi32)(15));
            }
        }
    }
    for (int g = 0; g < 16; g++) store_few(scales + FEW_LANES * g, sc[g]);
    for (int i = 0; i < 8; i++)
        store_few(pairs + FEW_LANES * i, FEW_SI(or)(FEW_SI(and)(off[2 * i], FEW(set1_epi32)(0xffff)), FEW(slli_epi32)(off[2 * i + 1], 16)));
    few_i high[8];
    if (q3) row_bytes32(p, 0, high);
    for (int n = 0; n < 2; n++) {  // code 32 j + l of half n: bits 2j, 2j + 1 of qs[32 n + l], Q3_K's bit 4 n + j of hmask[l]
        few_i bits[8];
        row_bytes32(p, (q3 ? 32 : 16) + 32 * n, bits);
        for (int j = 0; j < 4; j++)
            for (int k = 0; k < 8; k++) {  // codes 32 j + 4 k.. of the half: group 8 n + 2 j + k / 4
                few_i q = FEW_SI(and)(FEW(srli_epi16)(bits[k], 2 * j), FEW(set1_epi8)(3));
                if (q3) q = FEW_SI(or)(q, FEW(slli_epi16)(FEW_SI(and)(FEW(srli_epi16)(high[k], 4 * n + j), FEW(set1_epi8)(1)), 2));
                store_few(out + FEW_VECTOR_BYTES * (4 * (8 * n + 2 * j + k / 4) + k % 4), q);
            }
    }
}

// Activation rows m0..m0+R-1 against the unpacked K-quant blocks (Q4_K and Q5_K: 8 groups of 32;
// Q6_K, Q2_K and Q3_K: 16 of 16), into their outputs: a block's scaled sums, its offsets' sums by
// int16 pair dots with the activations' group sums; the offsets then less in the integer sum
// (Q6_K: 32 sc, Q3_K: 4 sc a group) before one multiply-add, or (Q4_K, Q5_K and Q2_K: their
// minimums) on a chain of their own taken off at the end
ROWS_INLINE void few_steps_scaled(const uint8_t *codes, const int32_t *scales, const int32_t *pairs, const float *d, const float *dmin,
                                  int nb, const uint8_t *xq, size_t x_row, int m0, float *y, size_t y_row, int valid, const int kind,
                                  const int R) {
    const int groups = few_groups16(kind) ? 16 : 8, own_chain = kind == FEW_Q4_K || kind == FEW_Q5_K || kind == FEW_Q2_K;
    few_f acc[FEW_X_ROWS], acc_off[FEW_X_ROWS];
    for (int r = 0; r < R; r++) acc[r] = acc_off[r] = FEW(setzero_ps)();
    for (int b = 0; b < nb; b++) {
        few_i sum[FEW_X_ROWS];
        scaled_block_sums(codes + (size_t)64 * FEW_VECTOR_BYTES * b, scales + (size_t)groups * FEW_LANES * b, groups, 64 / groups,
                          few_top(kind), xq, x_row, m0, b, sum, R);
        const few_f db = FEW(load_ps)(d + FEW_LANES * b);
        for (int r = 0; r < R; r++) {
            const x_block256 *xb = X_BLOCK(x_block256, xq, x_row, m0 + r, b);
            const int16_t *group_sums = groups == 16 ? xb->sums : xb->sums32;
            few_i offset = FEW_SI(setzero)();
            for (int i = 0; i < groups / 2; i++)
                offset = dot_pairs(offset, load_few(pairs + (size_t)groups / 2 * FEW_LANES * b + FEW_LANES * i),
                                   FEW(set1_epi32)((int)read_u32(group_sums + 2 * i)));
            const few_f xd = FEW(set1_ps)(xb->d);
            if (own_chain) {
                acc[r] = FEW(fmadd_ps)(FEW(cvtepi32_ps)(sum[r]), FEW(mul_ps)(db, xd), acc[r]);
                acc_off[r] = FEW(fmadd_ps)(FEW(cvtepi32_ps)(offset), FEW(mul_ps)(FEW(load_ps)(dmin + FEW_LANES * b), xd), acc_off[r]);
            } else {
                const few_i total = FEW(sub_epi32)(sum[r], FEW(slli_epi32)(offset, kind == FEW_Q6_K ? 5 : 2));
                acc[r] = FEW(fmadd_ps)(FEW(cvtepi32_ps)(total), FEW(mul_ps)(db, xd), acc[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) store_lanes(y + (size_t)(m0 + r) * y_row, own_chain ? FEW(sub_ps)(acc[r], acc_off[r]) : acc[r], valid);
}

// IQ4_XS: a block of 256 values is 8 sub-blocks of 32 4-bit codes through IQ4_NL's levels, each
// with a 6-bit scale less 32 (iq4_xs_scale). Each sub-block's sums times its scales and added
// (with VNNI: the levels by the activations offset by 128, and the offset's share, -128
// sum(sc_s levels' sum_s), the bias, taken off once a block); then the row kernels' one
// multiply-add (iq4_xs_rows), so the same bits.

// Block b of the rows at out: sub-block s's levels at out + 8 s vectors (as few_unpack's);
// scales [8][lanes] in int32 lanes; bias (with VNNI; else 0); d
ROWS_INLINE void few_unpack_iq4_xs(const uint8_t *const *p, uint8_t *out, int32_t *scales, int32_t *bias, float *d) {
    const few_i head = row_dwords(p, 0), low = row_dwords(p, 4);  // d and scales_h; scales_l
    const few_i high = FEW(srli_epi32)(head, 16), nibble = FEW(set1_epi32)(15), two = FEW(set1_epi32)(3);
    FEW(store_ps)(d, low_halves_ps(head));
    few_i total = FEW_SI(setzero)();
    for (int s = 0; s < 8; s++) {
        const few_i sc = FEW(sub_epi32)(FEW_SI(or)(FEW_SI(and)(FEW(srli_epi32)(low, 4 * s), nibble),
                                                   FEW(slli_epi32)(FEW_SI(and)(FEW(srli_epi32)(high, 2 * s), two), 4)),
                                        FEW(set1_epi32)(32));
        store_few(scales + FEW_LANES * s, sc);
        few_i z[4];
        row_bytes16(p, 8 + 16 * s, z);
        for (int k = 0; k < 8; k++) {
            const few_i q = FEW(shuffle_epi8)(few_levels(), FEW_SI(and)(k < 4 ? z[k] : FEW(srli_epi16)(z[k - 4], 4), FEW(set1_epi8)(15)));
            store_few(out + FEW_VECTOR_BYTES * (8 * s + k), q);
        }
#ifdef FEW_SIGNED
        few_i level_sum = FEW_SI(setzero)();
        for (int k = 0; k < 8; k++) level_sum = dot_bytes(level_sum, FEW(set1_epi8)(1), load_few(out + FEW_VECTOR_BYTES * (8 * s + k)));
        total = FEW(add_epi32)(total, FEW(mullo_epi32)(level_sum, sc));
#endif
    }
    store_few(bias, FEW(sub_epi32)(FEW_SI(setzero)(), FEW(slli_epi32)(total, 7)));
}

// Activation rows m0..m0+R-1 against the unpacked IQ4_XS blocks, into their outputs
ROWS_INLINE void few_steps_iq4_xs(const uint8_t *codes, const int32_t *scales, const int32_t *bias, const float *d, int nb,
                                  const uint8_t *xq, size_t x_row, const uint8_t *x_offset, int m0, float *y, size_t y_row, int valid,
                                  const int R) {
#ifndef FEW_SIGNED
    (void)x_offset;  // the VNNI dots' only
#endif
    few_f acc[FEW_X_ROWS];
    for (int r = 0; r < R; r++) acc[r] = FEW(setzero_ps)();
    for (int b = 0; b < nb; b++) {
        few_i sum[FEW_X_ROWS];
        for (int r = 0; r < R; r++) sum[r] = load_few(bias + FEW_LANES * b);
        for (int s = 0; s < 8; s++) {
            few_i w[8];
            for (int k = 0; k < 8; k++) w[k] = load_few(codes + FEW_VECTOR_BYTES * (64 * (size_t)b + 8 * s + k));
            const few_i sc = load_few(scales + FEW_LANES * (8 * (size_t)b + s));
            for (int r = 0; r < R; r++) {
#ifdef FEW_SIGNED
                const few_i dot = offset_dot(w, x_offset + ((size_t)(m0 + r) * nb + b) * 256 + 32 * s, FEW_SI(setzero)());
                sum[r] = FEW(add_epi32)(sum[r], FEW(mullo_epi32)(dot, sc));
#else
                sum[r] = FEW(add_epi32)(sum[r], signed_dot_times(w, X_BLOCK(x_block256, xq, x_row, m0 + r, b)->q + 32 * s, int16_pairs(sc)));
#endif
            }
        }
        const few_f db = FEW(load_ps)(d + FEW_LANES * b);
        for (int r = 0; r < R; r++) {
            const few_f xd = FEW(set1_ps)(X_BLOCK(x_block256, xq, x_row, m0 + r, b)->d);
            acc[r] = FEW(fmadd_ps)(FEW(cvtepi32_ps)(sum[r]), FEW(mul_ps)(db, xd), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) store_lanes(y + (size_t)(m0 + r) * y_row, acc[r], valid);
}

// A block's unpacked form by kind, in lanes' worth (4 bytes each, FEW_LANES of them): the codes
// (8 vectors a 32 values), then d, then c (Q4_1/Q5_1's minimum, d, or the K-quants' dmin), then
// `scale_lanes` (bias, or the 256-value blocks' scales), then `pair_lanes` (Q4_K/Q5_K's minimums,
// Q6_K's scale pairs, IQ4_XS's bias)
static inline int few_values(int kind) { return few_k_quant(kind) || kind == FEW_IQ4_XS ? 256 : 32; }
static inline int few_scale_lanes(int kind) { return few_groups16(kind) ? 16 : kind == FEW_Q4_K || kind == FEW_Q5_K || kind == FEW_IQ4_XS ? 8 : 1; }
static inline int few_pair_lanes(int kind) { return few_groups16(kind) ? 8 : kind == FEW_Q4_K || kind == FEW_Q5_K ? 4 : kind == FEW_IQ4_XS; }
static inline int few_block_bytes(int kind) {
    const int with_min = kind == FEW_Q4_1 || kind == FEW_Q5_1, with_high = kind == FEW_Q5_0 || kind == FEW_Q5_1;
    switch (kind) {
    case FEW_Q4_K: return 144;
    case FEW_Q5_K: return 176;
    case FEW_Q6_K: return 210;
    case FEW_Q2_K: return 84;
    case FEW_Q3_K: return 110;
    case FEW_Q8_0: return 34;
    case FEW_IQ4_NL: return 18;
    case FEW_IQ4_XS: return 136;
    default: return (with_min ? 20 : 18) + (with_high ? 4 : 0);
    }
}

// Activation rows m0..m0+R-1 against the unpacked blocks of `kind` (laid out as few_rows_task's)
ROWS_INLINE void few_kind_steps(const uint8_t *codes, const float *d, const float *c, const int32_t *scales, const int32_t *pairs,
                                int nb, const uint8_t *xq, size_t x_row, const uint8_t *x_offset, int m0, float *y, size_t y_row,
                                int valid, const int kind, const int R) {
    if (few_k_quant(kind)) few_steps_scaled(codes, scales, pairs, d, c, nb, xq, x_row, m0, y, y_row, valid, kind, R);
    else if (kind == FEW_IQ4_XS) few_steps_iq4_xs(codes, scales, pairs, d, nb, xq, x_row, x_offset, m0, y, y_row, valid, R);
    else few_steps(codes, d, c, scales, nb, xq, x_row, x_offset, m0, y, y_row, valid, kind, R);
}

// Weight rows row[0..rows) (up to ROWS_PER_TASK) against the M quantized activation rows xq (for
// the signed codes, also their codes offset by 128: x_offset [M][nb][32]) into y, FEW_LANES
// weight rows at a time: their blocks unpacked into the thread's scratch, then the activation
// rows FEW_X_ROWS at a time over them
ROWS_INLINE int few_rows_task(const uint8_t *const *row, int rows, int K, const uint8_t *xq, size_t x_row, const uint8_t *x_offset,
                              int M, float *y, size_t y_row, const int kind) {
    const int nb = K / few_values(kind), size = few_block_bytes(kind), lanes = FEW_LANES;
    const size_t code_bytes = (size_t)few_values(kind) / 32 * 8 * FEW_VECTOR_BYTES, block_lanes = 2 + few_scale_lanes(kind) + few_pair_lanes(kind);
    uint8_t *mem = scratch((size_t)nb * (code_bytes + block_lanes * FEW_VECTOR_BYTES));
    if (!mem) return -2;
    uint8_t *codes = mem;
    float *d = (float *)(mem + code_bytes * nb), *c = d + (size_t)lanes * nb;
    int32_t *scales = (int32_t *)(c + (size_t)lanes * nb), *pairs = scales + (size_t)few_scale_lanes(kind) * lanes * nb;
    for (int n0 = 0; n0 < rows; n0 += FEW_LANES) {
        const uint8_t *p[FEW_LANES];
        for (int n = 0; n < FEW_LANES; n++) p[n] = row[n0 + n < rows ? n0 + n : rows - 1];  // rows past the last: outputs not stored
        for (int b = 0; b < nb; b++) {
            uint8_t *cb = codes + code_bytes * b;
            float *db = d + lanes * b, *cw = c + lanes * b;
            int32_t *sb = scales + (size_t)few_scale_lanes(kind) * lanes * b, *pb = pairs + (size_t)few_pair_lanes(kind) * lanes * b;
            if (kind == FEW_Q6_K) few_unpack_q6_k(p, cb, sb, pb, db);
            else if (kind == FEW_Q2_K || kind == FEW_Q3_K) few_unpack_q2_q3_k(p, cb, sb, pb, db, cw, kind == FEW_Q3_K);
            else if (kind == FEW_IQ4_XS) few_unpack_iq4_xs(p, cb, sb, pb, db);
            else if (kind == FEW_Q4_K || kind == FEW_Q5_K) few_unpack_k(p, cb, sb, pb, db, cw, kind == FEW_Q5_K);
            else few_unpack(p, cb, db, cw, sb, kind);
            for (int n = 0; n < FEW_LANES; n++) prefetch_ahead(p[n], size), p[n] += size;
        }
        const int valid = rows - n0 < FEW_LANES ? rows - n0 : FEW_LANES;
        float *yn = y + n0;
        for (int m = 0; m < M; m += FEW_X_ROWS) {
            const int R = M - m < FEW_X_ROWS ? M - m : FEW_X_ROWS;
            switch (R) {  // R a constant in each: the rows' chains stay in registers
            case 1: few_kind_steps(codes, d, c, scales, pairs, nb, xq, x_row, x_offset, m, yn, y_row, valid, kind, 1); break;
            case 2: few_kind_steps(codes, d, c, scales, pairs, nb, xq, x_row, x_offset, m, yn, y_row, valid, kind, 2); break;
            case 3: few_kind_steps(codes, d, c, scales, pairs, nb, xq, x_row, x_offset, m, yn, y_row, valid, kind, 3); break;
            default: few_kind_steps(codes, d, c, scales, pairs, nb, xq, x_row, x_offset, m, yn, y_row, valid, kind, 4); break;
            }
        }
    }
    return 0;
}

static int few_rows(int kind, const uint8_t *const *row, int rows, int K, const uint8_t *xq, size_t x_row, const uint8_t *x_offset,
                    int M, float *y, size_t y_row) {
    switch (kind) {  // kind a constant in each
    case FEW_Q4_0: return few_rows_task(row, rows, K, xq, x_row, x_offset, M, y, y_row, FEW_Q4_0);
    case FEW_Q4_1: return few_rows_task(row, rows, K, xq, x_row, x_offset, M, y, y_row, FEW_Q4_1);
    case FEW_Q5_0: return few_rows_task(row, rows, K, xq, x_row, x_offset, M, y, y_row, FEW_Q5_0);
    case FEW_Q5_1: return few_rows_task(row, rows, K, xq, x_row, x_offset, M, y, y_row, FEW_Q5_1);
    case FEW_Q4_K: return few_rows_task(row, rows, K, xq, x_row, x_offset, M, y, y_row, FEW_Q4_K);
    case FEW_Q5_K: return few_rows_task(row, rows, K, xq, x_row, x_offset, M, y, y_row, FEW_Q5_K);
    case FEW_Q6_K: return few_rows_task(row, rows, K, xq, x_row, x_offset, M, y, y_row, FEW_Q6_K);
    case FEW_Q2_K: return few_rows_task(row, rows, K, xq, x_row, x_offset, M, y, y_row, FEW_Q2_K);
    case FEW_Q3_K: return few_rows_task(row, rows, K, xq, x_row, x_offset, M, y, y_row, FEW_Q3_K);
    case FEW_Q8_0: return few_rows_task(row, rows, K, xq, x_row, x_offset, M, y, y_row, FEW_Q8_0);
    case FEW_IQ4_NL: return few_rows_task(row, rows, K, xq, x_row, x_offset, M, y, y_row, FEW_IQ4_NL);
    case FEW_IQ4_XS: return few_rows_task(row, rows, K, xq, x_row, x_offset, M, y, y_row, FEW_IQ4_XS);
    default: return -1;
    }
}

// Activation row m's codes (blocks of `block` values) offset by 128 (unsigned bytes), [K], for
// the signed codes' dots
static void few_offset_codes(const uint8_t *xq, size_t x_row, int K, int block, int m, uint8_t *x_offset) {
    for (int j = 0; j < K; j += 32) {
        const int8_t *q = block == 256 ? X_BLOCK(x_block256, xq, x_row, m, j / 256)->q + j % 256 : X_BLOCK(x_block32, xq, x_row, m, j / 32)->q;
        _mm256_storeu_si256((__m256i *)(x_offset + (size_t)m * K + j),
                            _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)q), _mm256_set1_epi8((char)0x80)));
    }
}
#endif

// --- the matmul ---

typedef struct {
    int type, block, block_bytes, x_block, x_block_bytes;
    rows_fn dot;
} format;

static const format FORMATS[] = {
    {GGML_Q4_0, 32, 18, 32, sizeof(x_block32), dot_q4_0},
    {GGML_Q4_1, 32, 20, 32, sizeof(x_block32), dot_q4_1},
    {GGML_Q5_0, 32, 22, 32, sizeof(x_block32), dot_q5_0},
    {GGML_Q5_1, 32, 24, 32, sizeof(x_block32), dot_q5_1},
    {GGML_Q8_0, 32, 34, 32, sizeof(x_block32), dot_q8_0},
    {GGML_IQ4_NL, 32, 18, 32, sizeof(x_block32), dot_iq4_nl},
    {GGML_Q2_K, 256, 84, 256, sizeof(x_block256), dot_q2_k},
    {GGML_Q3_K, 256, 110, 256, sizeof(x_block256), dot_q3_k},
    {GGML_Q4_K, 256, 144, 256, sizeof(x_block256), dot_q4_k},
    {GGML_Q5_K, 256, 176, 256, sizeof(x_block256), dot_q5_k},
    {GGML_Q6_K, 256, 210, 256, sizeof(x_block256), dot_q6_k},
    {GGML_IQ4_XS, 256, 136, 256, sizeof(x_block256), dot_iq4_xs},
};

// One input row's int8 blocks.
static void quantize_row(const format *f, const float *x, int K, uint8_t *out) {
    if (f->x_block == 32) quantize_x32(x, K, (x_block32 *)out);
    else quantize_x256(x, K, (x_block256 *)out);
}

static const format *find_format(int type) {
    for (size_t i = 0; i < sizeof(FORMATS) / sizeof(FORMATS[0]); i++)
        if (FORMATS[i].type == type) return &FORMATS[i];
    return NULL;
}

// Whether gguf_matmul takes this type with rows of K values (the one place that says so).
int gguf_matmul_supports(int type, int K) {
    const format *f = find_format(type);
    return f && K > 0 && K % f->block == 0 && K % f->x_block == 0;
}

int gguf_matmul_simd(void) {
#ifdef USE_AVX2
    return 1;
#else
    return 0;
#endif
}

// Weight rows per task: each DOT_ROWS input rows (in L1) meet all of them, read from L1 or L2.
#define ROWS_PER_TASK 16  // and a tile's 16 weight rows (amx_matmul)

// Task t's weight rows (up to ROWS_PER_TASK from row t * ROWS_PER_TASK on, across the parts):
// their pointers into row[], their count returned.
static int task_rows(int t, int N, int parts, const uint8_t *const *w, const int *part_rows, const long *part_stride,
                     const uint8_t *row[ROWS_PER_TASK]) {
    int n0 = t * ROWS_PER_TASK, rows = n0 + ROWS_PER_TASK < N ? ROWS_PER_TASK : N - n0;
    int p = 0, r = n0;
    for (int i = 0; i < rows; i++, r++) {
        while (p < parts - 1 && r >= part_rows[p]) r -= part_rows[p++];
        row[i] = w[p] + (size_t)r * part_stride[p];
    }
    return rows;
}

#ifdef USE_AMX
// A type's tile task, with its group of values a scale (the tiles' depth), the activation sums
// it takes as int16 pairs a block (amx_pack_x), and the activation rows from which it beats the
// row kernels (below, unpacking 16 weight rows for the tiles costs more than a few rows save;
// 3B shapes, 2 threads: Q4_K and Q8_0 from 8 rows, Q6_K's three copies of its codes from 10: at
// 12 rows 386 -> 300 ms, level at 9). The few-rows dots, where they take a type, take its rows
// first (few_kind).
typedef struct {
    amx_fn task;
    int group, pairs, min_rows;
} amx_kernel;

static amx_kernel amx_for(int type) {
    switch (type) {
    case GGML_Q4_0: return (amx_kernel){amx_q4_0, 32, 0, 8};
    case GGML_Q4_1: return (amx_kernel){amx_q4_1, 32, 0, 8};
    case GGML_Q5_0: return (amx_kernel){amx_q5_0, 32, 0, 8};
    case GGML_Q5_1: return (amx_kernel){amx_q5_1, 32, 0, 8};
    case GGML_Q8_0: return (amx_kernel){amx_q8_0, 32, 0, 8};
    case GGML_IQ4_NL: return (amx_kernel){amx_iq4_nl, 32, 0, 8};
    case GGML_IQ4_XS: return (amx_kernel){amx_iq4_xs_task, 32, 0, 8};
    case GGML_Q4_K: return (amx_kernel){amx_q4_k, 64, 4, 8};
    case GGML_Q5_K: return (amx_kernel){amx_q5_k, 64, 4, 8};
    case GGML_Q2_K: return (amx_kernel){amx_q2_k, 64, 8, 8};
    case GGML_Q6_K: return (amx_kernel){amx_q6_k_task, 64, 0, 10};
    case GGML_Q3_K: return (amx_kernel){amx_q3_k, 64, 0, 8};
    default: return (amx_kernel){NULL, 0, 0, 0};
    }
}

static int amx_matmul(const format *f, amx_kernel kernel, int parts, const uint8_t *const *w, const int *part_rows, const long *part_stride,
                      int N, const float *x, float *y, size_t y_row, int M, int K, int threads) {
    size_t x_row = (size_t)(K / f->x_block) * f->x_block_bytes, tiles = (M + TILE - 1) / TILE, nb = K / f->x_block;
    size_t code_bytes = tiles * (K / 32) * 512, dx_bytes = 2 * tiles * nb * TILE * sizeof(float);  // dx and sx
    size_t sum_bytes = tiles * nb * kernel.pairs * TILE * sizeof(int32_t);
    code_bytes += 3 * 512;  // a fourth group read past the last (amx_signed_task)
    uint8_t *xq = malloc(x_row * M + code_bytes + dx_bytes + sum_bytes);
    if (!xq) return -2;
    int8_t *codes = (int8_t *)(xq + x_row * M);
    float *dx = (float *)(xq + x_row * M + code_bytes), *sx = dx + tiles * nb * TILE;
    int32_t *sums = (int32_t *)(xq + x_row * M + code_bytes + dx_bytes);
    const amx_x packed = {codes, dx, sx, sums, (int)tiles};
    int tasks = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK, status = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) quantize_row(f, x + (size_t)m * K, K, xq + m * x_row);
#pragma omp for schedule(static)
        for (int t = 0; t < (int)tiles; t++) amx_pack_x(xq, x_row, f->x_block, kernel.pairs, M, K, t, codes, dx, sx, sums);
        amx_begin(kernel.group);
#pragma omp for schedule(static)
        for (int t = 0; t < tasks; t++) {
            const uint8_t *row[ROWS_PER_TASK];
            int rows = task_rows(t, N, parts, w, part_rows, part_stride, row);
            if (kernel.task(row, rows, K, &packed, M, y + (size_t)t * ROWS_PER_TASK, y_row)) status = -2;
        }
        _tile_release();
    }
    free(xq);
    return status;
}
#endif

// x [M, K] float32; the weight's N rows of raw GGUF blocks in `parts` pieces (q, k and v as they
// lie in the file: fused without a copy; a Q/K weight's heads in Hugging Face's row order, each
// a run of every other row of the file's), part p holding part_rows[p] rows at w[p],
// part_stride[p] bytes apart; y [M, N], its rows y_row floats apart (N, or more where this weight's
// outputs sit beside another's). Returns 0, or -1 for an unsupported type or K, -2 when out of memory.
static int matmul_rows(int type, int parts, const uint8_t *const *w, const int *part_rows, const long *part_stride,
                       const float *x, float *y, size_t y_row, int M, int K, int threads) {
    if (!gguf_matmul_supports(type, K)) return -1;
    const format *f = find_format(type);
    int N = 0;
    for (int p = 0; p < parts; p++) N += part_rows[p];
#ifdef USE_FEW_ROWS
    const int few = few_kind(type, M);
#else
    const int few = -1;
#endif
#ifdef USE_AMX
    amx_kernel kernel = amx_for(type);
    if (few < 0 && kernel.task && M >= kernel.min_rows && amx_usable())
        return amx_matmul(f, kernel, parts, w, part_rows, part_stride, N, x, y, y_row, M, K, threads);
#endif
    size_t x_row = (size_t)(K / f->x_block) * f->x_block_bytes;
#ifdef FEW_SIGNED
    size_t offset_bytes = few >= FEW_Q8_0 ? (size_t)M * K : 0;
#else
    size_t offset_bytes = 0;
    (void)few;
#endif
    uint8_t *xq = malloc(x_row * M + offset_bytes);
    if (!xq) return -2;
#ifdef USE_FEW_ROWS
    uint8_t *x_offset = offset_bytes ? xq + x_row * M : NULL;
#endif
    int tasks = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK, status = 0;
    if (M == 1) quantize_row(f, x, K, xq);  // a decoded token: no parallel loop (and barrier) for one row
#pragma omp parallel num_threads(threads)
    {
        if (M > 1) {
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) quantize_row(f, x + (size_t)m * K, K, xq + m * x_row);
        }
#ifdef USE_FEW_ROWS
        if (x_offset) {
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) few_offset_codes(xq, x_row, K, f->x_block, m, x_offset);
        }
#endif
#pragma omp for schedule(static)
        for (int t = 0; t < tasks; t++) {
            const uint8_t *row[ROWS_PER_TASK];
            int rows = task_rows(t, N, parts, w, part_rows, part_stride, row), n0 = t * ROWS_PER_TASK;
#ifdef USE_FEW_ROWS
            if (few >= 0) {
                if (few_rows(few, row, rows, K, xq, x_row, x_offset, M, y + n0, y_row)) status = -2;
                continue;
            }
#endif
            // DOT_ROWS input rows a call (they stay in L1 while the task's weight rows pass), the
            // rest together: a row's sums are the same either way (see the dots), so no row
            // depends on its neighbours
            for (int m = 0; m < M;) {
                int R = M - m < DOT_ROWS ? M - m : DOT_ROWS;
                for (int i = 0; i < rows; i++) f->dot(row[i], xq + m * x_row, x_row, K, y + m * y_row + n0 + i, y_row, R);
                m += R;
            }
        }
    }
    free(xq);
    return status;
}

// Whether prompts may take the AMX tiles (the same results either way; settings.amx()).
void gguf_matmul_allow_amx(int allowed) {
#ifdef USE_AMX
    amx_allowed = allowed;
#else
    (void)allowed;
#endif
}

// Whether prompts take the AMX tiles here (tests check that they do where the CPU has them).
int gguf_matmul_amx(void) {
#ifdef USE_AMX
    return amx_usable();
#else
    return 0;
#endif
}

int gguf_matmul(int type, int parts, const uint8_t *const *w, const int *part_rows, const long *part_stride,
                const float *x, float *y, int M, int K, int threads) {
    int N = 0;
    for (int p = 0; p < parts; p++) N += part_rows[p];
    return matmul_rows(type, parts, w, part_rows, part_stride, x, y, N, M, K, threads);
}

// y = w * x / sqrt(mean(x^2) + eps) per row of K, in float32 as transformers computes it: one
// call instead of the several torch ops (and their dispatch) a decoded token's norm costs.
void rms_norm_f32(const float *x, const float *w, float *y, int M, int K, float eps) {
    for (int m = 0; m < M; m++, x += K, y += K) {
        float sum = 0;
        for (int j = 0; j < K; j++) sum += x[j] * x[j];
        float scale = 1 / sqrtf(sum / K + eps);
        for (int j = 0; j < K; j++) y[j] = w[j] * (x[j] * scale);
    }
}

// RoPE in place on rows of `heads` heads of D floats (row r at x + r * row_stride), rotating the
// two halves of each head as Hugging Face's rotate_half does: x * cos + (-x2, x1) * sin, with
// signed_sin = (-sin, sin) per row (the tables model.py keeps).
void rope_f32(float *x, long row_stride, int T, int heads, int D, const float *cos, const float *signed_sin) {
    int half = D / 2;
    for (int t = 0; t < T; t++, x += row_stride, cos += D, signed_sin += D) {
        for (int h = 0; h < heads; h++) {
            float *v = x + h * D;
            for (int j = 0; j < half; j++) {
                float a = v[j], b = v[j + half];
                v[j] = a * cos[j] + b * signed_sin[j];
                v[j + half] = b * cos[j + half] + a * signed_sin[j + half];
            }
        }
    }
}

// --- attention: a prompt's rows and a decoded token through the same per-(row, head) maths ---
//
// The caches hold keys and values [KV, capacity, D] per layer as float16 (llama.cpp's default:
// a 3B model's 64k context in 4.8 GB, not 9.6) or float32. A row's own key and value are written
// first and read back from the cache like every other position, so a row sees the same (rounded)
// numbers whether its prompt came in one forward or token by token.

#if defined(USE_AVX2) && defined(__F16C__)
#define USE_F16C 1
#endif

// Round to nearest even, as F16C's _cvtss_sh and torch's .half() do (ggml's scalar fallback).
static inline uint16_t f32_to_f16(float f) {
#if defined(__F16C__)
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t w, bits;
    memcpy(&w, &f, 4);
    uint32_t shl1_w = w + w, sign = w & 0x80000000u, bias = shl1_w & 0xff000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    uint32_t bias_bits = (bias >> 1) + 0x07800000u;
    float bias_f;
    memcpy(&bias_f, &bias_bits, 4);
    base = bias_f + base;
    memcpy(&bits, &base, 4);
    uint32_t nonsign = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
#endif
}

static inline float cached(const void *cache, size_t at, int f16) {
    return f16 ? f16_to_f32(((const uint16_t *)cache)[at]) : ((const float *)cache)[at];
}

// Where element `at` of a cache lies. A decoded token's attention streams the whole cache from
// memory (SmolLM2 at 4,000 positions: 3 MB a layer, 343 us a layer cold against 98 hot), and its
// loops keep too few loads in flight: they ask for what lies PREFETCH_AHEAD bytes on, as the
// weights' do (cold: 343 -> 205-270 us; SmolLM2's decoded token at 4,096: 16.0 -> 13.0-14.6 ms,
// at 900: 7.0 -> 6.3 ms; SmolLM3-3B's at 4,096: 106 -> 104 ms).
static inline const uint8_t *cache_bytes(const void *cache, size_t at, int f16) {
    return (const uint8_t *)cache + (at << (f16 ? 1 : 2));
}

static void write_cached(void *cache, size_t at, const float *x, int D, int f16) {
    if (!f16) {
        memcpy((float *)cache + at, x, D * sizeof(float));
        return;
    }
    uint16_t *dst = (uint16_t *)cache + at;
    int j = 0;
#ifdef USE_F16C
    for (; j + 7 < D; j += 8)
        _mm_storeu_si128((__m128i *)(dst + j), _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; j < D; j++) dst[j] = f32_to_f16(x[j]);
}

#ifdef USE_F16C
static inline __m256 cached8(const void *cache, size_t at, int f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + at)))
               : _mm256_loadu_ps((const float *)cache + at);
}

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// sum8 of each of four vectors, in one set of shuffles: the same additions of the same lanes
static inline void sum8_x4(__m256 a0, __m256 a1, __m256 a2, __m256 a3, float *sums) {
    __m256 s01 = _mm256_add_ps(_mm256_permute2f128_ps(a0, a1, 0x20), _mm256_permute2f128_ps(a0, a1, 0x31));
    __m256 s23 = _mm256_add_ps(_mm256_permute2f128_ps(a2, a3, 0x20), _mm256_permute2f128_ps(a2, a3, 0x31));
    __m256 halves = _mm256_add_ps(_mm256_shuffle_ps(s01, s23, 0x44), _mm256_shuffle_ps(s01, s23, 0xee));
    __m256 all = _mm256_hadd_ps(halves, halves);  // lanes 0, 4, 1, 5: a0, a1, a2, a3
    float lanes[8];
    _mm256_storeu_ps(lanes, all);
    sums[0] = lanes[0], sums[1] = lanes[4], sums[2] = lanes[1], sums[3] = lanes[5];
}
#endif

// q . key: 8 lanes of multiply-adds over D, then the lanes summed pairwise.
static inline float key_dot(const float *q, const void *keys, size_t at, int D, int f16) {
#ifdef USE_F16C
    if (D % 8 == 0) {
        __m256 acc = _mm256_setzero_ps();
        for (int j = 0; j < D; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), cached8(keys, at + j, f16), acc);
        return sum8(acc);
    }
#endif
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0}, dot = 0;
    int j = 0;
    for (; j + 7 < D; j += 8)
        for (int u = 0; u < 8; u++) part[u] += q[j + u] * cached(keys, at + j + u, f16);
    for (; j < D; j++) dot += q[j] * cached(keys, at + j, f16);
    return dot + (((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])));
}

#ifdef USE_F16C
// key_dot for 4 consecutive keys (D floats apart, D a multiple of 8) and N query heads q[0..N)
// (D floats apart) that share them, into dots + h * step, each sum in exactly key_dot's order: 4
// independent chains of multiply-adds a head keep the FMA units busy where one chain waits on
// each, and each key's 8 values are converted once for all N. Converting, not multiplying,
// bounds these loops on a float16 cache (F16C's conversion issues once a cycle, the
// multiply-adds twice). With weigh_values_heads, a layer's attention: SmolLM2 (3 heads a
// key/value head), 8 rows at position 900, 186 -> 122 us; SmolLM3-3B (4), a decoded token at
// 4,000, 410 -> 266 us.
#define ATTEND_HEADS_MAX 4
static inline __attribute__((always_inline)) void key_dots4_heads(const float *q, const int N, const void *keys, size_t at,
                                                                   int D, int f16, float *dots, size_t step) {
    __m256 a[ATTEND_HEADS_MAX][4];
    for (int h = 0; h < N; h++)
        for (int u = 0; u < 4; u++) a[h][u] = _mm256_setzero_ps();
    for (int j = 0; j < D; j += 8) {
        __m256 k[4];
        for (int u = 0; u < 4; u++) k[u] = cached8(keys, at + u * (size_t)D + j, f16);
        for (int h = 0; h < N; h++) {
            __m256 x = _mm256_loadu_ps(q + h * D + j);
            for (int u = 0; u < 4; u++) a[h][u] = _mm256_fmadd_ps(x, k[u], a[h][u]);
        }
    }
    for (int h = 0; h < N; h++) sum8_x4(a[h][0], a[h][1], a[h][2], a[h][3], dots + h * step);
}

// o[h * D + c ..] += sum over positions l of p[h * step + l] v[l] for 16 outputs from c, N heads:
// each value's 16 converted once for all N; each output's sum in the order of positions, as the
// one-head loop below takes it.
static inline __attribute__((always_inline)) void weigh_values_heads(const float *p, size_t step, const int N, const void *values,
                                                                      size_t at, int D, int f16, int b, int end, int c, float *o,
                                                                      int stream) {
    __m256 acc[ATTEND_HEADS_MAX][2];
    for (int h = 0; h < N; h++)
        for (int u = 0; u < 2; u++) acc[h][u] = _mm256_loadu_ps(o + h * D + c + 8 * u);
    for (int l = b; l < end; l++) {
        size_t row = at + (size_t)l * D + c;
        if (stream) prefetch_ahead(cache_bytes(values, row, f16), D << (f16 ? 1 : 2));
        __m256 v0 = cached8(values, row, f16), v1 = cached8(values, row + 8, f16);
        for (int h = 0; h < N; h++) {
            __m256 w = _mm256_set1_ps(p[h * step + l]);
            acc[h][0] = _mm256_fmadd_ps(w, v0, acc[h][0]);
            acc[h][1] = _mm256_fmadd_ps(w, v1, acc[h][1]);
        }
    }
    for (int h = 0; h < N; h++)
        for (int u = 0; u < 2; u++) _mm256_storeu_ps(o + h * D + c + 8 * u, acc[h][u]);
}
#endif

#ifdef USE_F16C
// e^x for x <= 88 (scores minus their max; silu's e^-g, clamped), 8 at a time: 2^n e^r with
// n = round(x / ln 2) and |r| <= ln(2) / 2 (ln 2 split in two so r is exact), e^r by its Taylor
// series to degree 7 (truncation under 4e-9 relative); below -87 (2^n no longer a normal float)
// it gives 0.
static inline __m256 exp8(__m256 x) {
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-6f), r);
    __m256 e = _mm256_set1_ps(1.f / 5040);
    static const float taylor[7] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1, 1};
    for (int i = 0; i < 7; i++) e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(taylor[i]));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 normal = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_GE_OQ);
    return _mm256_and_ps(normal, _mm256_mul_ps(e, _mm256_castsi256_ps(scale)));
}
#endif

// p[l] = e^(p[l] - top) for l < L; returns their sum.
static inline float exp_and_sum(float *p, int L, float top) {
    int l = 0;
    float total = 0;
#ifdef USE_F16C
    __m256 tops = _mm256_set1_ps(top), sums = _mm256_setzero_ps();
    for (; l + 7 < L; l += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + l), tops));
        _mm256_storeu_ps(p + l, e);
        sums = _mm256_add_ps(sums, e);
    }
    if (l < L) {  // the tail through the same function, so a position's weight never depends on L % 8
        float tail[8] = {0};
        memcpy(tail, p + l, (L - l) * sizeof(float));
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), tops));
        _mm256_storeu_ps(tail, e);
        memcpy(p + l, tail, (L - l) * sizeof(float));
        for (; l < L; l++) total += p[l];
    }
    return sum8(sums) + total;
#else
    for (; l < L; l++) {
        p[l] = expf(p[l] - top);
        total += p[l];
    }
    return total;
#endif
}

// Positions per pass over the cache: 64 keys or values of a head (16-32 KB) stay in L1 while
// every query head that shares them reads them, so a long context is read from memory once.
enum { ATTEND_BLOCK = 64 };

// Query heads q[0..n) (D floats apart) of one row, sharing one key/value head: softmax(q k /
// sqrt(D)) v over its cached positions 0..L-1 (element offset `at` in the caches) into out[n * D],
// with p[n * L] and o[n * D] as scratch; `stream`: the first row to read these caches in this
// call, whose loops prefetch them (later rows find them in cache). Each (row, head) takes the
// same operations whatever n (blocks of positions only reorder independent sums; o holds a sum
// between blocks exactly), and every path (a decoded token, a prompt's rows, any thread count)
// computes it here, so a row's output does not depend on how its prompt was split into forward
// passes.
static inline __attribute__((always_inline)) void attend_heads_as(const float *q, int n, const void *keys, const void *values,
                                                                   size_t at, int f16, int L, int D, const int stream, float *p,
                                                                   float *o, float *out) {
#ifndef USE_F16C
    (void)stream;  // the vector loops' prefetch only
#endif
    float scale = 1 / sqrtf((float)D), totals[n];
    for (int b = 0; b < L; b += ATTEND_BLOCK) {
        int end = b + ATTEND_BLOCK < L ? b + ATTEND_BLOCK : L;
        int h = 0;
#ifdef USE_F16C
        for (; D % 8 == 0 && h < n; h += ATTEND_HEADS_MAX) {  // up to ATTEND_HEADS_MAX heads at once
            int N = n - h < ATTEND_HEADS_MAX ? n - h : ATTEND_HEADS_MAX, l = b;
            const float *qh = q + h * D;
            for (; l + 3 < end; l += 4) {
                size_t key = at + (size_t)l * D;
                float *dots = p + (size_t)h * L + l;
                if (stream && !h) prefetch_ahead(cache_bytes(keys, key, f16), 4 * D << (f16 ? 1 : 2));
                switch (N) {  // N a constant in each: the sums stay in registers
                case 1: key_dots4_heads(qh, 1, keys, key, D, f16, dots, L); break;
                case 2: key_dots4_heads(qh, 2, keys, key, D, f16, dots, L); break;
                case 3: key_dots4_heads(qh, 3, keys, key, D, f16, dots, L); break;
                default: key_dots4_heads(qh, 4, keys, key, D, f16, dots, L); break;
                }
            }
            for (; l < end; l++)
                for (int g = h; g < h + N; g++) p[(size_t)g * L + l] = key_dot(q + g * D, keys, at + (size_t)l * D, D, f16);
        }
        if (h > n) h = n;
#endif
        for (; h < n; h++)  // head dims the vectors do not divide, or no F16C
            for (int l = b; l < end; l++) p[(size_t)h * L + l] = key_dot(q + h * D, keys, at + (size_t)l * D, D, f16);
    }
    for (int h = 0; h < n; h++) {
        float *ph = p + (size_t)h * L, top = -INFINITY;
        int l = 0;
#ifdef USE_F16C
        // the largest is the same whatever the order it is sought in, and a NaN score is passed
        // over everywhere (vmaxps keeps its second operand then); four vectors of maxima keep
        // vmaxps's latency out of the loop
        __m256 scales = _mm256_set1_ps(scale), tops[4];
        for (int u = 0; u < 4; u++) tops[u] = _mm256_set1_ps(-INFINITY);
        for (; l + 31 < L; l += 32)
            for (int u = 0; u < 4; u++) {
                __m256 v = _mm256_mul_ps(_mm256_loadu_ps(ph + l + 8 * u), scales);
                _mm256_storeu_ps(ph + l + 8 * u, v);
                tops[u] = _mm256_max_ps(v, tops[u]);
            }
        float lanes[8];
        _mm256_storeu_ps(lanes, _mm256_max_ps(_mm256_max_ps(tops[0], tops[1]), _mm256_max_ps(tops[2], tops[3])));
        for (int u = 0; u < 8; u++) top = lanes[u] > top ? lanes[u] : top;
#endif
        for (; l < L; l++) {
            ph[l] *= scale;
            top = ph[l] > top ? ph[l] : top;  // as fmaxf, without its call
        }
        totals[h] = exp_and_sum(ph, L, top);
    }
    for (int j = 0; j < n * D; j++) o[j] = 0;
    for (int b = 0; b < L; b += ATTEND_BLOCK) {
        int end = b + ATTEND_BLOCK < L ? b + ATTEND_BLOCK : L;
        int h = 0;
#ifdef USE_F16C
        for (; D % 64 == 0 && n - h > 1; h += ATTEND_HEADS_MAX) {  // as the one-head loop takes them, below
            int N = n - h < ATTEND_HEADS_MAX ? n - h : ATTEND_HEADS_MAX;
            const float *ph = p + (size_t)h * L;
            float *oh = o + h * D;
            for (int c = 0; c < D; c += 16) switch (N) {
                case 2: weigh_values_heads(ph, L, 2, values, at, D, f16, b, end, c, oh, stream && !c && !h); break;
                case 3: weigh_values_heads(ph, L, 3, values, at, D, f16, b, end, c, oh, stream && !c && !h); break;
                default: weigh_values_heads(ph, L, 4, values, at, D, f16, b, end, c, oh, stream && !c && !h); break;
                }
        }
        if (h > n) h = n;
#endif
        for (; h < n; h++) {
            const float *ph = p + (size_t)h * L;
            float *oh = o + h * D;
#ifdef USE_F16C
            if (D % 64 == 0) {  // 64 outputs in 8 registers a pass
                for (int c = 0; c < D; c += 64) {
                    __m256 acc[8];
                    for (int u = 0; u < 8; u++) acc[u] = _mm256_loadu_ps(oh + c + 8 * u);
                    for (int l = b; l < end; l++) {
                        __m256 w = _mm256_set1_ps(ph[l]);
                        size_t row = at + (size_t)l * D + c;
                        if (stream && !h && !c) prefetch_ahead(cache_bytes(values, row, f16), D << (f16 ? 1 : 2));
                        for (int u = 0; u < 8; u++) acc[u] = _mm256_fmadd_ps(w, cached8(values, row + 8 * u, f16), acc[u]);
                    }
                    for (int u = 0; u < 8; u++) _mm256_storeu_ps(oh + c + 8 * u, acc[u]);
                }
                continue;
            }
#endif
            for (int l = b; l < end; l++)
                for (int j = 0; j < D; j++) oh[j] += ph[l] * cached(values, at + (size_t)l * D + j, f16);
        }
    }
    for (int h = 0; h < n; h++)
        for (int j = 0; j < D; j++) out[h * D + j] = o[h * D + j] / totals[h];
}

// attend_heads_as with `stream` a constant in each copy: the loops of the rows that find the
// caches in cache carry no prefetch and no test for one (5-8% of their time)
static void attend_heads(const float *q, int n, const void *keys, const void *values, size_t at, int f16, int L, int D,
                         int stream, float *p, float *o, float *out) {
    if (stream)
        attend_heads_as(q, n, keys, values, at, f16, L, D, 1, p, o, out);
    else
        attend_heads_as(q, n, keys, values, at, f16, L, D, 0, p, o, out);
}

// Causal attention for T rows at positions pos..pos+T-1 (a prompt's chunk, or a decoded token):
// RoPE on q and k (unless cos is NULL: a NoPE layer), the rows' keys and values written into the
// caches, then each row t's query heads over positions 0..pos+t into out [T, H * D]. Row t of
// q, k and v starts at + t * stride (the fused qkv projection's columns); q and k are rotated in
// place. Query heads h share key/value head h / (H / KV) (GQA). Returns 0, or -2 out of memory.
int attend_f32(float *q, float *k, const float *v, long stride, void *k_cache, void *v_cache, int f16, int capacity,
               int pos, int T, int H, int KV, int D, const float *cos, const float *signed_sin, float *out, int threads) {
    if (cos) {
        rope_f32(q, stride, T, H, D, cos, signed_sin);
        rope_f32(k, stride, T, KV, D, cos, signed_sin);
    }
    for (int t = 0; t < T; t++)
        for (int h = 0; h < KV; h++) {
            size_t at = ((size_t)h * capacity + pos + t) * D;
            write_cached(k_cache, at, k + t * stride + h * D, D, f16);
            write_cached(v_cache, at, v + t * stride + h * D, D, f16);
        }
    int L = pos + T, group = H / KV;
    // Threads only where the work outweighs waking them (a prompt, a long context).
    if ((size_t)T * H * L * D < (1 << 16)) threads = 1;
    // A task is a row's heads of one key/value head, its keys and values converted once for them
    // all: even where those tasks are too few to share evenly between threads (a decoded token on
    // SmolLM2: 3 key/value heads, 2 threads), that beats one head a task (25 against 28 us a layer).
    int heads = group, tasks = T * H / heads;
    float *scratch = malloc((size_t)threads * heads * (L + D) * sizeof(float));
    if (!scratch) return -2;
#pragma omp parallel num_threads(threads)
    {
        float *p = scratch + (size_t)omp_get_thread_num() * heads * (L + D), *o = p + (size_t)heads * L;
        // Longest rows first (causal: the rows' lengths differ).
#pragma omp for schedule(dynamic, 1)
        for (int i = tasks - 1; i >= 0; i--) {
            int task = T > 1 ? i : tasks - 1 - i, t = task / KV, h = task % KV * heads;
            attend_heads(q + t * stride + h * D, heads, k_cache, v_cache, (size_t)(h / group) * capacity * D, f16,
                         pos + t + 1, D, t == T - 1, p, o, out + ((size_t)t * H + h) * D);
        }
    }
    free(scratch);
    return 0;
}

#ifdef USE_F16C
// g / (1 + e^-g) * up, 8 at a time (e^-g past 88 would overflow: there g / (1 + e^88) is 0 to
// within 1e-36 all the same)
static inline __m256 silu_mul8(__m256 g, __m256 up) {
    __m256 e = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(88.f)));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)), up);
}
#endif

// SwiGLU's silu(gate) * up for rows of [gate | up] (the fused gate/up projection's output), for
// every row count: each row's bits are the same alone or in a prompt, which torch's silu does not
// promise, threaded over rows where a prompt's rows outweigh waking threads. With AVX2 every
// value goes through silu_mul8 (a row's last F % 8 too), whose exp takes a fraction of expf's
// time: a layer's silu for a decoded token, SmolLM2 (F = 1536) 3.5 -> 0.7 us, SmolLM3-3B (11008)
// 24 -> 4 us. Within 5 float32 ulps of silu (torch's: 2).
void silu_mul_f32(const float *gate_up, float *out, int M, int F, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if ((size_t)M * F > (1 << 16))
    for (int m = 0; m < M; m++) {
        const float *g = gate_up + (size_t)m * 2 * F;
        float *o = out + (size_t)m * F;
        int j = 0;
#ifdef USE_F16C
        for (; j + 7 < F; j += 8) _mm256_storeu_ps(o + j, silu_mul8(_mm256_loadu_ps(g + j), _mm256_loadu_ps(g + F + j)));
        if (j < F) {
            float gate[8] = {0}, up[8] = {0}, tail[8];
            memcpy(gate, g + j, (F - j) * sizeof(float));
            memcpy(up, g + F + j, (F - j) * sizeof(float));
            _mm256_storeu_ps(tail, silu_mul8(_mm256_loadu_ps(gate), _mm256_loadu_ps(up)));
            memcpy(o + j, tail, (F - j) * sizeof(float));
            j = F;
        }
#endif
        for (; j < F; j++) o[j] = g[j] / (1 + expf(-g[j])) * g[F + j];
    }
}

// --- tokens through every layer ---

// A linear map of one input as up to 3 segments of different types (a Q4_K_M file's Q6_K attn_v
// beside Q4_K q and k), outputs side by side.
typedef struct {
    int type, parts, rows;
    const uint8_t *const *w;
    const int *part_rows;
    const long *part_stride;
} segment;

typedef struct {
    int segments;
    segment seg[3];
} linear_map;

typedef struct {
    const float *attn_norm, *ffn_norm;
    linear_map qkv, o, gate_up, down;
    int rope;
} decoder_layer;

// y [T, sum of the segments' rows] = x [T, K] through the map, segment by segment.
static int apply_linear(const linear_map *map, const float *x, float *y, int T, int K, int threads) {
    size_t y_row = 0;
    for (int s = 0; s < map->segments; s++) y_row += map->seg[s].rows;
    for (int s = 0; s < map->segments; s++) {
        const segment *g = &map->seg[s];
        int status = matmul_rows(g->type, g->parts, g->w, g->part_rows, g->part_stride, x, y, y_row, T, K, threads);
        if (status) return status;
        y += g->rows;
    }
    return 0;
}

// The hidden states x [T, C] of T tokens at positions pos..pos+T-1 (a decoded token, a
// speculative draft's rows, a prompt's chunk) through n layers, their keys and values written
// into each layer's caches: the kernels the model's modules call one by one (native_layers.py),
// in their order, so the result is bitwise theirs, without a dozen Python and ctypes calls a
// layer (on a 135M model ~5 ms of a decoded token's 12). Returns 0, or a kernel's error.
int forward_layers(const decoder_layer *layers, int n, void *const *k_caches, void *const *v_caches, int f16, int capacity,
                   float *x, int T, int pos, int C, int H, int KV, int D, int F, float eps, const float *cos,
                   const float *signed_sin, int threads) {
    // per row: the norm's output and a projection's, then the attention's or the MLP's temporaries
    size_t width = (size_t)(H + 2 * KV) * D, attention = width + (size_t)H * D, mlp = 3 * (size_t)F;
    int status = 0;
    float *h = malloc(sizeof(float) * (2 * (size_t)C + (attention > mlp ? attention : mlp)) * T);
    if (!h) return -2;
    float *out = h + (size_t)T * C, *qkv = out + (size_t)T * C, *att = qkv + T * width, *gate_up = qkv,
          *act = gate_up + (size_t)T * 2 * F;
    size_t all = (size_t)T * C;
    for (int i = 0; i < n && !status; i++) {
        const decoder_layer *l = &layers[i];
        rms_norm_f32(x, l->attn_norm, h, T, C, eps);
        if ((status = apply_linear(&l->qkv, h, qkv, T, C, threads))) break;
        status = attend_f32(qkv, qkv + H * D, qkv + (H + KV) * D, (long)width, k_caches[i], v_caches[i], f16, capacity,
                            pos, T, H, KV, D, l->rope ? cos : NULL, signed_sin, att, threads);
        if (status || (status = apply_linear(&l->o, att, out, T, H * D, threads))) break;
        for (size_t j = 0; j < all; j++) x[j] += out[j];
        rms_norm_f32(x, l->ffn_norm, h, T, C, eps);
        if ((status = apply_linear(&l->gate_up, h, gate_up, T, C, threads))) break;
        silu_mul_f32(gate_up, act, T, F, threads);
        if ((status = apply_linear(&l->down, act, out, T, F, threads))) break;
        for (size_t j = 0; j < all; j++) x[j] += out[j];
    }
    free(h);
    return status;
}
