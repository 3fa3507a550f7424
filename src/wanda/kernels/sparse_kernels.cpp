// Bitmask-compressed sparse linear kernels for the CPU: matrix-vector products for decoding and tile
// decompression + BLAS for prefill.
// Layout (see packing.py): values concatenated row-major (fp32, bf16 or int8 codes, padded with 16 zeros at
// the end so vector loads never leave the buffer), mask packed little-endian, row_bytes bytes per row (a
// multiple of 8), offsets[r] = index of row r's first value. int8 codes come with fp32 scales, one per row and
// group of G columns (G a multiple of 8): W[r, c] = code * scales[r, c / G]. One build holds every path; the
// AVX paths use function-level target attributes and are chosen at run time (path ids: 0 portable, 1 avx2,
// 2 avx512).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

namespace {

constexpr int kPortable = 0, kAvx2 = 1, kAvx512 = 2;

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename V>
inline float load_val(const V* p);
template <> inline float load_val<float>(const float* p) { return *p; }
template <> inline float load_val<uint16_t>(const uint16_t* p) { return bf16_to_f32(*p); }

// ---- decode: y[b, r] = sum_j W[r, j] x[b, j] for rows r0..r1 ------------------------------------------------

template <typename V>
void portable_rows(const V* vals, const uint8_t* mask, const int64_t* offs, const float* x,
                   float* y, int64_t batch, int64_t out, int64_t row_bytes, int64_t r0, int64_t r1) {
  const int64_t xs = row_bytes * 8;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * row_bytes;
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * xs;
      const V* v = vals + offs[r];
      float acc = 0.f;
      for (int64_t k = 0; k < row_bytes; ++k) {
        unsigned bits = m[k];
        while (bits) {
          int j = __builtin_ctz(bits);
          acc += load_val<V>(v++) * xb[k * 8 + j];
          bits &= bits - 1;
        }
      }
      y[b * out + r] = acc;
    }
  }
}

// lut[m][i]: rank of bit i among the set bits of m (the index of the packed value for lane i); a lane whose
// bit is clear holds the sign bit alone, which the permutation ignores (it reads the low 3 bits) and the
// blend reads to put a zero there: one blend instead of testing the lane's bit.
struct Lut {
  alignas(32) int32_t idx[256][8];
  Lut() {
    for (int m = 0; m < 256; ++m) {
      int c = 0;
      for (int i = 0; i < 8; ++i) {
        idx[m][i] = (m >> i) & 1 ? c++ : static_cast<int32_t>(0x80000000u);
      }
    }
  }
};
const Lut& lut() { static Lut l; return l; }

__attribute__((target("avx2,fma"))) inline __m256 load8_avx2(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8_avx2(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// int8 codes: 8 bytes widened to 8 int32 (sign-extended), then converted to fp32 (exact for |code| <= 127)
__attribute__((target("avx2,fma"))) inline __m256 load8_avx2(const int8_t* p) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

__attribute__((target("avx2,fma"))) inline float hsum8_avx2(__m256 acc) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// The 8 lanes of mask byte `bits` expanded from the packed values at v (zeros where the bit is clear).
__attribute__((target("avx2,fma"))) inline __m256 expand8_avx2(__m256 raw, unsigned bits, const Lut& L) {
  __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(L.idx[bits]));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(raw, perm), _mm256_setzero_ps(), _mm256_castsi256_ps(perm));
}

// One mask byte's product: acc += expand(values at v, bits) * x[0..8); returns the next byte's values.
template <typename V>
__attribute__((target("avx2,fma"))) inline const V* step8_avx2(__m256& acc, const V* v, unsigned bits,
                                                               const float* x, const Lut& L) {
  acc = _mm256_fmadd_ps(expand8_avx2(load8_avx2(v), bits, L), _mm256_loadu_ps(x), acc);
  return v + __builtin_popcount(bits);
}

