/*
 * Blockwise 4-bit / 8-bit quantization kernels for qlora_plugins (CPU).
 *
 * Compiled at first use by native.py (cc -O3 -fopenmp -fPIC -shared
 * -ffp-contract=off [-mavx2 -mfma -mf16c]) and called through ctypes.
 * The pure-torch module reference.py defines the exact results; every kernel
 * here is bit-identical to it. Formulas: see the package docstring
 * (qlora_plugins/core/kernels/__init__.py).
 *
 * Conventions
 *  - x is the flattened tensor of n elements; block b holds elements
 *    [b*bs, min((b+1)*bs, n)). bs is a power of two in [32, 4096].
 *  - 4-bit codes are packed two per byte, element 2i in the HIGH nibble.
 *  - dtype codes: 0 = fp32, 1 = bf16, 2 = fp16 (inputs and outputs).
 *  - No fused multiply-add anywhere: the build uses -ffp-contract=off so each
 *    product/sum is rounded like the torch reference.
 *  - Functions returning int return 0 on success, 1 if the input contains
 *    NaN/Inf, 2 if an (asymmetric) block range overflows fp32.
 */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define QP_SIMD 1
#else
#define QP_SIMD 0
#endif

typedef int64_t i64;

#define QP_MAX_BS 4096
#define QP_PAR_MIN (1 << 18)        /* below this many elements run single-threaded */
#define QP_STREAM_MIN ((i64)8 << 20) /* outputs of at least this many bytes use streaming stores */

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

/* ------------------------------------------------------------------------- */
/* scalar conversions                                                         */
/* ------------------------------------------------------------------------- */

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }

/* round-to-nearest-even, identical to torch for all finite values and inf */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return u2f(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        /* zero or subnormal: man * 2^-24, exact in fp32 */
        float v = (float)man * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return u2f(sign | ((exp + 112u) << 23) | (man << 13));
}

/* round-to-nearest-even fp32 -> fp16 (IEEE, with subnormals and overflow to inf) */
static inline uint16_t f32_to_f16(float f) {
    uint32_t u = f2u(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;          /* NaN */
    if (a >= 0x477ff000u) return sign | 0x7c00u;         /* >= 65520: inf (incl. inf) */
    if (a < 0x38800000u) {                               /* < 2^-14: subnormal or zero */
        if (a < 0x33000000u) return sign;                /* < 2^-25: rounds to 0 */
        uint32_t e = a >> 23;                            /* 102..112 */
        uint32_t m = (a & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e;                       /* 14..24 */
        uint32_t r = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return sign | (uint16_t)r;
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u; /* rebias 127 -> 15 */
    return sign | (uint16_t)(r >> 13);
}

static inline void store_one(void* out, int odt, i64 i, float v) {
    if (odt == DT_F32) ((float*)out)[i] = v;
    else if (odt == DT_BF16) ((uint16_t*)out)[i] = f32_to_bf16(v);
    else ((uint16_t*)out)[i] = f32_to_f16(v);
}

/* Pointer to `len` fp32 values of x starting at `start`; converts into buf for 16-bit input. */
static inline const float* load_f32(const void* x, int dt, i64 start, int len, float* buf) {
    if (dt == DT_F32) return (const float*)x + start;
    const uint16_t* h = (const uint16_t*)x + start;
    int i = 0;
    if (dt == DT_BF16) {
        uint32_t* b = (uint32_t*)buf;
        for (i = 0; i < len; i++) b[i] = (uint32_t)h[i] << 16;
        return buf;
    }
#if QP_SIMD
    for (; i + 8 <= len; i += 8)
        _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + i))));
#endif
    for (; i < len; i++) buf[i] = f16_to_f32(h[i]);
    return buf;
}

/* max |x| as the fp32 bit pattern (monotone for non-negative floats; NaN/Inf >= 0x7f800000) */
static inline uint32_t absmax_bits(const float* xs, int len) {
    const uint32_t* u = (const uint32_t*)xs;
    uint32_t m = 0;
    for (int i = 0; i < len; i++) {
        uint32_t a = u[i] & 0x7fffffffu;
        m = a > m ? a : m;
    }
    return m;
}

