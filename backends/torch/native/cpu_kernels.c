// The torch backend's CPU kernels: the matmul on GGUF blocks (first), then RMSNorm, a decoded
// token's attention and SwiGLU's silu(gate) * up, each one call where torch takes several ops.
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
// takes the same activation blocks (an int8 GEMM), so a prompt's answer does not depend on how
// it is split into forward passes, and no path is less exact than llama.cpp's.
//
// Built at first use by backends/torch/native.py with -O3 -march=native -fopenmp; loaded
// after torch, so OpenMP here is torch's own runtime and thread pool.

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#if defined(__AVX2__) && defined(__FMA__) && !defined(SMOLLM3_SCALAR)
#define USE_AVX2 1
#include <immintrin.h>
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

// --- activations ---

// 32 values: scale d, sum s = d * sum(q) (for Q4_0's and Q4_1's offsets), codes.
typedef struct { float d, s; int8_t q[32]; } x_block32;
// 256 values (K-quants): scale d, sums of each 16 and each 32 codes (for the offsets), codes.
typedef struct { float d; int16_t sums[16], sums32[8]; int8_t q[256]; } x_block256;

static inline int8_t round_code(float v) { return (int8_t)(v >= 0 ? (int)(v + 0.5f) : -(int)(-v + 0.5f)); }

static void quantize_block(const float *x, int n, int8_t *q, float *d_out) {
    float amax = 0;
    for (int j = 0; j < n; j++) amax = fmaxf(amax, fabsf(x[j]));
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

// --- dot products of one weight row with one quantized activation row ---

#ifdef USE_AVX2
static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// unsigned bytes times signed bytes, summed in fours into 8 int32
static inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
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

// The 32-value formats: each block is a short dependent chain (dot, convert, multiply-add), so
// four blocks go in flight at once on separate accumulators (measured 1.6x on one core).
#ifdef USE_AVX2
static inline __m256 q8_0_block(const uint8_t *w, const x_block32 *x, __m256 acc) {
    __m256i q = _mm256_loadu_si256((const __m256i *)(w + 2));
    __m256i xq = _mm256_loadu_si256((const __m256i *)x->q);
    // |q| as unsigned times x with q's sign: a signed product on an unsigned-signed op
    __m256i p = dot_u8_s8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xq, q));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(f16_to_f32(read_u16(w)) * x->d), acc);
}

// Q4_0, Q4_1: [d dx, m sx] (Q4_1) or [d dx, d sx] (Q4_0) from one f16 conversion and one
// multiply: the codes' scale in lane 0, the block's offset term (before Q4_0's -8) in lane 1.
static inline __m128 q4_scales(const uint8_t *w, const x_block32 *x, int with_min) {
    uint32_t bits;
    if (with_min) memcpy(&bits, w, 4);
    else bits = read_u16(w) * 0x10001u;
    __m128 xs = _mm_castpd_ps(_mm_load_sd((const double *)&x->d));  // [dx, sx]: adjacent fields
    return _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128((int)bits)), xs);
}

static inline __m256 q4_block(const uint8_t *codes, __m128 scales, const x_block32 *x, __m256 acc) {
    __m256i p = dot_u8_s8(nibbles_32(codes), _mm256_loadu_si256((const __m256i *)x->q));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcastss_ps(scales), acc);
}
#endif

static float dot_q8_0(const uint8_t *w, const void *xv, int K) {
    const x_block32 *x = xv;
    int nb = K / 32, b = 0;
#ifdef USE_AVX2
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; b + 3 < nb; b += 4, w += 4 * 34)
        for (int u = 0; u < 4; u++) acc[u] = q8_0_block(w + 34 * u, x + b + u, acc[u]);
    for (; b < nb; b++, w += 34) acc[0] = q8_0_block(w, x + b, acc[0]);
    return hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#else
    float acc = 0;
    for (; b < nb; b++, w += 34) {
        const int8_t *q = (const int8_t *)(w + 2);
        int sum = 0;
        for (int j = 0; j < 32; j++) sum += q[j] * x[b].q[j];
        acc += f16_to_f32(read_u16(w)) * x[b].d * sum;
    }
    return acc;
#endif
}

// Q4_0: w = d (q - 8); Q4_1: w = d q + m. Both: sum_j w_j x_j = d dx sum(q xq) + c sx.
static inline float dot_q4_01(const uint8_t *w, const void *xv, int K, int with_min) {
    const x_block32 *x = xv;
    int nb = K / 32, size = with_min ? 20 : 18, codes = with_min ? 4 : 2, b = 0;
#ifdef USE_AVX2
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    __m128 offsets = _mm_setzero_ps();
    for (; b + 3 < nb; b += 4) {
        for (int u = 0; u < 4; u++, w += size) {
            __m128 scales = q4_scales(w, x + b + u, with_min);
            offsets = _mm_add_ps(offsets, scales);
            acc[u] = q4_block(w + codes, scales, x + b + u, acc[u]);
        }
    }
    for (; b < nb; b++, w += size) {
        __m128 scales = q4_scales(w, x + b, with_min);
        offsets = _mm_add_ps(offsets, scales);
        acc[0] = q4_block(w + codes, scales, x + b, acc[0]);
    }
    float offset = _mm_cvtss_f32(_mm_shuffle_ps(offsets, offsets, 1)) * (with_min ? 1 : -8);
    return hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))) + offset;
#else
    float sum = 0, offset = 0;
    for (; b < nb; b++, w += size) {
        float d = f16_to_f32(read_u16(w));
        offset += (with_min ? f16_to_f32(read_u16(w + 2)) : -8 * d) * x[b].s;
        int dot = 0;
        for (int j = 0; j < 16; j++) dot += (w[codes + j] & 15) * x[b].q[j] + (w[codes + j] >> 4) * x[b].q[j + 16];
        sum += d * x[b].d * dot;
    }
    return sum + offset;