// Row by row, 64 weights (one 8-byte mask word) per step into four accumulators: with one, every product
// waited on the previous FMA's latency (4 cycles per 8 weights), which bound the loop below the memory's
// speed. The bytes of a word are not skipped when zero (no branch to mispredict); a zero word is.
template <typename V>
__attribute__((target("avx2,fma"))) void avx2_rows(const V* vals, const uint8_t* mask, const int64_t* offs,
                                                   const float* x, float* y, int64_t batch, int64_t out,
                                                   int64_t row_bytes, int64_t r0, int64_t r1) {
  const Lut& L = lut();
  const int64_t xs = row_bytes * 8;
  const int64_t words = row_bytes / 8;  // row_bytes is a multiple of 8 (checked in packed())
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * row_bytes;
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * xs;
      const V* v = vals + offs[r];
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
             a3 = _mm256_setzero_ps();
      for (int64_t k = 0; k < words; ++k) {
        uint64_t w;
        std::memcpy(&w, m + 8 * k, 8);
        if (!w) continue;
        const float* xk = xb + k * 64;
        v = step8_avx2(a0, v, w & 0xff, xk, L);
        v = step8_avx2(a1, v, (w >> 8) & 0xff, xk + 8, L);
        v = step8_avx2(a2, v, (w >> 16) & 0xff, xk + 16, L);
        v = step8_avx2(a3, v, (w >> 24) & 0xff, xk + 24, L);
        v = step8_avx2(a0, v, (w >> 32) & 0xff, xk + 32, L);
        v = step8_avx2(a1, v, (w >> 40) & 0xff, xk + 40, L);
        v = step8_avx2(a2, v, (w >> 48) & 0xff, xk + 48, L);
        v = step8_avx2(a3, v, w >> 56, xk + 56, L);
      }
      y[b * out + r] = hsum8_avx2(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
  }
}

__attribute__((target("avx512f"))) inline __m512 expand16(const float* p, __mmask16 k) {
  return _mm512_maskz_expandloadu_ps(k, p);
}
__attribute__((target("avx512f"))) inline __m512 expand16(const uint16_t* p, __mmask16 k) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_maskz_expand_ps(k, f);
}
// int8 codes: 16 bytes widened to 16 int32, converted to fp32, then expanded like the bf16 lanes
__attribute__((target("avx512f"))) inline __m512 expand16(const int8_t* p, __mmask16 k) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_maskz_expand_ps(k, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)));
}

template <typename V>
__attribute__((target("avx512f"))) void avx512_rows(const V* vals, const uint8_t* mask, const int64_t* offs,
                                                    const float* x, float* y, int64_t batch, int64_t out,
                                                    int64_t row_bytes, int64_t r0, int64_t r1) {
  const int64_t xs = row_bytes * 8;
  const int64_t words = row_bytes / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * row_bytes;
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * xs;
      const V* v = vals + offs[r];
      // two accumulators: consecutive FMAs do not wait on each other's latency
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 1 < words; k += 2) {
        uint16_t w0, w1;
        std::memcpy(&w0, m + 2 * k, 2);
        std::memcpy(&w1, m + 2 * k + 2, 2);
        __m512 e0 = expand16(v, static_cast<__mmask16>(w0));
        v += __builtin_popcount(w0);
        __m512 e1 = expand16(v, static_cast<__mmask16>(w1));
        v += __builtin_popcount(w1);
        acc0 = _mm512_fmadd_ps(e0, _mm512_loadu_ps(xb + k * 16), acc0);
        acc1 = _mm512_fmadd_ps(e1, _mm512_loadu_ps(xb + k * 16 + 16), acc1);
      }
      for (; k < words; ++k) {
        uint16_t w;
        std::memcpy(&w, m + 2 * k, 2);
        acc0 = _mm512_fmadd_ps(expand16(v, static_cast<__mmask16>(w)), _mm512_loadu_ps(xb + k * 16), acc0);
        v += __builtin_popcount(w);
      }
      y[b * out + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    }
  }
}

// ---- prefill: rows r0..r1 of the weight as dense fp32, row stride `ld` (a multiple of 64 >= row_bytes*8) ---

