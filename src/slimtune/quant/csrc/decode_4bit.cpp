// The 4-bit weight decode of slimtune.quant.nf4.dequantize_4bit for CPUs, bit for bit:
//   out[i] = code[q_i] * absmax[i / blocksize]   (fp32; q_i the i-th nibble, the first of a byte in the high one)
// Built on first use by slimtune.quant.cpu_decode (the system C++ compiler, torch's headers) and called through
// ctypes. The 16-entry code book lives in a vector register: one permute looks up 16 (AVX-512) or 8 (AVX2)
// codes at once, where torch's gather reads the table once per byte. The instruction set is picked at run time,
// so one build serves any x86-64 CPU; other CPUs get the portable loop.
#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SLIMTUNE_X86 1
#endif

namespace {

enum Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Blocks [b0, b1): each is blocksize elements (a multiple of 32) read from blocksize / 2 bytes.
void decode_scalar(const uint8_t* packed, const float* absmax, const float* code, float* out, int64_t b0,
                   int64_t b1, int64_t blocksize) {
  for (int64_t b = b0; b < b1; ++b) {
    const float scale = absmax[b];
    const uint8_t* bytes = packed + b * blocksize / 2;
    float* values = out + b * blocksize;
    for (int64_t j = 0; j < blocksize / 2; ++j) {
      values[2 * j] = code[bytes[j] >> 4] * scale;
      values[2 * j + 1] = code[bytes[j] & 15] * scale;
    }
  }
}

#ifdef SLIMTUNE_X86
__attribute__((target("avx512f"))) void decode_avx512(const uint8_t* packed, const float* absmax, const float* code,
                                                      float* out, int64_t b0, int64_t b1, int64_t blocksize) {
  const __m512 table = _mm512_loadu_ps(code);
  const __m512i low_nibble = _mm512_set1_epi32(15);
  // element 2i is the high nibble of byte i, 2i + 1 its low nibble
  const __m512i first_half = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second_half = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int64_t b = b0; b < b1; ++b) {
    const __m512 scale = _mm512_set1_ps(absmax[b]);
    const uint8_t* bytes = packed + b * blocksize / 2;
    float* values = out + b * blocksize;
    for (int64_t j = 0; j < blocksize; j += 32) {  // 16 bytes, 32 values
      const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + j / 2)));
      const __m512 high = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(wide, 4), table), scale);
      const __m512 low = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(wide, low_nibble), table), scale);
      _mm512_storeu_ps(values + j, _mm512_permutex2var_ps(high, first_half, low));
      _mm512_storeu_ps(values + j + 16, _mm512_permutex2var_ps(high, second_half, low));
    }
  }
}

// code[index] for 8 indices in [0, 16): two 8-entry permutes, bit 3 of the index picks one.
__attribute__((target("avx2"))) inline __m256 lookup_avx2(__m256i index, __m256 table_low, __m256 table_high) {
  const __m256 low = _mm256_permutevar8x32_ps(table_low, index);  // reads index & 7
  const __m256 high = _mm256_permutevar8x32_ps(table_high, index);
  return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
}

__attribute__((target("avx2"))) void decode_avx2(const uint8_t* packed, const float* absmax, const float* code,
                                                 float* out, int64_t b0, int64_t b1, int64_t blocksize) {
  const __m256 table_low = _mm256_loadu_ps(code), table_high = _mm256_loadu_ps(code + 8);
  const __m256i low_nibble = _mm256_set1_epi32(15);
  for (int64_t b = b0; b < b1; ++b) {
    const __m256 scale = _mm256_set1_ps(absmax[b]);
    const uint8_t* bytes = packed + b * blocksize / 2;
    float* values = out + b * blocksize;
    for (int64_t j = 0; j < blocksize; j += 16) {  // 8 bytes, 16 values
      const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + j / 2)));
      const __m256 high = _mm256_mul_ps(lookup_avx2(_mm256_srli_epi32(wide, 4), table_low, table_high), scale);
      const __m256 low = _mm256_mul_ps(lookup_avx2(_mm256_and_si256(wide, low_nibble), table_low, table_high), scale);
      const __m256 pairs_a = _mm256_unpacklo_ps(high, low), pairs_b = _mm256_unpackhi_ps(high, low);  // per 128 bits
      _mm256_storeu_ps(values + j, _mm256_permute2f128_ps(pairs_a, pairs_b, 0x20));
      _mm256_storeu_ps(values + j + 8, _mm256_permute2f128_ps(pairs_a, pairs_b, 0x31));
    }
  }
}
#endif

// GEMV for a few rows: y[m, o] = sum_i x[m, i] * W[o, i] for m < rows (at most kGemvRows) and output features
// [o0, o1), W decoded on the fly (each row of W whole blocks: in % blocksize == 0): each packed byte is read once
// and no fp32 weight is written. x (rows, in) and y (rows, out), fp32, row-major.
constexpr int64_t kGemvRows = 8;