/* order-preserving int key of a float (-0.0 < +0.0) */
static inline int32_t fkey(uint32_t u) { return (int32_t)(u ^ ((uint32_t)((int32_t)u >> 31) & 0x7fffffffu)); }
static inline float unkey(int32_t k) { uint32_t u = (uint32_t)k; return u2f(u ^ ((uint32_t)((int32_t)u >> 31) & 0x7fffffffu)); }

/*
 * Outputs are freshly allocated by torch (for big tensors: fresh mmap'd pages), so
 * first-touch page faults cost as much as the kernel itself. Asking for transparent
 * huge pages on the 2 MiB-aligned interior cuts the number of faults 512x. It is a
 * hint only (no effect where THP is disabled) and does not change any value.
 */
static void qp_hint_hugepages(void* p, i64 nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (nbytes < ((i64)4 << 20)) return;
    const uintptr_t H = (uintptr_t)2 << 20;
    uintptr_t a = ((uintptr_t)p + H - 1) & ~(H - 1);
    uintptr_t e = ((uintptr_t)p + (uintptr_t)nbytes) & ~(H - 1);
    if (e > a) (void)madvise((void*)a, (size_t)(e - a), MADV_HUGEPAGE);
#else
    (void)p;
    (void)nbytes;
#endif
}

static inline i64 out_size(int odt) { return odt == DT_F32 ? 4 : 2; }

/* blocks per dynamically scheduled chunk (~64K elements): a descheduled thread on a
 * busy machine then delays at most one chunk instead of half of the work */
static inline i64 qp_chunk(i64 bs) { return bs >= 65536 ? 1 : 65536 / bs; }

static inline int qp_threads(int nthreads, i64 n) {
    if (nthreads < 1) nthreads = 1;
    return n < QP_PAR_MIN ? 1 : nthreads;
}

/* ------------------------------------------------------------------------- */
/* 4-bit lookup-table quantization (nf4 / fp4), bnb-exact                     */
/* ------------------------------------------------------------------------- */

/* 32 normalized values -> 16 packed bytes. q = #{j : bnd[j] < s}, s = clamp(x*r or x/r, -1, 1) */
static inline void quant32_lut(const float* restrict xs, float r, int divide, const float* restrict bnd,
                               uint8_t* restrict out) {
    uint8_t q[32];
    if (!divide) {
        for (int i = 0; i < 32; i++) {
            float s = xs[i] * r;
            s = s < -1.0f ? -1.0f : s;
            s = s > 1.0f ? 1.0f : s;
            int c = 0;
            for (int j = 0; j < 15; j++) c += s > bnd[j];
            q[i] = (uint8_t)c;
        }
    } else {
        for (int i = 0; i < 32; i++) {
            float s = xs[i] / r;
            s = s < -1.0f ? -1.0f : s;
            s = s > 1.0f ? 1.0f : s;
            int c = 0;
            for (int j = 0; j < 15; j++) c += s > bnd[j];
            q[i] = (uint8_t)c;
        }
    }
    for (int i = 0; i < 16; i++) out[i] = (uint8_t)((q[2 * i] << 4) | q[2 * i + 1]);
}