template <typename V>
void portable_unpack(const V* vals, const uint8_t* mask, const int64_t* offs, float* dst, int64_t ld,
                     int64_t row_bytes, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* d = dst + (r - r0) * ld;
    std::fill(d, d + row_bytes * 8, 0.f);
    const uint8_t* m = mask + r * row_bytes;
    const V* v = vals + offs[r];
    for (int64_t k = 0; k < row_bytes; ++k) {
      unsigned bits = m[k];
      while (bits) {
        int j = __builtin_ctz(bits);
        d[k * 8 + j] = load_val<V>(v++);
        bits &= bits - 1;
      }
    }
  }
}

template <typename V>
__attribute__((target("avx2,fma"))) void avx2_unpack(const V* vals, const uint8_t* mask, const int64_t* offs,
                                                     float* dst, int64_t ld, int64_t row_bytes, int64_t r0,
                                                     int64_t r1) {
  const Lut& L = lut();
  for (int64_t r = r0; r < r1; ++r) {
    float* d = dst + (r - r0) * ld;
    const uint8_t* m = mask + r * row_bytes;
    const V* v = vals + offs[r];
    for (int64_t k = 0; k < row_bytes; ++k) {
      const unsigned bits = m[k];
      if (!bits) {
        _mm256_storeu_ps(d + k * 8, _mm256_setzero_ps());
        continue;
      }
      _mm256_storeu_ps(d + k * 8, expand8_avx2(load8_avx2(v), bits, L));
      v += __builtin_popcount(bits);
    }
  }
}

template <typename V>
__attribute__((target("avx512f"))) void avx512_unpack(const V* vals, const uint8_t* mask, const int64_t* offs,
                                                      float* dst, int64_t ld, int64_t row_bytes, int64_t r0,
                                                      int64_t r1) {
  const int64_t words = row_bytes / 2;
  for (int64_t r = r0; r < r1; ++r) {
    float* d = dst + (r - r0) * ld;
    const uint8_t* m = mask + r * row_bytes;
    const V* v = vals + offs[r];
    for (int64_t k = 0; k < words; ++k) {
      uint16_t w;
      std::memcpy(&w, m + 2 * k, 2);
      _mm512_storeu_ps(d + k * 16, expand16(v, static_cast<__mmask16>(w)));
      v += __builtin_popcount(w);
    }
  }
}

// ---- int8 codes with per-group scales ---------------------------------------------------------------------
// G is a multiple of 8, so every mask byte lies inside one group. Decode sums code * x over a group's bytes in
// fp32 and multiplies that partial sum by the group's scale once (one multiply per group, not per weight);
// decompression writes code * scale per weight, one fp32 product, so every path equals the reference bit for
// bit. Groups cover ceil(in_features / G) * G / 8 bytes of a row, clamped to row_bytes; bytes after the last
// group are all zero bits (columns >= in_features).

struct Groups {
  const float* scales;  // (out, count) row-major
  int64_t count;        // groups per row
  int64_t bytes;        // mask bytes per group (G / 8)
};

// The plain scalar version: the specification the SIMD versions below follow.
void portable_rows_i8(const int8_t* vals, const uint8_t* mask, const int64_t* offs, const Groups& g,
                      const float* x, float* y, int64_t batch, int64_t out, int64_t row_bytes, int64_t r0,
                      int64_t r1) {
  const int64_t xs = row_bytes * 8;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * row_bytes;
    const float* s = g.scales + r * g.count;
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * xs;
      const int8_t* v = vals + offs[r];
      float acc = 0.f;
      for (int64_t q = 0; q < g.count; ++q) {
        const int64_t k1 = std::min((q + 1) * g.bytes, row_bytes);
        float part = 0.f;
        for (int64_t k = q * g.bytes; k < k1; ++k) {
          unsigned bits = m[k];
          while (bits) {
            int j = __builtin_ctz(bits);
            part += static_cast<float>(*v++) * xb[k * 8 + j];
            bits &= bits - 1;
          }
        }
        acc += part * s[q];
      }
      y[b * out + r] = acc;
    }
  }
}

