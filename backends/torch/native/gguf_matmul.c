// y = x W^T with W still in its GGUF blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K), on the CPU.
//
// Why our own kernel: decode reads every weight once per token, so its speed is bytes read
// per weight. torch's int4 matmul needs the blocks repacked (load time, a second copy in
// memory) and has no layout for Q6_K or Q8_0 at their file size; here the mapped file is the
// weight. As in llama.cpp, activations are quantized to int8 per block (32 values, or 256 for
// the K-quants), so each block is one integer dot product; the result is exactly
// sum_j w_j * xq_j * dx, checked against that formula in tests/test_torch_native.py.
//
// Built at first use by backends/torch/native.py with -O3 -march=native -fopenmp; loaded
// after torch, so OpenMP here is torch's own runtime and thread pool.

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && !defined(SMOLLM3_SCALAR)
#define USE_AVX2 1
#include <immintrin.h>
#endif

enum { GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q8_0 = 8, GGML_Q4_K = 12, GGML_Q6_K = 14 };

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

// --- dequantization to bfloat16 (prefill: a few rows at a time, into a GEMM) ---

static inline uint16_t bf16_round(float f) {  // round to nearest even; our values are finite
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

#ifdef USE_AVX2
static inline __m256i bf16_round_8(__m256 f) {  // bf16_round on 8 values, in the low halves of 32-bit lanes
    __m256i bits = _mm256_castps_si256(f);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
}

static inline void store_bf16_16(uint16_t *out, __m256 a, __m256 b) {
    // packus interleaves the 128-bit lanes (a0 b0 a1 b1): the permute puts them back in order
    __m256i packed = _mm256_packus_epi32(bf16_round_8(a), bf16_round_8(b));
    _mm256_storeu_si256((__m256i *)out, _mm256_permute4x64_epi64(packed, 0xd8));
}
#endif

static void dequantize_q8_0(const uint8_t *w, uint16_t *out, int K) {
    for (int b = 0; b < K / 32; b++, w += 34, out += 32) {
        float d = f16_to_f32(read_u16(w));
        for (int j = 0; j < 32; j++) out[j] = bf16_round(d * (int8_t)w[2 + j]);
    }
}

static void dequantize_q4_01(const uint8_t *w, uint16_t *out, int K, int with_min) {
    int size = with_min ? 20 : 18, codes = with_min ? 4 : 2;
    for (int b = 0; b < K / 32; b++, w += size, out += 32) {
        float d = f16_to_f32(read_u16(w)), m = with_min ? f16_to_f32(read_u16(w + 2)) : 0;
        int zero = with_min ? 0 : 8;
        for (int j = 0; j < 16; j++) {
            out[j] = bf16_round(d * ((w[codes + j] & 15) - zero) + m);
            out[j + 16] = bf16_round(d * ((w[codes + j] >> 4) - zero) + m);
        }
    }
}

static void dequantize_q4_0(const uint8_t *w, uint16_t *out, int K) { dequantize_q4_01(w, out, K, 0); }
static void dequantize_q4_1(const uint8_t *w, uint16_t *out, int K) { dequantize_q4_01(w, out, K, 1); }

static void dequantize_q4_k(const uint8_t *w, uint16_t *out, int K) {
    for (int b = 0; b < K / 256; b++, w += 144) {
        float d = f16_to_f32(read_u16(w)), dmin = f16_to_f32(read_u16(w + 2));
        uint32_t scw[2], mnw[2];
        q4_k_scales(w + 4, scw, mnw);
        const uint8_t *sc = (const uint8_t *)scw, *mn = (const uint8_t *)mnw, *qs = w + 16;
        for (int j = 0; j < 4; j++, qs += 32, out += 64) {
            float d0 = d * sc[2 * j], m0 = dmin * mn[2 * j], d1 = d * sc[2 * j + 1], m1 = dmin * mn[2 * j + 1];
            for (int l = 0; l < 32; l++) {
                out[l] = bf16_round(d0 * (qs[l] & 15) - m0);
                out[l + 32] = bf16_round(d1 * (qs[l] >> 4) - m1);
            }
        }
    }
}

static void dequantize_q6_k(const uint8_t *w, uint16_t *out, int K) {
    // Codes first, then one scale per 16: loops the compiler vectorizes (4x the per-value form).
    int8_t q[128];
    for (int b = 0; b < K / 256; b++, w += 210) {
        const uint8_t *ql = w, *qh = w + 128;
        const int8_t *sc = (const int8_t *)(w + 192);
        float d = f16_to_f32(read_u16(w + 208));
        for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8, out += 128) {
            for (int l = 0; l < 32; l++) {
                q[l] = (int8_t)(((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32);
                q[l + 32] = (int8_t)(((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32);
                q[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                q[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
            }
            for (int g = 0; g < 8; g++) {
                float scale = d * sc[g];
#ifdef USE_AVX2
                __m128i codes = _mm_loadu_si128((const __m128i *)(q + 16 * g));
                __m256 lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes)), _mm256_set1_ps(scale));
                __m256 hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(codes, 8))), _mm256_set1_ps(scale));
                store_bf16_16(out + 16 * g, lo, hi);
#else
                for (int j = 0; j < 16; j++) out[16 * g + j] = bf16_round(scale * q[16 * g + j]);
#endif
            }
        }
    }
}