#endif
}

static float dot_q4_0(const uint8_t *w, const void *x, int K) { return dot_q4_01(w, x, K, 0); }
static float dot_q4_1(const uint8_t *w, const void *x, int K) { return dot_q4_01(w, x, K, 1); }

// Q4_K: 8 groups of 32 with 6-bit scales and mins: w = d sc q - dmin m. The 12 scale bytes as
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

static float dot_q4_k(const uint8_t *w, const void *xv, int K) {
    const x_block256 *x = xv;
    int nb = K / 256;
#ifdef USE_AVX2
    __m256 acc = _mm256_setzero_ps();
    __m128 acc_min = _mm_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    for (int b = 0; b < nb; b++, w += 144) {
        float d = f16_to_f32(read_u16(w)) * x[b].d, dmin = f16_to_f32(read_u16(w + 2)) * x[b].d;
        uint32_t sc[2], mn[2];
        q4_k_scales(w + 4, sc, mn);
        __m128i mins = _mm_madd_epi16(_mm_cvtepu8_epi16(_mm_set_epi32(0, 0, mn[1], mn[0])), _mm_loadu_si128((const __m128i *)x[b].sums32));
        acc_min = _mm_fmadd_ps(_mm_cvtepi32_ps(mins), _mm_set1_ps(dmin), acc_min);
        // the 8 scales as int16 in both lanes; shuffles broadcast one to a whole register
        __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_set_epi32(0, 0, sc[1], sc[0])));
        const uint8_t *qs = w + 16;
        const int8_t *xq = x[b].q;
        __m256i sum = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++, qs += 32, xq += 64) {
            __m256i q = _mm256_loadu_si256((const __m256i *)qs);
            __m256i lo = _mm256_and_si256(q, low4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
            // codes <= 15, |x| <= 127: the int16 pair sums cannot saturate; scales fold in via madd
            __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xq));
            __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + 32)));
            __m256i slo = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short)((4 * j + 1) << 8 | 4 * j)));
            __m256i shi = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short)((4 * j + 3) << 8 | (4 * j + 2))));
            sum = _mm256_add_epi32(sum, _mm256_add_epi32(_mm256_madd_epi16(plo, slo), _mm256_madd_epi16(phi, shi)));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(d), acc);
    }
    __m128 m = _mm_add_ps(acc_min, _mm_movehl_ps(acc_min, acc_min));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    return hsum_ps(acc) - _mm_cvtss_f32(m);
#else
    float acc = 0;
    for (int b = 0; b < nb; b++, w += 144) {
        float d = f16_to_f32(read_u16(w)) * x[b].d, dmin = f16_to_f32(read_u16(w + 2)) * x[b].d;
        uint32_t scw[2], mnw[2];
        q4_k_scales(w + 4, scw, mnw);
        const uint8_t *sc = (const uint8_t *)scw, *mn = (const uint8_t *)mnw;
        const uint8_t *qs = w + 16;
        const int8_t *xq = x[b].q;
        int sum = 0, mins = 0;
        for (int j = 0; j < 8; j++) mins += mn[j] * x[b].sums32[j];
        for (int j = 0; j < 4; j++, qs += 32, xq += 64) {
            int lo = 0, hi = 0;
            for (int l = 0; l < 32; l++) {
                lo += (qs[l] & 15) * xq[l];
                hi += (qs[l] >> 4) * xq[l + 32];
            }
            sum += sc[2 * j] * lo + sc[2 * j + 1] * hi;
        }
        acc += d * sum - dmin * mins;
    }
    return acc;
#endif
}

// Q6_K: 16 groups of 16 with int8 scales: w = d sc (q - 32), q = 4 low bits (ql) | 2 high (qh).
// Per half of 128: codes l, l+32, l+64, l+96 take ql[l] low, ql[l+32] low, ql[l] high,
// ql[l+32] high nibbles and bits 0-1, 2-3, 4-5, 6-7 of qh[l] (ggml's dequantize_row_q6_K).
static float dot_q6_k(const uint8_t *w, const void *xv, int K) {
    const x_block256 *x = xv;
    int nb = K / 256;
#ifdef USE_AVX2
    __m256 acc = _mm256_setzero_ps(), acc_shift = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0f), low2 = _mm256_set1_epi8(0x03);
#else
    float acc = 0;