// As avx2_rows, but per group: four partial accumulators over the group's bytes (4 bytes = 32 weights per
// step, a zero 4-byte word skipped), then one FMA folds their sum times the group's scale into the row total
// (kept as a vector, so the horizontal sum happens once per row, not per group).
__attribute__((target("avx2,fma"))) void avx2_rows_i8(const int8_t* vals, const uint8_t* mask,
                                                      const int64_t* offs, const Groups& g, const float* x,
                                                      float* y, int64_t batch, int64_t out, int64_t row_bytes,
                                                      int64_t r0, int64_t r1) {
  const Lut& L = lut();
  const int64_t xs = row_bytes * 8;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * row_bytes;
    const float* s = g.scales + r * g.count;
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * xs;
      const int8_t* v = vals + offs[r];
      __m256 total = _mm256_setzero_ps();
      for (int64_t q = 0; q < g.count; ++q) {
        const int64_t k1 = std::min((q + 1) * g.bytes, row_bytes);
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        int64_t k = q * g.bytes;
        for (; k + 4 <= k1; k += 4) {
          uint32_t w;
          std::memcpy(&w, m + k, 4);
          if (!w) continue;
          const float* xk = xb + k * 8;
          v = step8_avx2(a0, v, w & 0xff, xk, L);
          v = step8_avx2(a1, v, (w >> 8) & 0xff, xk + 8, L);
          v = step8_avx2(a2, v, (w >> 16) & 0xff, xk + 16, L);
          v = step8_avx2(a3, v, w >> 24, xk + 24, L);
        }
        for (; k < k1; ++k) v = step8_avx2(a0, v, m[k], xb + k * 8, L);
        __m256 part = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        total = _mm256_fmadd_ps(part, _mm256_set1_ps(s[q]), total);
      }
      y[b * out + r] = hsum8_avx2(total);
    }
  }
}

// As avx512_rows, per group: 16-bit mask words expanded from the widened codes into two accumulators; a group
// of an odd number of bytes (G = 8, 24, ...) ends on one byte, done with 8 lanes (x loaded under a mask so
// the load never reads past the row).
__attribute__((target("avx512f"))) void avx512_rows_i8(const int8_t* vals, const uint8_t* mask,
                                                       const int64_t* offs, const Groups& g, const float* x,
                                                       float* y, int64_t batch, int64_t out, int64_t row_bytes,
                                                       int64_t r0, int64_t r1) {
  const int64_t xs = row_bytes * 8;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * row_bytes;
    const float* s = g.scales + r * g.count;
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * xs;
      const int8_t* v = vals + offs[r];
      __m512 total = _mm512_setzero_ps();
      for (int64_t q = 0; q < g.count; ++q) {
        const int64_t k1 = std::min((q + 1) * g.bytes, row_bytes);
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int64_t k = q * g.bytes;
        for (; k + 4 <= k1; k += 4) {
          uint16_t w0, w1;
          std::memcpy(&w0, m + k, 2);
          std::memcpy(&w1, m + k + 2, 2);
          __m512 e0 = expand16(v, static_cast<__mmask16>(w0));
          v += __builtin_popcount(w0);
          __m512 e1 = expand16(v, static_cast<__mmask16>(w1));
          v += __builtin_popcount(w1);
          a0 = _mm512_fmadd_ps(e0, _mm512_loadu_ps(xb + k * 8), a0);
          a1 = _mm512_fmadd_ps(e1, _mm512_loadu_ps(xb + k * 8 + 16), a1);
        }
        for (; k + 2 <= k1; k += 2) {
          uint16_t w;
          std::memcpy(&w, m + k, 2);
          a0 = _mm512_fmadd_ps(expand16(v, static_cast<__mmask16>(w)), _mm512_loadu_ps(xb + k * 8), a0);
          v += __builtin_popcount(w);
        }
        if (k < k1) {
          const unsigned bits = m[k];
          a1 = _mm512_fmadd_ps(expand16(v, static_cast<__mmask16>(bits)), _mm512_maskz_loadu_ps(0xff, xb + k * 8),
                               a1);
          v += __builtin_popcount(bits);
        }
        total = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(s[q]), total);
      }
      y[b * out + r] = _mm512_reduce_add_ps(total);
    }
  }
}

