// Bitmask-compressed sparse matrix-vector kernels for CPU decoding.
// Layout (see sparse_linear.py): values concatenated row-major (fp32 or bf16,
// padded with 16 zeros at the end so vector loads never leave the buffer),
// mask packed little-endian, row_bytes bytes per row (a multiple of 8),
// offsets[r] = index of row r's first value. x is fp32 (batch, row_bytes*8),
// zero-padded past in_features. One build holds every path; AVX paths use
// function-level target attributes and are chosen at run time.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace {

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

// lut[m][i]: rank of bit i among the set bits of m (the index of the packed value for lane i).
struct Lut {
  alignas(32) int32_t idx[256][8];
  Lut() {
    for (int m = 0; m < 256; ++m) {
      int c = 0;
      for (int i = 0; i < 8; ++i) {
        idx[m][i] = (m >> i) & 1 ? c : 0;
        if ((m >> i) & 1) ++c;
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

template <typename V>
__attribute__((target("avx2,fma"))) void avx2_rows(const V* vals, const uint8_t* mask, const int64_t* offs,
                                                   const float* x, float* y, int64_t batch, int64_t out,
                                                   int64_t row_bytes, int64_t r0, int64_t r1) {
  const Lut& L = lut();
  const int64_t xs = row_bytes * 8;
  const __m256i lanebits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * row_bytes;
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * xs;
      const V* v = vals + offs[r];
      __m256 acc = _mm256_setzero_ps();
      for (int64_t k = 0; k < row_bytes; ++k) {
        const unsigned bits = m[k];
        if (!bits) continue;
        __m256 raw = load8_avx2(v);
        __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(L.idx[bits]));
        __m256 e = _mm256_permutevar8x32_ps(raw, perm);
        __m256i sel = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), lanebits), lanebits);
        e = _mm256_and_ps(e, _mm256_castsi256_ps(sel));
        acc = _mm256_fmadd_ps(e, _mm256_loadu_ps(xb + k * 8), acc);
        v += __builtin_popcount(bits);
      }
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
      y[b * out + r] = _mm_cvtss_f32(s);
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
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < words; ++k) {
        uint16_t w;
        std::memcpy(&w, m + 2 * k, 2);
        if (!w) continue;
        __m512 e = expand16(v, static_cast<__mmask16>(w));
        acc = _mm512_fmadd_ps(e, _mm512_loadu_ps(xb + k * 16), acc);
        v += __builtin_popcount(w);
      }
      y[b * out + r] = _mm512_reduce_add_ps(acc);
    }
  }
}

bool cpu_has(const std::string& path) {
  __builtin_cpu_init();
  if (path == "portable") return true;
  if (path == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (path == "avx512") return __builtin_cpu_supports("avx512f");
  return false;
}

template <typename V>
void dispatch(const std::string& path, const V* vals, const uint8_t* mask, const int64_t* offs,
              const float* x, float* y, int64_t batch, int64_t out, int64_t row_bytes) {
  at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
    if (path == "avx512") avx512_rows<V>(vals, mask, offs, x, y, batch, out, row_bytes, r0, r1);
    else if (path == "avx2") avx2_rows<V>(vals, mask, offs, x, y, batch, out, row_bytes, r0, r1);
    else portable_rows<V>(vals, mask, offs, x, y, batch, out, row_bytes, r0, r1);
  });
}

}  // namespace

torch::Tensor sparse_matmul(torch::Tensor values, torch::Tensor mask, torch::Tensor offsets, torch::Tensor x,
                            int64_t out_features, std::string path) {
  TORCH_CHECK(path == "portable" || path == "avx2" || path == "avx512", "unknown kernel path ", path);
  TORCH_CHECK(cpu_has(path), "this CPU does not support the ", path, " kernel path");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous 2-D fp32");
  TORCH_CHECK(mask.dtype() == torch::kUInt8 && mask.is_contiguous(), "mask must be contiguous uint8");
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.is_contiguous(), "offsets must be int64");
  TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
  const int64_t row_bytes = mask.size(1);
  TORCH_CHECK(row_bytes % 8 == 0 && x.size(1) == row_bytes * 8, "x must be padded to the mask width");
  const int64_t batch = x.size(0);
  auto y = torch::empty({batch, out_features}, x.options());
  if (values.dtype() == torch::kFloat32) {
    dispatch<float>(path, values.data_ptr<float>(), mask.data_ptr<uint8_t>(), offsets.data_ptr<int64_t>(),
                    x.data_ptr<float>(), y.data_ptr<float>(), batch, out_features, row_bytes);
  } else if (values.dtype() == torch::kBFloat16) {
    dispatch<uint16_t>(path, reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>()),
                       mask.data_ptr<uint8_t>(), offsets.data_ptr<int64_t>(), x.data_ptr<float>(),
                       y.data_ptr<float>(), batch, out_features, row_bytes);
  } else {
    TORCH_CHECK(false, "values must be fp32 or bf16");
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_matmul", &sparse_matmul, "bitmask sparse x @ W.T (fp32 accumulation)");
  m.def("cpu_has", &cpu_has, "whether this CPU can run a kernel path");
}