#endif
    for (int b = 0; b < nb; b++, w += 210) {
        const uint8_t *ql = w, *qh = w + 128;
        const int8_t *sc = (const int8_t *)(w + 192);
        float d = f16_to_f32(read_u16(w + 208)) * x[b].d;
        const int8_t *xq = x[b].q;
#ifdef USE_AVX2
        __m256i scales = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc));
        __m256i shift = _mm256_madd_epi16(scales, _mm256_loadu_si256((const __m256i *)x[b].sums));
        acc_shift = _mm256_fmadd_ps(_mm256_cvtepi32_ps(shift), _mm256_set1_ps(32 * d), acc_shift);
        __m256i sum = _mm256_setzero_si256();
        for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8, xq += 128) {
            __m256i half_scales = _mm256_broadcastsi128_si256(half ? _mm256_extracti128_si256(scales, 1) : _mm256_castsi256_si128(scales));
            __m256i h = _mm256_loadu_si256((const __m256i *)qh);
            __m256i l0 = _mm256_loadu_si256((const __m256i *)ql), l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            __m256i q[4] = {
                _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_slli_epi16(_mm256_and_si256(h, low2), 4)),
                _mm256_or_si256(_mm256_and_si256(l1, low4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), low2), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), low2), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), low2), 4)),
            };
            for (int k = 0; k < 4; k++) {
                // codes <= 63, |x| <= 127: no int16 saturation; each 16 codes take their own scale
                __m256i p = _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i *)(xq + 32 * k)));
                // scale 2k for the low 16 codes, 2k + 1 for the high: int16 lanes of this half's 8
                __m256i s = _mm256_shuffle_epi8(half_scales, _mm256_set_m128i(_mm_set1_epi16((short)((4 * k + 3) << 8 | (4 * k + 2))),
                                                                             _mm_set1_epi16((short)((4 * k + 1) << 8 | 4 * k))));
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, s));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(d), acc);
#else
        int sum = 0, shift = 0;
        for (int g = 0; g < 16; g++) shift += sc[g] * x[b].sums[g];
        for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8, xq += 128) {
            for (int l = 0; l < 32; l++) {
                int g = l / 16;
                sum += sc[g] * ((ql[l] & 15) | ((qh[l] & 3) << 4)) * xq[l];
                sum += sc[g + 2] * ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) * xq[l + 32];
                sum += sc[g + 4] * ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) * xq[l + 64];
                sum += sc[g + 6] * ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) * xq[l + 96];
            }
        }
        acc += d * (sum - 32 * shift);
#endif
    }
#ifdef USE_AVX2
    return hsum_ps(acc) - hsum_ps(acc_shift);
#else
    return acc;
#endif
}

// --- weights unpacked to one form: prefill (several input rows per weight row) and the other types ---
//
// Every type's block becomes 8-bit codes q, one integer scale per 16 codes, a float d per block
// and a float offset per offset group (16 codes for the 256-value blocks, 32 for the others):
// w_j = d * sc * q_j + off. Against int8 activations xq (scale dx per activation block, which is
// as long as the weight block) a block's sum is d * dx * sum_g sc_g * sum_{j in g} q_j xq_j plus
// the offsets times the activations' sums: integers first, one float multiply per block.
// The codes are unsigned (0..63) except for the types whose codes are signed values (Q8_0 and
// the IQ4 tables), which take the sign trick the Q8_0 dot uses.

typedef struct {
    uint8_t *q;   // K codes
    int16_t *sc;  // per 32 codes, 16 int16: the low 16 codes' scale 8 times, then the high 16's
    float *d;     // per weight block
    float *off;   // per offset group; unused where the type has no offset
} unpacked_row;

static inline void set_scales(int16_t *sc, int lo, int hi) {
#ifdef USE_AVX2
    _mm256_storeu_si256((__m256i *)sc, _mm256_set_m128i(_mm_set1_epi16((short)hi), _mm_set1_epi16((short)lo)));
#else
    for (int i = 0; i < 8; i++) sc[i] = (int16_t)lo, sc[i + 8] = (int16_t)hi;
#endif
}

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

static void unpack_q8_0(const uint8_t *w, int K, unpacked_row *u) {
    for (int b = 0; b < K / 32; b++, w += 34) {
        u->d[b] = f16_to_f32(read_u16(w));
        memcpy(u->q + 32 * b, w + 2, 32);
        set_scales(u->sc + 16 * b, 1, 1);
    }
}

// Q4_0, Q4_1, Q5_0, Q5_1: 32 codes, low nibbles first; Q5_x's bit 4 of code j is bit j of qh.
static inline void unpack_q4_q5(const uint8_t *w, int K, unpacked_row *u, int with_min, int with_high) {
    int qh_at = with_min ? 4 : 2, qs_at = qh_at + (with_high ? 4 : 0), size = qs_at + 16;
    float zero = with_high ? 16 : 8;
    for (int b = 0; b < K / 32; b++, w += size) {
        float d = f16_to_f32(read_u16(w));
        uint32_t qh = 0;
        if (with_high) memcpy(&qh, w + qh_at, 4);
        uint8_t *q = u->q + 32 * b;
#ifdef USE_AVX2
        __m256i codes = nibbles_32(w + qs_at);
        if (with_high) codes = _mm256_or_si256(codes, bits_as_0x10(qh));
        _mm256_storeu_si256((__m256i *)q, codes);
#else
        for (int j = 0; j < 16; j++) {
            q[j] = (uint8_t)((w[qs_at + j] & 15) | ((qh >> j) & 1) << 4);
            q[j + 16] = (uint8_t)((w[qs_at + j] >> 4) | ((qh >> (j + 16)) & 1) << 4);
        }
#endif
        u->d[b] = d;
        u->off[b] = with_min ? f16_to_f32(read_u16(w + 2)) : -zero * d;
        set_scales(u->sc + 16 * b, 1, 1);
    }
}

static void unpack_q4_0(const uint8_t *w, int K, unpacked_row *u) { unpack_q4_q5(w, K, u, 0, 0); }
static void unpack_q4_1(const uint8_t *w, int K, unpacked_row *u) { unpack_q4_q5(w, K, u, 1, 0); }
static void unpack_q5_0(const uint8_t *w, int K, unpacked_row *u) { unpack_q4_q5(w, K, u, 0, 1); }
static void unpack_q5_1(const uint8_t *w, int K, unpacked_row *u) { unpack_q4_q5(w, K, u, 1, 1); }

// IQ4_NL's and IQ4_XS's 16 non-uniform levels (ggml's kvalues_iq4nl).
static const int8_t IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

static inline void iq4_codes(const uint8_t *qs, uint8_t *q) {
#ifdef USE_AVX2
    __m256i levels = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_LEVELS));
    _mm256_storeu_si256((__m256i *)q, _mm256_shuffle_epi8(levels, nibbles_32(qs)));