void portable_unpack_i8(const int8_t* vals, const uint8_t* mask, const int64_t* offs, const Groups& g,
                        float* dst, int64_t ld, int64_t row_bytes, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* d = dst + (r - r0) * ld;
    std::fill(d, d + row_bytes * 8, 0.f);
    const uint8_t* m = mask + r * row_bytes;
    const float* s = g.scales + r * g.count;
    const int8_t* v = vals + offs[r];
    for (int64_t q = 0; q < g.count; ++q) {
      const int64_t k1 = std::min((q + 1) * g.bytes, row_bytes);
      for (int64_t k = q * g.bytes; k < k1; ++k) {
        unsigned bits = m[k];
        while (bits) {
          int j = __builtin_ctz(bits);
          d[k * 8 + j] = static_cast<float>(*v++) * s[q];
          bits &= bits - 1;
        }
      }
    }
  }
}

// Columns from byte k0 of the row on are past the last group (all zero bits): zeroed, so no stale scratch.
inline void zero_tail(float* d, int64_t k0, int64_t row_bytes) {
  if (k0 < row_bytes) std::fill(d + k0 * 8, d + row_bytes * 8, 0.f);
}

__attribute__((target("avx2,fma"))) void avx2_unpack_i8(const int8_t* vals, const uint8_t* mask,
                                                        const int64_t* offs, const Groups& g, float* dst,
                                                        int64_t ld, int64_t row_bytes, int64_t r0, int64_t r1) {
  const Lut& L = lut();
  for (int64_t r = r0; r < r1; ++r) {
    float* d = dst + (r - r0) * ld;
    const uint8_t* m = mask + r * row_bytes;
    const float* s = g.scales + r * g.count;
    const int8_t* v = vals + offs[r];
    int64_t k = 0;
    for (int64_t q = 0; q < g.count; ++q) {
      const __m256 scale = _mm256_set1_ps(s[q]);
      const int64_t k1 = std::min((q + 1) * g.bytes, row_bytes);
      for (k = q * g.bytes; k < k1; ++k) {
        const unsigned bits = m[k];
        if (!bits) {
          _mm256_storeu_ps(d + k * 8, _mm256_setzero_ps());
          continue;
        }
        _mm256_storeu_ps(d + k * 8, _mm256_mul_ps(expand8_avx2(load8_avx2(v), bits, L), scale));
        v += __builtin_popcount(bits);
      }
    }
    zero_tail(d, k, row_bytes);
  }
}

__attribute__((target("avx512f"))) void avx512_unpack_i8(const int8_t* vals, const uint8_t* mask,
                                                         const int64_t* offs, const Groups& g, float* dst,
                                                         int64_t ld, int64_t row_bytes, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* d = dst + (r - r0) * ld;
    const uint8_t* m = mask + r * row_bytes;
    const float* s = g.scales + r * g.count;
    const int8_t* v = vals + offs[r];
    int64_t k = 0;
    for (int64_t q = 0; q < g.count; ++q) {
      const __m512 scale = _mm512_set1_ps(s[q]);
      const int64_t k1 = std::min((q + 1) * g.bytes, row_bytes);
      for (k = q * g.bytes; k + 2 <= k1; k += 2) {
        uint16_t w;
        std::memcpy(&w, m + k, 2);
        _mm512_storeu_ps(d + k * 8, _mm512_mul_ps(expand16(v, static_cast<__mmask16>(w)), scale));
        v += __builtin_popcount(w);
      }
      if (k < k1) {  // a group of an odd number of bytes: its last byte, 8 lanes stored under a mask
        const unsigned bits = m[k];
        _mm512_mask_storeu_ps(d + k * 8, 0xff, _mm512_mul_ps(expand16(v, static_cast<__mmask16>(bits)), scale));
        v += __builtin_popcount(bits);
        ++k;
      }
    }
    zero_tail(d, k, row_bytes);
  }
}