void gemv_scalar(const float* x, int64_t rows, const uint8_t* packed, const float* absmax, const float* code,
                 float* y, int64_t o0, int64_t o1, int64_t out, int64_t in, int64_t blocksize) {
  for (int64_t o = o0; o < o1; ++o) {
    float acc[kGemvRows] = {0};
    const uint8_t* bytes = packed + o * in / 2;
    for (int64_t i = 0; i < in; i += 2) {
      const float scale = absmax[(o * in + i) / blocksize];
      const float high = code[bytes[i / 2] >> 4] * scale, low = code[bytes[i / 2] & 15] * scale;
      for (int64_t m = 0; m < rows; ++m) acc[m] += high * x[m * in + i] + low * x[m * in + i + 1];
    }
    for (int64_t m = 0; m < rows; ++m) y[m * out + o] = acc[m];
  }
}

#ifdef SLIMTUNE_X86
__attribute__((target("avx512f"))) void gemv_avx512(const float* x, int64_t rows, const uint8_t* packed,
                                                    const float* absmax, const float* code, float* y, int64_t o0,
                                                    int64_t o1, int64_t out, int64_t in, int64_t blocksize) {
  const __m512 table = _mm512_loadu_ps(code);
  const __m512i low_nibble = _mm512_set1_epi32(15);
  const __m512i first_half = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second_half = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int64_t o = o0; o < o1; ++o) {
    __m512 acc[kGemvRows];
    for (int64_t m = 0; m < rows; ++m) acc[m] = _mm512_setzero_ps();
    const uint8_t* bytes = packed + o * in / 2;
    const float* scales = absmax + o * in / blocksize;
    for (int64_t b = 0; b < in / blocksize; ++b) {
      const __m512 scale = _mm512_set1_ps(scales[b]);
      for (int64_t j = b * blocksize; j < (b + 1) * blocksize; j += 32) {
        const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + j / 2)));
        const __m512 high = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(wide, 4), table), scale);
        const __m512 low = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(wide, low_nibble), table), scale);
        const __m512 w0 = _mm512_permutex2var_ps(high, first_half, low);
        const __m512 w1 = _mm512_permutex2var_ps(high, second_half, low);
        for (int64_t m = 0; m < rows; ++m) {
          acc[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * in + j), acc[m]);
          acc[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * in + j + 16), acc[m]);
        }
      }
    }
    for (int64_t m = 0; m < rows; ++m) y[m * out + o] = _mm512_reduce_add_ps(acc[m]);
  }
}
#endif

int detect_isa() {
#ifdef SLIMTUNE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2")) return kAvx2;
#endif
  return kScalar;
}

}  // namespace

extern "C" {

// The best instruction set this CPU offers (the value slimtune_decode_4bit uses with isa_cap >= 2).
int slimtune_decode_isa() {
  static const int isa = detect_isa();
  return isa;
}

// Decodes n values: whole blocks split across torch's intra-op threads (grain: blocks per task at least), then
// the short last block, if any. Returns the instruction set used (min(isa_cap, slimtune_decode_isa())).
int slimtune_decode_4bit(const uint8_t* packed, const float* absmax, const float* code, float* out, int64_t n,
                         int64_t blocksize, int64_t grain, int isa_cap) {
  const int isa = isa_cap < slimtune_decode_isa() ? isa_cap : slimtune_decode_isa();
  const int64_t blocks = n / blocksize;
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
#ifdef SLIMTUNE_X86
    if (isa == kAvx512) return decode_avx512(packed, absmax, code, out, b0, b1, blocksize);
    if (isa == kAvx2) return decode_avx2(packed, absmax, code, out, b0, b1, blocksize);
#endif
    decode_scalar(packed, absmax, code, out, b0, b1, blocksize);
  });
  for (int64_t i = blocks * blocksize; i < n; ++i) {
    const uint8_t byte = packed[i / 2];
    out[i] = code[i % 2 ? byte & 15 : byte >> 4] * absmax[blocks];
  }
  return isa;
}

// y (rows, out) = x (rows, in) W^T for rows <= 8 and in % blocksize == 0 (returns -1 otherwise, writing nothing),
// output features split across torch's intra-op threads. Returns the instruction set used: AVX-512 or the portable
// loop (an AVX2 CPU is better served by slimtune_decode_4bit and a BLAS matmul).
int slimtune_gemv_4bit(const float* x, int64_t rows, const uint8_t* packed, const float* absmax, const float* code,
                       float* y, int64_t out, int64_t in, int64_t blocksize, int64_t grain, int isa_cap) {
  if (rows < 1 || rows > kGemvRows || in % blocksize != 0) return -1;
  const int isa = isa_cap >= kAvx512 && slimtune_decode_isa() == kAvx512 ? kAvx512 : kScalar;
  at::parallel_for(0, out, grain, [&](int64_t o0, int64_t o1) {
#ifdef SLIMTUNE_X86
    if (isa == kAvx512) return gemv_avx512(x, rows, packed, absmax, code, y, o0, o1, out, in, blocksize);
#endif
    gemv_scalar(x, rows, packed, absmax, code, y, o0, o1, out, in, blocksize);
  });
  return isa;
}

}  // extern "C"