int qp_quantize_4bit_lut(const void* x, int dt, i64 n, i64 bs, const float* bounds15, const uint8_t* order16,
                         uint8_t* packed, float* absmax, int nthreads) {
    const i64 nb = (n + bs - 1) / bs;
    int identity = 1;
    uint8_t pairmap[256];
    for (int i = 0; i < 16; i++) identity &= order16[i] == i;
    for (int i = 0; i < 256; i++) pairmap[i] = (uint8_t)((order16[i >> 4] << 4) | order16[i & 15]);
    float bnd[15];
    for (int j = 0; j < 15; j++) bnd[j] = bounds15[j];
    int bad = 0;
    const int nt = qp_threads(nthreads, n);

#pragma omp parallel for schedule(dynamic, qp_chunk(bs)) num_threads(nt)
    for (i64 b = 0; b < nb; b++) {
        float buf[QP_MAX_BS + 32] __attribute__((aligned(64)));
        const i64 start = b * bs;
        const int len = (int)(n - start < bs ? n - start : bs);
        const float* xs = load_f32(x, dt, start, len, buf);
        uint32_t mb = absmax_bits(xs, len);
        uint8_t* ob = packed + start / 2;
        if (mb >= 0x7f800000u) {
#pragma omp atomic write
            bad = 1;
            continue;
        }
        float am = u2f(mb);
        float amc = am < 1e-38f ? 1e-38f : am; /* torch: absmax.clamp(min=1e-38) */
        if (len == bs) {
            absmax[b] = am;
            const float r = 1.0f / amc;
            for (int c = 0; c < len; c += 32) quant32_lut(xs + c, r, 0, bnd, ob + c / 2);
            if (!identity)
                for (int c = 0; c < len / 2; c++) ob[c] = pairmap[ob[c]];
        } else {
            /* tail block: stats from real elements, stored absmax clamped, division (as bnb) */
            absmax[b] = amc;
            if (xs != buf) memcpy(buf, xs, (size_t)len * sizeof(float));
            const int len32 = (len + 31) & ~31;
            for (int i = len; i < len32; i++) buf[i] = 0.0f; /* pad nibble = code of 0.0 */
            uint8_t tmp[QP_MAX_BS / 2 + 16];
            for (int c = 0; c < len32; c += 32) quant32_lut(buf + c, amc, 1, bnd, tmp + c / 2);
            const int nbytes = (len + 1) / 2;
            for (int c = 0; c < nbytes; c++) ob[c] = identity ? tmp[c] : pairmap[tmp[c]];
        }
    }
    return bad;
}

/* ------------------------------------------------------------------------- */
/* affine int4                                                                */
/* ------------------------------------------------------------------------- */

static inline void quant32_sym(const float* restrict xs, float sc, uint8_t* restrict out) {
    uint8_t q[32];
    for (int i = 0; i < 32; i++) {
        float v = rintf(xs[i] / sc);
        v = v < -8.0f ? -8.0f : v;
        v = v > 7.0f ? 7.0f : v;
        q[i] = (uint8_t)((int)v + 8);
    }
    for (int i = 0; i < 16; i++) out[i] = (uint8_t)((q[2 * i] << 4) | q[2 * i + 1]);
}

static inline void quant32_asym(const float* restrict xs, float m, float sc, uint8_t* restrict out) {
    uint8_t q[32];
    for (int i = 0; i < 32; i++) {
        float v = rintf((xs[i] - m) / sc);
        v = v < 0.0f ? 0.0f : v;
        v = v > 15.0f ? 15.0f : v;
        q[i] = (uint8_t)(int)v;
    }
    for (int i = 0; i < 16; i++) out[i] = (uint8_t)((q[2 * i] << 4) | q[2 * i + 1]);
}

int qp_quantize_4bit_int(const void* x, int dt, i64 n, i64 bs, int symmetric, uint8_t* packed, float* scale,
                         float* offset, int nthreads) {
    const i64 nb = (n + bs - 1) / bs;
    int bad = 0;
    const int nt = qp_threads(nthreads, n);

#pragma omp parallel for schedule(dynamic, qp_chunk(bs)) num_threads(nt)
    for (i64 b = 0; b < nb; b++) {
        float buf[QP_MAX_BS + 32] __attribute__((aligned(64)));
        const i64 start = b * bs;
        const int len = (int)(n - start < bs ? n - start : bs);
        const float* xs = load_f32(x, dt, start, len, buf);
        uint8_t* ob = packed + start / 2;
        uint32_t mb = absmax_bits(xs, len);
        if (mb >= 0x7f800000u) {
#pragma omp atomic write
            bad = 1;
            continue;
        }
        const int len32 = (len + 31) & ~31;
        if (len != len32) {
            if (xs != buf) memcpy(buf, xs, (size_t)len * sizeof(float));
            xs = buf;
        }
        uint8_t tmp[QP_MAX_BS / 2 + 16];
        uint8_t* dst = len == len32 ? ob : tmp;
        if (symmetric) {
            const float sc = u2f(mb) / 8.0f;
            scale[b] = sc;
            if (sc > 0.0f) {
                if (len != len32) for (int i = len; i < len32; i++) buf[i] = 0.0f;
                for (int c = 0; c < len32; c += 32) quant32_sym(xs + c, sc, dst + c / 2);
            } else {
                memset(dst, 0x88, (size_t)len32 / 2);
            }
        } else {
            const uint32_t* u = (const uint32_t*)xs;
            int32_t kmin = INT32_MAX, kmax = INT32_MIN;
            for (int i = 0; i < len; i++) {
                int32_t k = fkey(u[i]);
                kmin = k < kmin ? k : kmin;
                kmax = k > kmax ? k : kmax;
            }
            const float m = unkey(kmin) + 0.0f, mx = unkey(kmax) + 0.0f; /* -0.0 -> +0.0 */
            const float sc = (mx - m) / 15.0f;
            if (!(sc <= 3.4028234663852886e38f)) {
#pragma omp atomic write
                bad = 2;
                continue;
            }
            scale[b] = sc;
            offset[b] = m;
            if (sc > 0.0f) {
                if (len != len32) for (int i = len; i < len32; i++) buf[i] = m;
                for (int c = 0; c < len32; c += 32) quant32_asym(xs + c, m, sc, dst + c / 2);
            } else {
                memset(dst, 0, (size_t)len32 / 2);
            }
        }
        if (len != len32) {
            /* padding nibble of an odd-length tail is 0 */
            const int nbytes = (len + 1) / 2;
            memcpy(ob, tmp, (size_t)nbytes);
            if (len & 1) ob[nbytes - 1] &= 0xf0;
        }
    }
    return bad;
}