bool cpu_has_id(int64_t path) {
  __builtin_cpu_init();
  if (path == kPortable) return true;
  if (path == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (path == kAvx512) return __builtin_cpu_supports("avx512f");
  return false;
}

int64_t path_id(const std::string& path) {
  if (path == "portable") return kPortable;
  if (path == "avx2") return kAvx2;
  if (path == "avx512") return kAvx512;
  return -1;
}

bool cpu_has(const std::string& path) { return cpu_has_id(path_id(path)); }

enum Kind { kF32, kBF16, kI8 };

struct Packed {
  const void* vals;
  Kind kind;
  const uint8_t* mask;
  const int64_t* offs;
  int64_t row_bytes;
  Groups groups;  // int8 only
};

// int8 values need scales (fp32, out x ceil(in_features / groupsize)) and a groupsize that is a multiple of 8;
// fp32/bf16 values take neither.
Packed packed(const torch::Tensor& values, const torch::Tensor& mask, const torch::Tensor& offsets,
              const c10::optional<torch::Tensor>& scales, int64_t groupsize, int64_t in_features) {
  TORCH_CHECK(mask.dtype() == torch::kUInt8 && mask.dim() == 2 && mask.is_contiguous(),
              "mask must be contiguous 2-D uint8");
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.is_contiguous() && offsets.numel() == mask.size(0) + 1,
              "offsets must be contiguous int64 with one entry per row plus one");
  TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
  TORCH_CHECK(mask.size(1) % 8 == 0, "mask rows must be a multiple of 8 bytes");
  TORCH_CHECK(in_features >= 0 && in_features <= mask.size(1) * 8, "in_features exceeds the mask width");
  const Kind kind = values.dtype() == torch::kBFloat16 ? kBF16 : values.dtype() == torch::kInt8 ? kI8 : kF32;
  TORCH_CHECK(kind != kF32 || values.dtype() == torch::kFloat32, "values must be fp32, bf16 or int8");
  const bool has_scales = scales.has_value() && scales->defined();
  Groups g{nullptr, 0, 0};
  if (kind == kI8) {
    TORCH_CHECK(has_scales, "int8 values need scales");
    TORCH_CHECK(groupsize >= 8 && groupsize % 8 == 0, "groupsize must be a positive multiple of 8, got ", groupsize);
    const int64_t count = (in_features + groupsize - 1) / groupsize;
    TORCH_CHECK(scales->dtype() == torch::kFloat32 && scales->is_contiguous() && scales->dim() == 2 &&
                    scales->size(0) == mask.size(0) && scales->size(1) == count,
                "scales must be contiguous fp32 of shape (", mask.size(0), ", ", count, ")");
    g = {scales->data_ptr<float>(), count, groupsize / 8};
  } else {
    TORCH_CHECK(!has_scales, "scales are only for int8 values");
  }
  return {values.data_ptr(), kind, mask.data_ptr<uint8_t>(), offsets.data_ptr<int64_t>(), mask.size(1), g};
}

template <typename V>
void rows_dispatch(int64_t path, const Packed& p, const float* x, float* y, int64_t batch, int64_t out, int64_t r0,
                   int64_t r1) {
  const V* v = static_cast<const V*>(p.vals);
  if (path == kAvx512) avx512_rows<V>(v, p.mask, p.offs, x, y, batch, out, p.row_bytes, r0, r1);
  else if (path == kAvx2) avx2_rows<V>(v, p.mask, p.offs, x, y, batch, out, p.row_bytes, r0, r1);
  else portable_rows<V>(v, p.mask, p.offs, x, y, batch, out, p.row_bytes, r0, r1);
}