#else
    for (int j = 0; j < 16; j++) {
        q[j] = (uint8_t)IQ4_LEVELS[qs[j] & 15];
        q[j + 16] = (uint8_t)IQ4_LEVELS[qs[j] >> 4];
    }
#endif
}

static void unpack_iq4_nl(const uint8_t *w, int K, unpacked_row *u) {  // d, qs[16]: w = d * level
    for (int b = 0; b < K / 32; b++, w += 18) {
        u->d[b] = f16_to_f32(read_u16(w));
        iq4_codes(w + 2, u->q + 32 * b);
        set_scales(u->sc + 16 * b, 1, 1);
    }
}

// IQ4_XS: d, scales_h (u16), scales_l[4], qs[128]: 8 sub-blocks of 32 with 6-bit scales minus 32
// (low 4 bits from scales_l's nibbles, top 2 from scales_h), w = d * (ls - 32) * level.
static void unpack_iq4_xs(const uint8_t *w, int K, unpacked_row *u) {
    for (int b = 0; b < K / 256; b++, w += 136) {
        u->d[b] = f16_to_f32(read_u16(w));
        int high = read_u16(w + 2);
        for (int s = 0; s < 8; s++) {
            int ls = ((w[4 + s / 2] >> 4 * (s % 2)) & 15) | ((high >> 2 * s) & 3) << 4;
            iq4_codes(w + 8 + 16 * s, u->q + 256 * b + 32 * s);
            set_scales(u->sc + 16 * (8 * b + s), ls - 32, ls - 32);
        }
    }
}

#ifdef USE_AVX2
// Each byte's bit `bit` moved to bit 4 (other bits are left to a mask): 16-bit shifts of at
// most 4 keep each byte's bits inside it where it matters.
static inline __m256i bit_to_4(__m256i v, int bit) {
    return bit <= 4 ? _mm256_sll_epi16(v, _mm_cvtsi32_si128(4 - bit)) : _mm256_srl_epi16(v, _mm_cvtsi32_si128(bit - 4));
}
#endif

// Q4_K, Q5_K: 8 sub-blocks of 32, w = d sc q - dmin m; Q5_K's bit 4 of sub-block s's code l is
// bit s of qh[l].
static inline void unpack_q4_q5_k(const uint8_t *w, int K, unpacked_row *u, int with_high) {
    int size = with_high ? 176 : 144, qs_at = with_high ? 48 : 16;
    for (int b = 0; b < K / 256; b++, w += size) {
        float d = f16_to_f32(read_u16(w)), dmin = f16_to_f32(read_u16(w + 2));
        uint32_t scw[2], mnw[2];
        q4_k_scales(w + 4, scw, mnw);
        const uint8_t *sc = (const uint8_t *)scw, *mn = (const uint8_t *)mnw, *qs = w + qs_at, *qh = w + 16;
        uint8_t *q = u->q + 256 * b;
        for (int j = 0; j < 4; j++, qs += 32, q += 64) {
#ifdef USE_AVX2
            const __m256i low4 = _mm256_set1_epi8(15), bit4 = _mm256_set1_epi8(16);
            __m256i codes = _mm256_loadu_si256((const __m256i *)qs);
            __m256i lo = _mm256_and_si256(codes, low4), hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low4);
            if (with_high) {  // bit 2j of qh[l] to bit 4 of the low code, bit 2j + 1 to the high's
                __m256i h = _mm256_loadu_si256((const __m256i *)qh);
                lo = _mm256_or_si256(lo, _mm256_and_si256(bit_to_4(h, 2 * j), bit4));
                hi = _mm256_or_si256(hi, _mm256_and_si256(bit_to_4(h, 2 * j + 1), bit4));
            }
            _mm256_storeu_si256((__m256i *)q, lo);
            _mm256_storeu_si256((__m256i *)(q + 32), hi);
#else
            for (int l = 0; l < 32; l++) {
                int h = with_high ? qh[l] >> 2 * j : 0;
                q[l] = (uint8_t)((qs[l] & 15) | (h & 1) << 4);
                q[l + 32] = (uint8_t)((qs[l] >> 4) | (h & 2) << 3);
            }
#endif
        }
        u->d[b] = d;
        for (int s = 0; s < 8; s++) {
            set_scales(u->sc + 16 * (8 * b + s), sc[s], sc[s]);
            u->off[16 * b + 2 * s] = u->off[16 * b + 2 * s + 1] = -dmin * mn[s];
        }
    }
}

static void unpack_q4_k(const uint8_t *w, int K, unpacked_row *u) { unpack_q4_q5_k(w, K, u, 0); }
static void unpack_q5_k(const uint8_t *w, int K, unpacked_row *u) { unpack_q4_q5_k(w, K, u, 1); }