// --- the matmul ---

typedef float (*dot_fn)(const uint8_t *, const void *, int);
typedef void (*dequantize_fn)(const uint8_t *, uint16_t *, int);

typedef struct {
    int type, block, block_bytes, x_block, x_block_bytes;
    dot_fn dot;
    dequantize_fn dequantize;
} format;

static const format FORMATS[] = {
    {GGML_Q4_0, 32, 18, 32, sizeof(x_block32), dot_q4_0, dequantize_q4_0},
    {GGML_Q4_1, 32, 20, 32, sizeof(x_block32), dot_q4_1, dequantize_q4_1},
    {GGML_Q8_0, 32, 34, 32, sizeof(x_block32), dot_q8_0, dequantize_q8_0},
    {GGML_Q4_K, 256, 144, 256, sizeof(x_block256), dot_q4_k, dequantize_q4_k},
    {GGML_Q6_K, 256, 210, 256, sizeof(x_block256), dot_q6_k, dequantize_q6_k},
};

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

// Weight rows per task: a few KB of weights that stay in L1 while every input row passes.
#define ROWS_PER_TASK 16
// Input rows per pass: their codes (up to ~350 KB for K = 11008) stay in L2.
#define INPUTS_PER_PASS 32

// x [M, K] float32; the weight's N rows of raw GGUF blocks in `parts` pieces (q, k and v as they
// lie in the file: fused without a copy), part p holding part_rows[p] rows at w[p]; y [M, N].
// Returns 0, or -1 for an unsupported type or K, -2 when out of memory.
int gguf_matmul(int type, int parts, const uint8_t *const *w, const int *part_rows, const float *x, float *y, int M, int K,
                int threads) {
    if (!gguf_matmul_supports(type, K)) return -1;
    const format *f = find_format(type);
    size_t x_row = (size_t)(K / f->x_block) * f->x_block_bytes, w_row = (size_t)(K / f->block) * f->block_bytes;
    int N = 0;
    for (int p = 0; p < parts; p++) N += part_rows[p];
    uint8_t *xq = malloc(x_row * M);
    if (!xq) return -2;
    int tasks = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    if (M == 1) quantize_row(f, x, K, xq);  // a decoded token: no parallel loop (and barrier) for one row
#pragma omp parallel num_threads(threads)
    {
        if (M > 1) {
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) quantize_row(f, x + (size_t)m * K, K, xq + m * x_row);
        }
#pragma omp for schedule(static)
        for (int t = 0; t < tasks; t++) {
            int n0 = t * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < N ? n0 + ROWS_PER_TASK : N;
            for (int m0 = 0; m0 < M; m0 += INPUTS_PER_PASS) {
                int m1 = m0 + INPUTS_PER_PASS < M ? m0 + INPUTS_PER_PASS : M;
                for (int n = n0; n < n1; n++) {
                    int p = 0, r = n;
                    while (p < parts - 1 && r >= part_rows[p]) r -= part_rows[p++];
                    const uint8_t *row = w[p] + (size_t)r * w_row;
                    for (int m = m0; m < m1; m++) y[(size_t)m * N + n] = f->dot(row, xq + m * x_row, K);
                }
            }
        }
    }
    free(xq);
    return 0;
}