/* ------------------------------------------------------------------------- */
/* 4-bit dequantization: out = code[q] * absmax[b] (+ offset[b])              */
/* ------------------------------------------------------------------------- */

#if QP_SIMD
static inline __m256 lut16(__m256i idx, __m256 tlo, __m256 thi) {
    __m256 lo = _mm256_permutevar8x32_ps(tlo, idx);
    __m256 hi = _mm256_permutevar8x32_ps(thi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

static inline __m256i bf16_rne(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    return _mm256_srli_epi32(u, 16);
}

/* 16 packed bytes -> 32 outputs; stream: non-temporal stores (32-byte aligned destination) */
static inline void deq32(const uint8_t* p, __m256 tlo, __m256 thi, __m256 s, __m256 o, int has_off, void* out,
                         int odt, i64 i, int stream) {
    const __m128i m4 = _mm_set1_epi8(0x0f);
    __m128i raw = _mm_loadu_si128((const __m128i*)p);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
    __m128i lo = _mm_and_si128(raw, m4);
    __m128i ia = _mm_unpacklo_epi8(hi, lo); /* elements 0..15 */
    __m128i ib = _mm_unpackhi_epi8(hi, lo); /* elements 16..31 */
    __m256 v[4];
    v[0] = lut16(_mm256_cvtepu8_epi32(ia), tlo, thi);
    v[1] = lut16(_mm256_cvtepu8_epi32(_mm_srli_si128(ia, 8)), tlo, thi);
    v[2] = lut16(_mm256_cvtepu8_epi32(ib), tlo, thi);
    v[3] = lut16(_mm256_cvtepu8_epi32(_mm_srli_si128(ib, 8)), tlo, thi);
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_mul_ps(v[k], s);
        if (has_off) v[k] = _mm256_add_ps(v[k], o);
    }
    if (odt == DT_F32) {
        float* d = (float*)out + i;
        if (stream)
            for (int k = 0; k < 4; k++) _mm256_stream_ps(d + 8 * k, v[k]);
        else
            for (int k = 0; k < 4; k++) _mm256_storeu_ps(d + 8 * k, v[k]);
    } else if (odt == DT_BF16) {
        uint16_t* d = (uint16_t*)out + i;
        for (int k = 0; k < 4; k += 2) {
            __m256i pk = _mm256_packus_epi32(bf16_rne(v[k]), bf16_rne(v[k + 1]));
            pk = _mm256_permute4x64_epi64(pk, 0xD8);
            if (stream)
                _mm256_stream_si256((__m256i*)(d + 8 * k), pk);
            else
                _mm256_storeu_si256((__m256i*)(d + 8 * k), pk);
        }
    } else {
        uint16_t* d = (uint16_t*)out + i;
        for (int k = 0; k < 4; k++) {
            __m128i h = _mm256_cvtps_ph(v[k], _MM_FROUND_TO_NEAREST_INT);
            if (stream)
                _mm_stream_si128((__m128i*)(d + 8 * k), h);
            else
                _mm_storeu_si128((__m128i*)(d + 8 * k), h);
        }
    }
}
#endif

static inline int is_finite_f(float v) { return (f2u(v) & 0x7f800000u) != 0x7f800000u; }

/* returns 1 (and leaves `out` partly unwritten) if absmax/offset contain NaN/Inf */
int qp_dequantize_4bit_lut(const uint8_t* packed, const float* absmax, const float* offset, const float* code16,
                           i64 n, i64 bs, void* out, int odt, int nthreads) {
    const i64 nb = (n + bs - 1) / bs;
    const int nt = qp_threads(nthreads, n);
    const int has_off = offset != NULL;
    const i64 nbytes = n * out_size(odt);
    /* large outputs: bypass the cache (no read-for-ownership of the destination) */
    const int stream = nbytes >= QP_STREAM_MIN && ((uintptr_t)out & 31u) == 0;
    int bad = 0;
    qp_hint_hugepages(out, nbytes);

#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(dynamic, qp_chunk(bs))
        for (i64 b = 0; b < nb; b++) {
            const i64 start = b * bs;
            const int len = (int)(n - start < bs ? n - start : bs);
            const float s = absmax[b];
            const float o = has_off ? offset[b] : 0.0f;
            if (!is_finite_f(s) || !is_finite_f(o)) {
#pragma omp atomic write
                bad = 1;
                continue;
            }
            const uint8_t* p = packed + start / 2;
            int i = 0;
#if QP_SIMD
            const __m256 tlo = _mm256_loadu_ps(code16), thi = _mm256_loadu_ps(code16 + 8);
            const __m256 vs = _mm256_set1_ps(s), vo = _mm256_set1_ps(o);
            for (; i + 32 <= len; i += 32) deq32(p + i / 2, tlo, thi, vs, vo, has_off, out, odt, start + i, stream);
#endif
            for (; i < len; i++) {
                uint8_t byte = p[i >> 1];
                float v = code16[(i & 1) ? (byte & 15) : (byte >> 4)] * s;
                if (has_off) v = v + o;
                store_one(out, odt, start + i, v);
            }
        }
#if QP_SIMD
        if (stream) _mm_sfence(); /* make this thread's streaming stores globally visible */
#endif
    }
    return bad;
}