static void unpack_q6_k(const uint8_t *w, int K, unpacked_row *u) {  // layout: see dot_q6_k
    for (int b = 0; b < K / 256; b++, w += 210) {
        const uint8_t *ql = w, *qh = w + 128;
        const int8_t *sc = (const int8_t *)(w + 192);
        float d = f16_to_f32(read_u16(w + 208));
        uint8_t *q = u->q + 256 * b;
        for (int half = 0; half < 2; half++, ql += 64, qh += 32, q += 128) {
            for (int l = 0; l < 32; l++) {
                q[l] = (uint8_t)((ql[l] & 15) | (qh[l] & 3) << 4);
                q[l + 32] = (uint8_t)((ql[l + 32] & 15) | ((qh[l] >> 2) & 3) << 4);
                q[l + 64] = (uint8_t)((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4);
                q[l + 96] = (uint8_t)((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4);
            }
        }
        u->d[b] = d;
        for (int g = 0; g < 16; g++) u->off[16 * b + g] = -32 * d * sc[g];
        for (int c = 0; c < 8; c++) set_scales(u->sc + 16 * (8 * b + c), sc[2 * c], sc[2 * c + 1]);
    }
}

// Q3_K: hmask[32], qs[64], scales[12], d: 16 groups of 16 with 6-bit scales minus 32; code
// 32 j + l of each half n (128 values) is 2 bits of qs[32 n + l] at shift 2 j, and 4 when bit
// 4 n + j of hmask[l] is set, minus 4 (ggml's dequantize_row_q3_K).
static void unpack_q3_k(const uint8_t *w, int K, unpacked_row *u) {
    for (int b = 0; b < K / 256; b++, w += 110) {
        const uint8_t *hm = w, *qs = w + 32, *s = w + 96;
        float d = f16_to_f32(read_u16(w + 108));
        int sc[16];
        for (int g = 0; g < 16; g++) {  // low 4 bits: nibbles of bytes 0-7; top 2: pairs of bits of bytes 8-11
            int low = (s[g % 8] >> 4 * (g / 8)) & 15, top = (s[8 + g % 4] >> 2 * (g / 4)) & 3;
            sc[g] = (low | top << 4) - 32;
        }
        uint8_t *q = u->q + 256 * b;
        for (int n = 0; n < 2; n++)
            for (int j = 0; j < 4; j++) {
#ifdef USE_AVX2
                __m256i low = _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(qs + 32 * n)), _mm_cvtsi32_si128(2 * j));
                __m256i high = _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)hm), _mm_cvtsi32_si128(4 * n + j));
                low = _mm256_and_si256(low, _mm256_set1_epi8(3));
                high = _mm256_slli_epi16(_mm256_and_si256(high, _mm256_set1_epi8(1)), 2);
                _mm256_storeu_si256((__m256i *)(q + 128 * n + 32 * j), _mm256_or_si256(low, high));
#else
                for (int l = 0; l < 32; l++)
                    q[128 * n + 32 * j + l] = (uint8_t)(((qs[32 * n + l] >> 2 * j) & 3) | ((hm[l] >> (4 * n + j)) & 1) << 2);
#endif
            }
        u->d[b] = d;
        for (int g = 0; g < 16; g++) u->off[16 * b + g] = -4 * d * sc[g];
        for (int c = 0; c < 8; c++) set_scales(u->sc + 16 * (8 * b + c), sc[2 * c], sc[2 * c + 1]);
    }
}

// Q2_K: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin: 16 groups of 16,
// w = d sc q - dmin m; codes laid out as Q3_K's low bits.
static void unpack_q2_k(const uint8_t *w, int K, unpacked_row *u) {
    for (int b = 0; b < K / 256; b++, w += 84) {
        const uint8_t *s = w, *qs = w + 16;
        float d = f16_to_f32(read_u16(w + 80)), dmin = f16_to_f32(read_u16(w + 82));
        uint8_t *q = u->q + 256 * b;
        for (int n = 0; n < 2; n++)
            for (int j = 0; j < 4; j++) {
#ifdef USE_AVX2
                __m256i codes = _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(qs + 32 * n)), _mm_cvtsi32_si128(2 * j));
                _mm256_storeu_si256((__m256i *)(q + 128 * n + 32 * j), _mm256_and_si256(codes, _mm256_set1_epi8(3)));
#else
                for (int l = 0; l < 32; l++) q[128 * n + 32 * j + l] = (uint8_t)((qs[32 * n + l] >> 2 * j) & 3);
#endif
            }
        u->d[b] = d;
        for (int g = 0; g < 16; g++) u->off[16 * b + g] = -dmin * (s[g] >> 4);
        for (int c = 0; c < 8; c++) set_scales(u->sc + 16 * (8 * b + c), s[2 * c] & 15, s[2 * c + 1] & 15);
    }
}

// --- the matmul ---

typedef float (*dot_fn)(const uint8_t *, const void *, int);
typedef void (*unpack_fn)(const uint8_t *, int, unpacked_row *);

typedef struct {
    int type, block, block_bytes, x_block, x_block_bytes;
    unpack_fn unpack;
    int signed_codes, has_offset;
    dot_fn dot;  // one row against one input row, straight off the blocks (decode); or NULL
} format;

static const format FORMATS[] = {
    {GGML_Q4_0, 32, 18, 32, sizeof(x_block32), unpack_q4_0, 0, 1, dot_q4_0},
    {GGML_Q4_1, 32, 20, 32, sizeof(x_block32), unpack_q4_1, 0, 1, dot_q4_1},
    {GGML_Q5_0, 32, 22, 32, sizeof(x_block32), unpack_q5_0, 0, 1, NULL},
    {GGML_Q5_1, 32, 24, 32, sizeof(x_block32), unpack_q5_1, 0, 1, NULL},
    {GGML_Q8_0, 32, 34, 32, sizeof(x_block32), unpack_q8_0, 1, 0, dot_q8_0},
    {GGML_IQ4_NL, 32, 18, 32, sizeof(x_block32), unpack_iq4_nl, 1, 0, NULL},
    {GGML_Q2_K, 256, 84, 256, sizeof(x_block256), unpack_q2_k, 0, 1, NULL},
    {GGML_Q3_K, 256, 110, 256, sizeof(x_block256), unpack_q3_k, 0, 1, NULL},
    {GGML_Q4_K, 256, 144, 256, sizeof(x_block256), unpack_q4_k, 0, 1, dot_q4_k},
    {GGML_Q5_K, 256, 176, 256, sizeof(x_block256), unpack_q5_k, 0, 1, NULL},
    {GGML_Q6_K, 256, 210, 256, sizeof(x_block256), unpack_q6_k, 0, 1, dot_q6_k},
    {GGML_IQ4_XS, 256, 136, 256, sizeof(x_block256), unpack_iq4_xs, 1, 0, NULL},
};

