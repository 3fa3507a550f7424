// Bitmask-compressed sparse linear kernels for the CPU: matrix-vector products for decoding and tile
// decompression + BLAS for prefill.
// Layout (see sparse_linear.py): values concatenated row-major (fp32 or bf16, padded with 16 zeros at the
// end so vector loads never leave the buffer), mask packed little-endian, row_bytes bytes per row (a
// multiple of 8), offsets[r] = index of row r's first value. One build holds every path; the AVX paths use
// function-level target attributes and are chosen at run time (path ids: 0 portable, 1 avx2, 2 avx512).
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
      __m256 acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
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

struct Packed {
  const void* vals;
  bool bf16;
  const uint8_t* mask;
  const int64_t* offs;
  int64_t row_bytes;
};

Packed packed(const torch::Tensor& values, const torch::Tensor& mask, const torch::Tensor& offsets) {
  TORCH_CHECK(mask.dtype() == torch::kUInt8 && mask.dim() == 2 && mask.is_contiguous(),
              "mask must be contiguous 2-D uint8");
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.is_contiguous() && offsets.numel() == mask.size(0) + 1,
              "offsets must be contiguous int64 with one entry per row plus one");
  TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
  TORCH_CHECK(mask.size(1) % 8 == 0, "mask rows must be a multiple of 8 bytes");
  const bool bf16 = values.dtype() == torch::kBFloat16;
  TORCH_CHECK(bf16 || values.dtype() == torch::kFloat32, "values must be fp32 or bf16");
  return {values.data_ptr(), bf16, mask.data_ptr<uint8_t>(), offsets.data_ptr<int64_t>(), mask.size(1)};
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

// Rows r0..r1 into dst (row stride ld), in parallel over rows (a row is whole-cache-line work).
void unpack_parallel(int64_t path, const Packed& p, float* dst, int64_t ld, int64_t r0, int64_t r1) {
  at::parallel_for(r0, r1, 8, [&](int64_t a, int64_t b) {
    if (p.bf16) unpack_dispatch<uint16_t>(path, p, dst + (a - r0) * ld, ld, a, b);
    else unpack_dispatch<float>(path, p, dst + (a - r0) * ld, ld, a, b);
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
                            int64_t in_features, int64_t path, int64_t decode_max, int64_t tile_rows,
                            int64_t min_parallel) {
  check_path(path);
  const Packed p = packed(values, mask, offsets);
  const int64_t out = mask.size(0);
  const int64_t width = p.row_bytes * 8;
  TORCH_CHECK(in_features <= width, "in_features exceeds the mask width");
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
    auto body = [&](int64_t r0, int64_t r1) {
      if (p.bf16) rows_dispatch<uint16_t>(path, p, xd, yd, n, out, r0, r1);
      else rows_dispatch<float>(path, p, xd, yd, n, out, r0, r1);
    };
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
                         int64_t r0, int64_t r1, int64_t in_features, int64_t path) {
  check_path(path);
  const Packed p = packed(values, mask, offsets);
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