/* ------------------------------------------------------------------------- */
/* 8-bit blockwise (bnb's CPU quantize_blockwise rule via exact thresholds)   */
/* ------------------------------------------------------------------------- */

/*
 * bnb 0.50's CPU rule: v = x * (1/absmax); q = lut[(uint16)(int)fmaf((clamp(v,-1,1)+1)*0.5f, 65535, 0.5f)]
 * with bnb's 65536-entry table (reference.bnb8_lut). The fused multiply-add is bnb's
 * (its compiler contracts that expression); fmaf() is exact with or without FMA hardware.
 * An all-zero block gives codes 0.
 */
static inline uint8_t q8_one(float v, const uint8_t* lut) {
    v = v < -1.0f ? -1.0f : v;
    v = v > 1.0f ? 1.0f : v;
    const float t = (v + 1.0f) * 0.5f;
    const int k = (int)fmaf(t, 65535.0f, 0.5f);
    return lut[(uint16_t)k];
}

int qp_quantize_8bit(const float* x, i64 n, i64 bs, const uint8_t* lut, uint8_t* out, float* absmax, int nthreads) {
    const i64 nb = (n + bs - 1) / bs;
    int bad = 0;
    const int nt = qp_threads(nthreads, n);

#pragma omp parallel for schedule(dynamic, qp_chunk(bs)) num_threads(nt)
    for (i64 b = 0; b < nb; b++) {
        const i64 start = b * bs;
        const int len = (int)(n - start < bs ? n - start : bs);
        const float* xs = x + start;
        uint32_t mb = absmax_bits(xs, len);
        if (mb >= 0x7f800000u) {
#pragma omp atomic write
            bad = 1;
            continue;
        }
        const float am = u2f(mb);
        absmax[b] = am;
        if (am == 0.0f) {
            memset(out + start, 0, (size_t)len);
            continue;
        }
        const float inv = 1.0f / am;
        for (int i = 0; i < len; i++) out[start + i] = q8_one(xs[i] * inv, lut);
    }
    return bad;
}