// Values per offset: the 256-value blocks' offsets are per 16 codes (sums[g] of the activations'
// block), the 32-value blocks' per block (s).
static inline int offset_group(const format *f) { return f->block == 256 ? 16 : 32; }

// Where an activation row's float sums (dx times the codes' sum, one per offset group) start:
// after its blocks, so that the offsets are one float dot product per weight row and input row.
static inline size_t x_sums_at(const format *f, int K) { return (size_t)(K / f->x_block) * f->x_block_bytes; }

static float dot_f32(const float *a, const float *b, int n) {
    // 8 partial sums: a float reduction the compiler vectorizes (a single sum keeps its order)
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0}, sum = 0;
    int j = 0;
    for (; j + 7 < n; j += 8)
        for (int u = 0; u < 8; u++) part[u] += a[j + u] * b[j + u];
    for (; j < n; j++) sum += a[j] * b[j];
    return sum + ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Input rows per dot_unpacked call: 4 sums and 4 accumulators in registers.
#define DOT_ROWS 4

// R activation rows (quantized, x_row bytes apart) against one unpacked weight row: y[r * y_step].
// Each block's codes and scales are loaded once for all R rows (register blocking); R is a
// constant at each call, so the loops over r unroll and the sums stay in registers.
static inline __attribute__((always_inline)) void dot_unpacked(const format *f, const unpacked_row *u, int K,
                                                              const uint8_t *x, size_t x_row, float *y, size_t y_step,
                                                              const int R, const int wide, const int signed_codes) {
    int nb = K / f->block, block = wide ? 256 : 32;
    size_t codes_at = wide ? offsetof(x_block256, q) : offsetof(x_block32, q);
#ifdef USE_AVX2
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
#else
    float acc[R];
    for (int r = 0; r < R; r++) acc[r] = 0;
#endif
    for (int b = 0; b < nb; b++) {
        const uint8_t *xb = x + (size_t)b * f->x_block_bytes;
        const uint8_t *q = u->q + (size_t)b * block;
        const int16_t *sc = u->sc + (size_t)b * block / 2;
#ifdef USE_AVX2
        __m256i sum[R];
        for (int r = 0; r < R; r++) sum[r] = _mm256_setzero_si256();
        for (int c = 0; c < block / 32; c++) {
            __m256i codes = _mm256_loadu_si256((const __m256i *)(q + 32 * c));
            __m256i scales = _mm256_loadu_si256((const __m256i *)(sc + 16 * c));
            __m256i magnitudes = signed_codes ? _mm256_sign_epi8(codes, codes) : codes;
            for (int r = 0; r < R; r++) {
                __m256i xq = _mm256_loadu_si256((const __m256i *)(xb + r * x_row + codes_at + 32 * c));
                if (signed_codes) xq = _mm256_sign_epi8(xq, codes);
                // codes <= 63 (or |code| <= 128 with the sign moved to x) and |x| <= 127: the
                // int16 pair sums cannot saturate
                __m256i p = _mm256_maddubs_epi16(magnitudes, xq);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
                sum[r] = _mm256_dpwssd_epi32(sum[r], p, scales);
#else
                sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(p, scales));
#endif
            }
        }
        for (int r = 0; r < R; r++) {
            float dx = *(const float *)(xb + r * x_row);  // d is the first field of both activation blocks
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_set1_ps(u->d[b] * dx), acc[r]);
        }
#else
        for (int r = 0; r < R; r++) {
            const int8_t *xq = (const int8_t *)(xb + r * x_row + codes_at);
            int sum = 0;
            for (int j = 0; j < block; j++) {
                int code = signed_codes ? (int8_t)q[j] : q[j];
                sum += sc[j / 32 * 16 + (j % 32 >= 16 ? 8 : 0)] * code * xq[j];
            }
            acc[r] += u->d[b] * *(const float *)(xb + r * x_row) * sum;
        }
#endif
    }
    for (int r = 0; r < R; r++) {
        float offsets = f->has_offset ? dot_f32(u->off, (const float *)(x + r * x_row + x_sums_at(f, K)), K / offset_group(f)) : 0;
#ifdef USE_AVX2
        y[r * y_step] = hsum_ps(acc[r]) + offsets;
#else
        y[r * y_step] = acc[r] + offsets;
#endif
    }
}

// dot_unpacked with the block kind and the code signedness as constants (one loop body each).
static void dot_unpacked_rows(const format *f, const unpacked_row *u, int K, const uint8_t *x, size_t x_row, float *y,
                              size_t y_step, int R) {
#define DOT(rows) \
    if (f->block == 256) { \
        if (f->signed_codes) dot_unpacked(f, u, K, x, x_row, y, y_step, rows, 1, 1); \
        else dot_unpacked(f, u, K, x, x_row, y, y_step, rows, 1, 0); \
    } else { \
        if (f->signed_codes) dot_unpacked(f, u, K, x, x_row, y, y_step, rows, 0, 1); \
        else dot_unpacked(f, u, K, x, x_row, y, y_step, rows, 0, 0); \
    }
    if (R == DOT_ROWS) {
        DOT(DOT_ROWS)
    } else {
        DOT(1)
    }
#undef DOT
}