template <typename V>
void unpack_dispatch(int64_t path, const Packed& p, float* dst, int64_t ld, int64_t r0, int64_t r1) {
  const V* v = static_cast<const V*>(p.vals);
  if (path == kAvx512) avx512_unpack<V>(v, p.mask, p.offs, dst, ld, p.row_bytes, r0, r1);
  else if (path == kAvx2) avx2_unpack<V>(v, p.mask, p.offs, dst, ld, p.row_bytes, r0, r1);
  else portable_unpack<V>(v, p.mask, p.offs, dst, ld, p.row_bytes, r0, r1);
}

void rows_dispatch_i8(int64_t path, const Packed& p, const float* x, float* y, int64_t batch, int64_t out,
                      int64_t r0, int64_t r1) {
  const int8_t* v = static_cast<const int8_t*>(p.vals);
  if (path == kAvx512) avx512_rows_i8(v, p.mask, p.offs, p.groups, x, y, batch, out, p.row_bytes, r0, r1);
  else if (path == kAvx2) avx2_rows_i8(v, p.mask, p.offs, p.groups, x, y, batch, out, p.row_bytes, r0, r1);
  else portable_rows_i8(v, p.mask, p.offs, p.groups, x, y, batch, out, p.row_bytes, r0, r1);
}

void unpack_dispatch_i8(int64_t path, const Packed& p, float* dst, int64_t ld, int64_t r0, int64_t r1) {
  const int8_t* v = static_cast<const int8_t*>(p.vals);
  if (path == kAvx512) avx512_unpack_i8(v, p.mask, p.offs, p.groups, dst, ld, p.row_bytes, r0, r1);
  else if (path == kAvx2) avx2_unpack_i8(v, p.mask, p.offs, p.groups, dst, ld, p.row_bytes, r0, r1);
  else portable_unpack_i8(v, p.mask, p.offs, p.groups, dst, ld, p.row_bytes, r0, r1);
}

// Decode rows r0..r1 with the values' kind.
void rows_any(int64_t path, const Packed& p, const float* x, float* y, int64_t batch, int64_t out, int64_t r0,
              int64_t r1) {
  if (p.kind == kI8) rows_dispatch_i8(path, p, x, y, batch, out, r0, r1);
  else if (p.kind == kBF16) rows_dispatch<uint16_t>(path, p, x, y, batch, out, r0, r1);
  else rows_dispatch<float>(path, p, x, y, batch, out, r0, r1);
}

// Rows r0..r1 into dst (row stride ld), in parallel over rows (a row is whole-cache-line work).
void unpack_parallel(int64_t path, const Packed& p, float* dst, int64_t ld, int64_t r0, int64_t r1) {
  at::parallel_for(r0, r1, 8, [&](int64_t a, int64_t b) {
    float* d = dst + (a - r0) * ld;
    if (p.kind == kI8) unpack_dispatch_i8(path, p, d, ld, a, b);
    else if (p.kind == kBF16) unpack_dispatch<uint16_t>(path, p, d, ld, a, b);
    else unpack_dispatch<float>(path, p, d, ld, a, b);
  });
}

// The reusable prefill scratch tile: one buffer shared by every layer, grown to the largest tile asked for
// (tile_rows x padded width fp32), never shrunk. Its size is what scratch_bytes() reports.
torch::Tensor& scratch() {
  static torch::Tensor buf = torch::empty({0}, torch::kFloat32);
  return buf;
}
std::mutex& scratch_lock() {
  static std::mutex m;
  return m;
}

void check_path(int64_t path) {
  TORCH_CHECK(path == kPortable || path == kAvx2 || path == kAvx512, "unknown kernel path id ", path);
  TORCH_CHECK(cpu_has_id(path), "this CPU does not support kernel path id ", path);
}

}  // namespace