int qp_dequantize_8bit(const uint8_t* q, const float* absmax, const float* code256, i64 n, i64 bs, void* out,
                       int odt, int nthreads) {
    const i64 nb = (n + bs - 1) / bs;
    const int nt = qp_threads(nthreads, n);
    int bad = 0;
    qp_hint_hugepages(out, n * out_size(odt));

#pragma omp parallel for schedule(dynamic, qp_chunk(bs)) num_threads(nt)
    for (i64 b = 0; b < nb; b++) {
        const i64 start = b * bs;
        const int len = (int)(n - start < bs ? n - start : bs);
        const float s = absmax[b];
        if (!is_finite_f(s)) {
#pragma omp atomic write
            bad = 1;
            continue;
        }
        for (int i = 0; i < len; i++) store_one(out, odt, start + i, code256[q[start + i]] * s);
    }
    return bad;
}

/* ------------------------------------------------------------------------- */
/* fused dequantize-matmul by tiles (fp32): the whole weight never exists     */
/* ------------------------------------------------------------------------- */

/*
 * The GEMM itself is the BLAS that torch links (MKL's Fortran sgemm_, found by the caller and
 * passed in as a pointer), called from inside one OpenMP region, where it runs single-threaded
 * (nested parallelism is off in libgomp by default, and MKL runs sequentially inside a parallel
 * region): each thread
 * decodes a tile of the weight into its own small buffer (sized by the caller to stay in L2)
 * and multiplies it at once. One parallel region per product instead of one per tile keeps the
 * number of thread barriers as low as the unfused path's.
 */
typedef void (*qp_sgemm_t)(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                           const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                           const float* beta, float* c, const int* ldc);

/* decode blocks [b0, b1) of the flat weight into dst (fp32, contiguous); 1 if a scale is not finite */
static int deq_blocks_f32(const uint8_t* packed, const float* absmax, const float* offset, const float* code16,
                          i64 n, i64 bs, i64 b0, i64 b1, float* dst) {
    const int has_off = offset != NULL;
#if QP_SIMD
    const __m256 tlo = _mm256_loadu_ps(code16), thi = _mm256_loadu_ps(code16 + 8);
#endif
    for (i64 b = b0; b < b1; b++) {
        const i64 start = b * bs;
        const int len = (int)(n - start < bs ? n - start : bs);
        const float s = absmax[b];
        const float o = has_off ? offset[b] : 0.0f;
        if (!is_finite_f(s) || !is_finite_f(o)) return 1;
        const uint8_t* p = packed + start / 2;
        float* d = dst + (start - b0 * bs);
        int i = 0;
#if QP_SIMD
        const __m256 vs = _mm256_set1_ps(s), vo = _mm256_set1_ps(o);
        for (; i + 32 <= len; i += 32) deq32(p + i / 2, tlo, thi, vs, vo, has_off, d, DT_F32, i, 0);
#endif
        for (; i < len; i++) {
            uint8_t byte = p[i >> 1];
            float v = code16[(i & 1) ? (byte & 15) : (byte >> 4)] * s;
            if (has_off) v = v + o;
            d[i] = v;
        }
    }
    return 0;
}

/*
 * y[m, rows] = x[m, cols] @ W^T, W = dequant(packed) of shape [rows, cols] (flat blocks).
 * Row tiles of `tile_rows` rows (a multiple of bs / gcd(cols, bs), so every tile starts on a
 * block boundary); `ldy` is y's row stride. Returns 1 on a non-finite scale, 3 on allocation failure.
 */
int qp_matmul_4bit_lut_xwt(const float* x, i64 m, i64 cols, i64 rows, const uint8_t* packed, const float* absmax,
                           const float* offset, const float* code16, i64 bs, float* y, i64 ldy, i64 tile_rows,
                           void* sgemm_ptr, int nthreads) {
    qp_sgemm_t sgemm = (qp_sgemm_t)sgemm_ptr;
    const i64 n = rows * cols;
    const i64 ntiles = (rows + tile_rows - 1) / tile_rows;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > ntiles) nt = (int)ntiles;
    int bad = 0;