// One input row's int8 blocks, then its float sums per offset group (see x_sums_at).
static void quantize_row(const format *f, const float *x, int K, uint8_t *out) {
    float *sums = (float *)(out + x_sums_at(f, K));
    if (f->x_block == 32) {
        x_block32 *blocks = (x_block32 *)out;
        quantize_x32(x, K, blocks);
        for (int b = 0; b < K / 32; b++) sums[b] = blocks[b].s;
    } else {
        x_block256 *blocks = (x_block256 *)out;
        quantize_x256(x, K, blocks);
        for (int b = 0; b < K / 256; b++)
            for (int g = 0; g < 16; g++) sums[16 * b + g] = blocks[b].d * blocks[b].sums[g];
    }
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

// Weight rows per task: a few KB of weights that stay in L1 while every input row passes.
#define ROWS_PER_TASK 16
// Input rows per pass: their codes (up to ~350 KB for K = 11008) stay in L2.
#define INPUTS_PER_PASS 32
// From this many input rows on (a prompt), each weight row is unpacked once and multiplied with
// the rows DOT_ROWS at a time. Below it (a decoded token, a speculative draft's few) each input
// row is computed exactly as a row alone, bit for bit: verifying a draft must give the logits
// decoding would (backends/speculative.py; ROWS_AS_DECODED in native_layers.py).
#define UNPACK_MIN_ROWS 16

static size_t unpacked_bytes(const format *f, int K) {
    return (size_t)K + (size_t)K * sizeof(int16_t) / 2 + (size_t)(K / f->block + K / 16) * sizeof(float);
}

static unpacked_row unpacked_at(const format *f, int K, uint8_t *base) {
    unpacked_row u;
    u.q = base;
    u.sc = (int16_t *)(base + K);
    u.d = (float *)(base + K + (size_t)K * sizeof(int16_t) / 2);
    u.off = u.d + K / f->block;
    return u;
}

// x [M, K] float32; the weight's N rows of raw GGUF blocks in `parts` pieces (q, k and v as they
// lie in the file: fused without a copy), part p holding part_rows[p] rows at w[p]; y [M, N].
// Returns 0, or -1 for an unsupported type or K, -2 when out of memory.
int gguf_matmul(int type, int parts, const uint8_t *const *w, const int *part_rows, const float *x, float *y, int M, int K,
                int threads) {
    if (!gguf_matmul_supports(type, K)) return -1;
    const format *f = find_format(type);
    size_t x_row = x_sums_at(f, K) + (size_t)(K / 16) * sizeof(float), w_row = (size_t)(K / f->block) * f->block_bytes;
    int N = 0;
    for (int p = 0; p < parts; p++) N += part_rows[p];
    int unpack = M >= UNPACK_MIN_ROWS || !f->dot;
    // a whole task's rows unpacked at once where several passes over the inputs reuse them
    int unpacked_rows = M > INPUTS_PER_PASS ? ROWS_PER_TASK : 1;
    size_t u_bytes = (unpacked_bytes(f, K) + 63) / 64 * 64, per_thread = unpack ? u_bytes * unpacked_rows : 0;
    uint8_t *xq = malloc(x_row * M + per_thread * threads + 64);
    if (!xq) return -2;
    uint8_t *scratch = (uint8_t *)(((uintptr_t)(xq + x_row * M) + 63) / 64 * 64);
    int tasks = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    if (M == 1) quantize_row(f, x, K, xq);  // a decoded token: no parallel loop (and barrier) for one row
#pragma omp parallel num_threads(threads)
    {
        if (M > 1) {
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) quantize_row(f, x + (size_t)m * K, K, xq + m * x_row);
        }
        uint8_t *mine = scratch + per_thread * (size_t)omp_get_thread_num();
#pragma omp for schedule(static)
        for (int t = 0; t < tasks; t++) {
            int n0 = t * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < N ? n0 + ROWS_PER_TASK : N;
            int step = unpack ? unpacked_rows : n1 - n0;
            for (int n = n0; n < n1; n += step) {
                int rows = n + step < n1 ? step : n1 - n;
                const uint8_t *row[ROWS_PER_TASK];
                unpacked_row u[ROWS_PER_TASK];
                for (int i = 0; i < rows; i++) {
                    int p = 0, r = n + i;
                    while (p < parts - 1 && r >= part_rows[p]) r -= part_rows[p++];
                    row[i] = w[p] + (size_t)r * w_row;
                    if (unpack) {
                        u[i] = unpacked_at(f, K, mine + u_bytes * i);
                        f->unpack(row[i], K, &u[i]);
                    }
                }
                for (int m0 = 0; m0 < M; m0 += INPUTS_PER_PASS) {
                    int m1 = m0 + INPUTS_PER_PASS < M ? m0 + INPUTS_PER_PASS : M;
                    for (int i = 0; i < rows; i++) {
                        float *out = y + (size_t)m0 * N + n + i;
                        if (!unpack) {
                            for (int m = m0; m < m1; m++, out += N) *out = f->dot(row[i], xq + m * x_row, K);
                            continue;
                        }
                        int m = m0, batch = M >= UNPACK_MIN_ROWS ? DOT_ROWS : 1;
                        for (; m + batch <= m1; m += batch, out += batch * (size_t)N)
                            dot_unpacked_rows(f, &u[i], K, xq + m * x_row, x_row, out, N, batch);
                        for (; m < m1; m++, out += N) dot_unpacked_rows(f, &u[i], K, xq + m * x_row, x_row, out, N, 1);
                    }
                }
            }
        }
    }
    free(xq);
    return 0;
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

// key_dot for 4 consecutive keys (D floats apart), each in exactly key_dot's order: 4
// independent chains of multiply-adds keep the FMA units busy where one chain waits on each.
static inline void key_dots4(const float *q, const void *keys, size_t at, int D, int f16, float *dots) {
#ifdef USE_F16C
    if (D % 8 == 0) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < D; j += 8) {
            __m256 x = _mm256_loadu_ps(q + j);
            a0 = _mm256_fmadd_ps(x, cached8(keys, at + j, f16), a0);
            a1 = _mm256_fmadd_ps(x, cached8(keys, at + D + j, f16), a1);
            a2 = _mm256_fmadd_ps(x, cached8(keys, at + 2 * (size_t)D + j, f16), a2);
            a3 = _mm256_fmadd_ps(x, cached8(keys, at + 3 * (size_t)D + j, f16), a3);
        }
        // sum8 of each, four at a time: the same additions of the same lanes, in one set of shuffles
        __m256 s01 = _mm256_add_ps(_mm256_permute2f128_ps(a0, a1, 0x20), _mm256_permute2f128_ps(a0, a1, 0x31));
        __m256 s23 = _mm256_add_ps(_mm256_permute2f128_ps(a2, a3, 0x20), _mm256_permute2f128_ps(a2, a3, 0x31));
        __m256 halves = _mm256_add_ps(_mm256_shuffle_ps(s01, s23, 0x44), _mm256_shuffle_ps(s01, s23, 0xee));
        __m256 sums = _mm256_hadd_ps(halves, halves);  // lanes 0, 4, 1, 5: keys 0, 1, 2, 3
        float lanes[8];
        _mm256_storeu_ps(lanes, sums);
        dots[0] = lanes[0], dots[1] = lanes[4], dots[2] = lanes[1], dots[3] = lanes[5];
        return;
    }