// x (..., in_features) of any float dtype -> (..., out_features) in x's dtype, fp32 accumulation.
// Up to decode_max tokens: the compressed form is streamed by the matrix-vector kernels (single-threaded
// when the matrix holds fewer than min_parallel weights: waking the thread pool costs more than it saves
// there). More tokens: tiles of tile_rows rows are decompressed into the shared scratch buffer and each
// multiplied by one BLAS call into the output.
torch::Tensor sparse_linear(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& mask,
                            const torch::Tensor& offsets, const c10::optional<torch::Tensor>& bias,
                            const c10::optional<torch::Tensor>& scales, int64_t groupsize, int64_t in_features,
                            int64_t path, int64_t decode_max, int64_t tile_rows, int64_t min_parallel) {
  check_path(path);
  const Packed p = packed(values, mask, offsets, scales, groupsize, in_features);
  const int64_t out = mask.size(0);
  const int64_t width = p.row_bytes * 8;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "expected last dimension ", in_features, ", got ",
              x.sizes());
  TORCH_CHECK(tile_rows >= 1, "tile_rows must be at least 1");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out;
  auto x2 = x.reshape({-1, in_features}).to(torch::kFloat32).contiguous();
  const int64_t n = x2.size(0);
  auto y = torch::empty({n, out}, x2.options());
  if (n == 0 || out == 0) return y.to(x.dtype()).reshape(out_shape);
  if (n <= decode_max) {
    // the kernels read whole 8/16-lane groups of x: pad it to the mask width with zeros
    torch::Tensor xp = x2;
    if (width != in_features) {
      xp = torch::zeros({n, width}, x2.options());
      xp.narrow(1, 0, in_features).copy_(x2);
    }
    const float* xd = xp.data_ptr<float>();
    float* yd = y.data_ptr<float>();
    auto body = [&](int64_t r0, int64_t r1) { rows_any(path, p, xd, yd, n, out, r0, r1); };
    if (out * width * n < min_parallel) body(0, out);
    else at::parallel_for(0, out, 16, body);
  } else {
    std::lock_guard<std::mutex> guard(scratch_lock());
    const int64_t t = std::min(tile_rows, out);
    torch::Tensor& buf = scratch();
    if (buf.numel() < t * width) buf = torch::empty({t * width}, torch::kFloat32);
    float* dst = buf.data_ptr<float>();
    for (int64_t r0 = 0; r0 < out; r0 += t) {
      const int64_t r1 = std::min(r0 + t, out);
      unpack_parallel(path, p, dst, width, r0, r1);
      auto tile = buf.narrow(0, 0, (r1 - r0) * width).view({r1 - r0, width}).narrow(1, 0, in_features);
      auto target = y.narrow(1, r0, r1 - r0);  // strides (out, 1): BLAS writes it in place
      at::mm_out(target, x2, tile.t());
    }
  }
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y.to(x.dtype()).reshape(out_shape);
}

// Rows r0..r1 of the weight as a new dense fp32 (r1 - r0, in_features) tensor, by the given path's
// decompression (the same routine prefill uses; tests compare it bit for bit with the reference).
torch::Tensor decompress(const torch::Tensor& values, const torch::Tensor& mask, const torch::Tensor& offsets,
                         const c10::optional<torch::Tensor>& scales, int64_t groupsize, int64_t r0, int64_t r1,
                         int64_t in_features, int64_t path) {
  check_path(path);
  const Packed p = packed(values, mask, offsets, scales, groupsize, in_features);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= mask.size(0), "row range out of bounds");
  const int64_t width = p.row_bytes * 8;
  auto buf = torch::empty({r1 - r0, width}, torch::kFloat32);
  unpack_parallel(path, p, buf.data_ptr<float>(), width, r0, r1);
  return buf.narrow(1, 0, in_features).contiguous();
}

int64_t scratch_bytes() {
  std::lock_guard<std::mutex> guard(scratch_lock());
  return scratch().numel() * 4;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_linear", &sparse_linear, "bitmask sparse x @ W.T + b (fp32 accumulation)");
  m.def("decompress", &decompress, "rows of the packed weight as dense fp32");
  m.def("scratch_bytes", &scratch_bytes, "bytes of the shared prefill scratch tile");
  m.def("cpu_has", &cpu_has, "whether this CPU can run a kernel path");
  m.def("path_id", &path_id, "the id of a kernel path name (-1: unknown)");
}