// Rows [N, K] of GGUF blocks to bfloat16 [N, K]. Returns 0, or -1 for an unsupported type or K.
int gguf_dequantize_bf16(int type, const uint8_t *w, uint16_t *out, int N, int K, int threads) {
    const format *f = find_format(type);
    if (!f || K % f->block) return -1;
    size_t w_row = (size_t)(K / f->block) * f->block_bytes;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) f->dequantize(w + n * w_row, out + (size_t)n * K, K);
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

// Attention for one new token at position `pos` (decode), in one call instead of a dozen torch
// ops: RoPE on q and the new key (unless cos is NULL: a NoPE layer), the new key and value
// written into the caches [KV, capacity, D], then per query head softmax(q k / sqrt(D)) v over
// positions 0..pos into out [H * D]. Query heads h share key/value head h / (H / KV) (GQA).
// Returns 0, or -2 when out of memory.
int attend_one_f32(float *q, float *k_new, const float *v_new, float *k_cache, float *v_cache, int capacity, int pos,
                   int H, int KV, int D, const float *cos, const float *signed_sin, float *out, int threads) {
    if (cos) {
        rope_f32(q, 0, 1, H, D, cos, signed_sin);
        rope_f32(k_new, 0, 1, KV, D, cos, signed_sin);
    }
    for (int h = 0; h < KV; h++) {
        memcpy(k_cache + ((size_t)h * capacity + pos) * D, k_new + h * D, D * sizeof(float));
        memcpy(v_cache + ((size_t)h * capacity + pos) * D, v_new + h * D, D * sizeof(float));
    }
    int L = pos + 1, group = H / KV;
    float scale = 1 / sqrtf((float)D), *all_scores = malloc((size_t)H * L * sizeof(float));
    if (!all_scores) return -2;
    // Threads only where the work outweighs waking them (long contexts).
#pragma omp parallel for num_threads(threads) schedule(static) if ((size_t)L * H * D > (1 << 16))
    for (int h = 0; h < H; h++) {
        const float *qh = q + h * D, *keys = k_cache + (size_t)(h / group) * capacity * D;
        const float *values = v_cache + (size_t)(h / group) * capacity * D;
        float *scores = all_scores + (size_t)h * L, top = -INFINITY, total = 0;
        for (int l = 0; l < L; l++) {
            // 8 partial sums: a float reduction the compiler may vectorize (it keeps a single
            // sum's order otherwise, one multiply-add at a time: 3 ms a token at 512 positions)
            float part[8] = {0, 0, 0, 0, 0, 0, 0, 0}, dot = 0;
            const float *key = keys + (size_t)l * D;
            int j = 0;
            for (; j + 7 < D; j += 8)
                for (int u = 0; u < 8; u++) part[u] += qh[j + u] * key[j + u];
            for (; j < D; j++) dot += qh[j] * key[j];
            dot += ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
            scores[l] = dot * scale;
            top = fmaxf(top, scores[l]);
        }
        float *o = out + h * D;
        for (int j = 0; j < D; j++) o[j] = 0;
        for (int l = 0; l < L; l++) {
            float p = expf(scores[l] - top);
            total += p;
            for (int j = 0; j < D; j++) o[j] += p * values[(size_t)l * D + j];
        }
        for (int j = 0; j < D; j++) o[j] /= total;
    }
    free(all_scores);
    return 0;
}

// SwiGLU's silu(gate) * up for rows of [gate | up] (the fused gate/up projection's output).
void silu_mul_f32(const float *gate_up, float *out, int M, int F) {
    for (int m = 0; m < M; m++, gate_up += 2 * F, out += F)
        for (int j = 0; j < F; j++) out[j] = gate_up[j] / (1 + expf(-gate_up[j])) * gate_up[F + j];
}