#endif
    for (int u = 0; u < 4; u++) dots[u] = key_dot(q, keys, at + u * (size_t)D, D, f16);
}

#ifdef USE_F16C
// e^x for x <= 0 (scores minus their max), 8 at a time: 2^n e^r with n = round(x / ln 2) and
// |r| <= ln(2) / 2 (ln 2 split in two so r is exact), e^r by its Taylor series to degree 7
// (truncation under 4e-9 relative); below -87 (2^n no longer a normal float) it gives 0.
static inline __m256 exp8_nonpositive(__m256 x) {
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
        __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + l), tops));
        _mm256_storeu_ps(p + l, e);
        sums = _mm256_add_ps(sums, e);
    }
    if (l < L) {  // the tail through the same function, so a position's weight never depends on L % 8
        float tail[8] = {0};
        memcpy(tail, p + l, (L - l) * sizeof(float));
        __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(tail), tops));
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
// with p[n * L] and o[n * D] as scratch. Each (row, head) takes the same operations whatever n
// (blocks of positions only reorder independent sums; o holds a sum between blocks exactly),
// and every path (a decoded token, a prompt's rows, any thread count) computes it here, so a
// row's output does not depend on how its prompt was split into forward passes.
static void attend_heads(const float *q, int n, const void *keys, const void *values, size_t at, int f16, int L, int D,
                         float *p, float *o, float *out) {
    float scale = 1 / sqrtf((float)D), totals[n];
    for (int b = 0; b < L; b += ATTEND_BLOCK) {
        int end = b + ATTEND_BLOCK < L ? b + ATTEND_BLOCK : L;
        for (int h = 0; h < n; h++) {
            int l = b;
            for (; l + 3 < end; l += 4) key_dots4(q + h * D, keys, at + (size_t)l * D, D, f16, p + (size_t)h * L + l);
            for (; l < end; l++) p[(size_t)h * L + l] = key_dot(q + h * D, keys, at + (size_t)l * D, D, f16);
        }
    }
    for (int h = 0; h < n; h++) {
        float *ph = p + (size_t)h * L, top = -INFINITY;
        for (int l = 0; l < L; l++) {
            ph[l] *= scale;
            top = fmaxf(top, ph[l]);
        }
        totals[h] = exp_and_sum(ph, L, top);
    }
    for (int j = 0; j < n * D; j++) o[j] = 0;
    for (int b = 0; b < L; b += ATTEND_BLOCK) {
        int end = b + ATTEND_BLOCK < L ? b + ATTEND_BLOCK : L;
        for (int h = 0; h < n; h++) {
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
    // A task is a row's heads of one key/value head (its keys read once), or a single head where
    // those tasks are too few to share evenly between threads (a decoded token: 3 KV heads, 2 threads).
    int heads = T * KV % threads == 0 || T * KV >= 4 * threads ? group : 1, tasks = T * H / heads;
    float *scratch = malloc((size_t)threads * heads * (L + D) * sizeof(float));
    if (!scratch) return -2;
#pragma omp parallel num_threads(threads)
    {
        float *p = scratch + (size_t)omp_get_thread_num() * heads * (L + D), *o = p + (size_t)heads * L;
        // Longest rows first (causal: the rows' lengths differ); a decoded token's heads in order,
        // so a thread's consecutive heads share their keys.
#pragma omp for schedule(dynamic, 1)
        for (int i = tasks - 1; i >= 0; i--) {
            int task = T > 1 ? i : tasks - 1 - i, t = task / (H / heads), h = task % (H / heads) * heads;
            attend_heads(q + t * stride + h * D, heads, k_cache, v_cache, (size_t)(h / group) * capacity * D, f16,
                         pos + t + 1, D, p, o, out + ((size_t)t * H + h) * D);
        }
    }
    free(scratch);
    return 0;
}

// SwiGLU's silu(gate) * up for rows of [gate | up] (the fused gate/up projection's output).
void silu_mul_f32(const float *gate_up, float *out, int M, int F) {
    for (int m = 0; m < M; m++, gate_up += 2 * F, out += F)
        for (int j = 0; j < F; j++) out[j] = gate_up[j] / (1 + expf(-gate_up[j])) * gate_up[F + j];
}