#pragma omp parallel num_threads(nt)
    {
        float* buf = (float*)malloc((size_t)(tile_rows * cols) * sizeof(float));
        if (!buf) {
#pragma omp atomic write
            bad = 3;
        }
#pragma omp for schedule(dynamic, 1)
        for (i64 t = 0; t < ntiles; t++) {
            if (!buf || bad) continue;
            const i64 r0 = t * tile_rows;
            const i64 r1 = r0 + tile_rows < rows ? r0 + tile_rows : rows;
            const i64 e0 = r0 * cols, e1 = r1 * cols;
            if (deq_blocks_f32(packed, absmax, offset, code16, n, bs, e0 / bs, (e1 + bs - 1) / bs, buf)) {
#pragma omp atomic write
                bad = 1;
                continue;
            }
            const int M = (int)(r1 - r0), N = (int)m, K = (int)cols, lda = (int)cols, ldc = (int)ldy;
            const float one = 1.0f, zero = 0.0f;
            sgemm("T", "N", &M, &N, &K, &one, buf, &lda, x, &lda, &zero, y + r0, &ldc);
        }
        free(buf);
    }
    return bad;
}

/*
 * gx[m, cols] = g[m, rows] @ W, W = dequant(packed) [rows, cols]. When cols is a multiple of bs
 * the threads split gx's columns into stripes of whole blocks and each walks all rows in tiles of
 * `tile_rows` rows of its stripe (no reduction between threads); otherwise one thread walks
 * row tiles of whole rows. `ldg` is g's row stride.
 */
int qp_matmul_4bit_lut_gw(const float* g, i64 m, i64 cols, i64 rows, i64 ldg, const uint8_t* packed,
                          const float* absmax, const float* offset, const float* code16, i64 bs, float* gx,
                          i64 tile_elems, void* sgemm_ptr, int nthreads) {
    qp_sgemm_t sgemm = (qp_sgemm_t)sgemm_ptr;
    const i64 n = rows * cols;
    const int striped = cols % bs == 0;
    const i64 cblocks = striped ? cols / bs : 1;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (!striped) nt = 1;
    if (nt > cblocks) nt = (int)cblocks;
    int bad = 0;
#pragma omp parallel num_threads(nt)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        /* this thread's stripe [c0, c1) of columns, in whole blocks */
        const i64 c0 = striped ? (cblocks * tid / nt) * bs : 0;
        const i64 c1 = striped ? (cblocks * (tid + 1) / nt) * bs : cols;
        const i64 w = c1 - c0;
        i64 tr = w > 0 ? tile_elems / w : 1;
        if (!striped) {
            /* whole rows: a tile must start on a block boundary */
            i64 a = bs, c = cols;
            while (c) { i64 r = a % c; a = c; c = r; }   /* a = gcd(bs, cols) */
            const i64 align = bs / a;
            tr = tr / align * align;
            if (tr < align) tr = align;
        }
        if (tr < 1) tr = 1;
        if (tr > rows) tr = rows;
        float* buf = w > 0 ? (float*)malloc((size_t)(tr * w) * sizeof(float)) : NULL;
        if (w > 0 && !buf) {
#pragma omp atomic write
            bad = 3;
        }
        for (i64 r0 = 0; buf && !bad && r0 < rows; r0 += tr) {
            const i64 r1 = r0 + tr < rows ? r0 + tr : rows;
            int err = 0;
            if (striped) {
                for (i64 r = r0; r < r1 && !err; r++) {
                    const i64 e0 = r * cols + c0;
                    err = deq_blocks_f32(packed, absmax, offset, code16, n, bs, e0 / bs, (e0 + w) / bs, buf + (r - r0) * w);
                }
            } else {
                err = deq_blocks_f32(packed, absmax, offset, code16, n, bs, r0 * cols / bs, (r1 * cols + bs - 1) / bs, buf);
            }
            if (err) {
#pragma omp atomic write
                bad = 1;
                break;
            }
            const int M = (int)w, N = (int)m, K = (int)(r1 - r0), lda = (int)w, ldb = (int)ldg, ldc = (int)cols;
            const float one = 1.0f, beta = r0 == 0 ? 0.0f : 1.0f;
            sgemm("N", "N", &M, &N, &K, &one, buf, &lda, g + r0, &ldb, &beta, gx + c0, &ldc);
        }
        free(buf);
    }
    return bad;
}

int qp_abi_version(void) { return 4; }

int qp_has_simd(void) { return QP_SIMD; }
