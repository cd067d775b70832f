// Fast CPU matrix products against MLX's affine-quantized weights (bits 4 or 8, any group size that is a multiple
// of 32): x [..., K] float32 times w^T, where w [N, K] is packed the way mx.quantize packs it (uint32 words, element
// j of a row in bits j*bits.. of its word, little-endian) with float32 or float16 scales and biases per group, so that
// w[n, k] = scale[n, k / group] * q[n, k] + bias[n, k / group]. Same result as mx.quantized_matmul(x, w, scales,
// biases, transpose=True), up to float32 summation order.
//
// Why: MLX's CPU quantized kernels are scalar loops (3.5x slower than float32 BLAS here), while a decode step is
// bound by the bytes of weight it reads. This kernel decodes each 32-weight chunk once, into float32 vectors, and
// multiplies it into every row of x (a decode batch is 1-16 rows), on all cores (OpenMP over output rows).
// x86-64 with AVX2 (AVX-512 where the compiler targets it); GCC/Clang vector extensions for the arithmetic.

#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include <immintrin.h>
#include <omp.h>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

typedef float v16f __attribute__((vector_size(64)));

constexpr int CHUNK = 32;   // weights decoded at once
constexpr int MAX_ROWS = 8; // rows of x that share one decoded chunk (accumulators live in registers)

inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// A tree, not a chain of 15 dependent adds (that chain was a fifth of a 576-wide row's time).
inline float hsum(v16f v) {
#if defined(__AVX512F__)
  __m512 m;
  std::memcpy(&m, &v, sizeof(m));
  return _mm512_reduce_add_ps(m);
#else
  __m256 lo, hi;
  std::memcpy(&lo, &v, 32);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
  __m256 s8 = _mm256_add_ps(lo, hi);
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  return _mm_cvtss_f32(s4);
#endif
}

// 16 unsigned bytes as 16 floats. GCC turns a generic byte-vector conversion into scalar code, hence intrinsics.
inline v16f bytes_to_floats(__m128i bytes) {
#if defined(__AVX512F__)
  __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
  v16f v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#else
  __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
  __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)));
  v16f v;
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#endif
}

// Chunk j of a row as two 16-float vectors, in the order `xprep` puts x in: 8-bit elements 0-15 and 16-31, 4-bit
// the even elements then the odd ones (low and high nibbles of the same 16 bytes).
template <int BITS>
inline void decode(const uint8_t* bytes, v16f& a, v16f& b) {
  if constexpr (BITS == 8) {
    a = bytes_to_floats(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    b = bytes_to_floats(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16)));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
    const __m128i low4 = _mm_set1_epi8(15);
    a = bytes_to_floats(_mm_and_si128(raw, low4));
    b = bytes_to_floats(_mm_and_si128(_mm_srli_epi16(raw, 4), low4));
  }
}

// x reordered per 32-chunk to match `decode`, and its sum per group (the bias term: bias * sum(x) over the group).
void xprep(const float* x, int rows, int K, int group, int bits, float* xp, float* xsum) {
  int groups = K / group;
  for (int m = 0; m < rows; ++m) {
    const float* xr = x + (size_t)m * K;
    float* out = xp + (size_t)m * K;
    for (int c = 0; c < K; c += CHUNK) {
      if (bits == 8) {
        std::memcpy(out + c, xr + c, CHUNK * sizeof(float));
      } else {
        for (int i = 0; i < 16; ++i) {
          out[c + i] = xr[c + 2 * i];
          out[c + 16 + i] = xr[c + 2 * i + 1];
        }
      }
    }
    for (int g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int i = 0; i < group; ++i) s += xr[g * group + i];
      xsum[(size_t)m * groups + g] = s;
    }
  }
}

inline float as_float(float v) { return v; }
inline float as_float(uint16_t half) { return _cvtsh_ss(half); }

// Output rows n0..n1 for R rows of x, NR output rows at a time (independent chains for the out-of-order core, and
// each x chunk loaded once for all of them). Scales and biases are float32, or float16 (S = uint16_t), as GGUF
// stores them.
template <int BITS, int R, int NR, typename S>
void rows_tile(const float* xp, const float* xsum, const uint8_t* w, const S* scales, const S* biases, float* out,
               int K, int N, int group, int n0, int n1) {
  const int groups = K / group;
  const size_t row_bytes = (size_t)K * BITS / 8;
  int n = n0;
  for (; n + NR <= n1; n += NR) {
    v16f acc[NR][R];
    float bias_term[NR][R];
    for (int i = 0; i < NR; ++i)
      for (int r = 0; r < R; ++r) acc[i][r] = v16f{}, bias_term[i][r] = 0.f;
    for (int g = 0; g < groups; ++g) {
      v16f part[NR][R];
      for (int i = 0; i < NR; ++i)
        for (int r = 0; r < R; ++r) part[i][r] = v16f{};
      for (int c = g * group; c < (g + 1) * group; c += CHUNK) {
        v16f a[NR], b[NR];
        for (int i = 0; i < NR; ++i) decode<BITS>(w + (size_t)(n + i) * row_bytes + (size_t)c * BITS / 8, a[i], b[i]);
        for (int r = 0; r < R; ++r) {
          const v16f x0 = load16(xp + (size_t)r * K + c), x1 = load16(xp + (size_t)r * K + c + 16);
          for (int i = 0; i < NR; ++i) part[i][r] += a[i] * x0 + b[i] * x1;
        }
      }
      for (int i = 0; i < NR; ++i) {
        const float s = as_float(scales[(size_t)(n + i) * groups + g]);
        const float bias = as_float(biases[(size_t)(n + i) * groups + g]);
        for (int r = 0; r < R; ++r) {
          acc[i][r] += s * part[i][r];
          bias_term[i][r] += bias * xsum[(size_t)r * groups + g];  // beside the vector work, not after it
        }
      }
    }
    for (int i = 0; i < NR; ++i)
      for (int r = 0; r < R; ++r) out[(size_t)r * N + n + i] = hsum(acc[i][r]) + bias_term[i][r];
  }
  if constexpr (NR > 1) {
    if (n < n1) rows_tile<BITS, R, 1>(xp, xsum, w, scales, biases, out, K, N, group, n, n1);
  }
}

// Output rows in flight per row count of x: more where the accumulators leave registers to spare (32 on AVX-512).
// One decode row, 30 different 576x576 4-bit matrices: 16.9 us a product with one output row at a time, 13.0 with 4.
template <int BITS, typename S>
void tile_dispatch(int R, const float* xp, const float* xsum, const uint8_t* w, const S* s, const S* b, float* out,
                   int K, int N, int group, int n0, int n1) {
  switch (R) {
    case 1: return rows_tile<BITS, 1, 4>(xp, xsum, w, s, b, out, K, N, group, n0, n1);
    case 2: return rows_tile<BITS, 2, 4>(xp, xsum, w, s, b, out, K, N, group, n0, n1);
    case 3: return rows_tile<BITS, 3, 2>(xp, xsum, w, s, b, out, K, N, group, n0, n1);
    case 4: return rows_tile<BITS, 4, 2>(xp, xsum, w, s, b, out, K, N, group, n0, n1);
    case 5: return rows_tile<BITS, 5, 1>(xp, xsum, w, s, b, out, K, N, group, n0, n1);
    case 6: return rows_tile<BITS, 6, 1>(xp, xsum, w, s, b, out, K, N, group, n0, n1);
    case 7: return rows_tile<BITS, 7, 1>(xp, xsum, w, s, b, out, K, N, group, n0, n1);
    default: return rows_tile<BITS, 8, 1>(xp, xsum, w, s, b, out, K, N, group, n0, n1);
  }
}

// ---- 8-bit activations (AVX-512 VNNI) ---------------------------------------------------------------------------
// What llama.cpp does on x86: x is rounded to int8 per 32-chunk (symmetric, d = max|x| / 127, as GGUF's Q8_0), and
// each 64 weights times 64 x values is one vpdpbusd (unsigned weight bytes times signed x bytes, summed in int32
// lanes of four), instead of unpacking weights into floats for 2 x 16 float multiply-adds per row of x. The
// weights' own values are unchanged; x loses about 1/254 of its largest value per chunk, which moves a logit by
// about what float16 activations would.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define SOLVERX_INT8_X 1

constexpr int PAIR = 64;  // weights per vpdpbusd: two 32-chunks

// Pair p of a row as 64 unsigned bytes. 4-bit: [c0 even, c1 even, c0 odd, c1 odd] elements (16 each: low nibbles
// of both chunks' 32 bytes, then high nibbles), so int32 lanes 0-3 and 8-11 sum chunk 0, lanes 4-7 and 12-15 chunk
// 1. 8-bit: the 64 bytes as they are, lanes 0-7 chunk 0 and 8-15 chunk 1.
template <int BITS>
inline __m512i decode_pair(const uint8_t* bytes) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512(bytes);
  } else {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
    return _mm512_and_si512(both, _mm512_set1_epi8(15));
  }
}

// The int32 lanes that belong to a pair's second chunk (see decode_pair).
template <int BITS>
constexpr __mmask16 SECOND_CHUNK = BITS == 8 ? 0xFF00 : 0xF0F0;

// x rounded to int8 in decode_pair's order, with each lane's chunk scale d (16 floats per pair) and the rounded
// x's sum per weight group (the bias term).
void xprep_int8(const float* x, int rows, int K, int group, int bits, int8_t* xq, float* xd, float* xsum) {
  const int groups = K / group, pairs = K / PAIR;
  std::vector<float> chunk_sums(K / CHUNK);
  for (int m = 0; m < rows; ++m) {
    const float* xr = x + (size_t)m * K;
    for (int p = 0; p < pairs; ++p) {
      int8_t* q = xq + (size_t)m * K + (size_t)p * PAIR;
      float* d = xd + ((size_t)m * pairs + p) * 16;
      for (int half = 0; half < 2; ++half) {
        const float* c = xr + p * PAIR + half * CHUNK;
        float amax = 0.f;
        for (int i = 0; i < CHUNK; ++i) amax = std::max(amax, std::fabs(c[i]));
        const float step = amax / 127.f, inverse = amax > 0.f ? 127.f / amax : 0.f;
        int total = 0;
        for (int i = 0; i < CHUNK; ++i) {
          const int8_t v = (int8_t)std::nearbyint(c[i] * inverse);
          total += v;
          // 4-bit: element i of chunk `half` goes to the even or odd block of 16 for that chunk
          const int at = bits == 8 ? half * CHUNK + i : (i % 2) * 32 + half * 16 + i / 2;
          q[at] = v;
        }
        const __mmask16 second = bits == 8 ? SECOND_CHUNK<8> : SECOND_CHUNK<4>;
        for (int lane = 0; lane < 16; ++lane)
          if (((second >> lane) & 1) == half) d[lane] = step;
        // The bias term takes the sum of the rounded x, as llama.cpp's Q8_1 does: w = s * q + bias with q in
        // [0, 15] is far from centred, so s * sum(q * rounding error) cancels only against bias * the same error.
        chunk_sums[p * 2 + half] = step * (float)total;
      }
    }
    float* sums = xsum + (size_t)m * groups;
    for (int g = 0; g < groups; ++g) sums[g] = 0.f;
    for (int c = 0; c < K / CHUNK; ++c) sums[c * CHUNK / group] += chunk_sums[c];
  }
}

inline __m512 load_scales(const float* s, int count) {
  return _mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1), s);
}
inline __m512 load_scales(const uint16_t* s, int count) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << count) - 1), s));
}

// sum over groups of bias[g] * xsum[g], 16 groups at a time.
template <typename S>
inline float bias_dot(const S* bias, const float* xsum, int groups) {
  __m512 acc = _mm512_setzero_ps();
  for (int g = 0; g < groups; g += 16) {
    const int count = std::min(16, groups - g);
    acc = _mm512_fmadd_ps(load_scales(bias + g, count), load_scales(xsum + g, count), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

template <int BITS, int R, int NR, typename S>
void rows_tile_int8(const int8_t* xq, const float* xd, const float* xsum, const uint8_t* w, const S* scales,
                    const S* biases, float* out, int K, int N, int group, int n0, int n1) {
  const int groups = K / group, pairs = K / PAIR, chunks_per_group = group / CHUNK;
  const size_t row_bytes = (size_t)K * BITS / 8;
  int n = n0;
  for (; n + NR <= n1; n += NR) {
    __m512 acc[NR][R];
    for (int i = 0; i < NR; ++i)
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
    for (int p = 0; p < pairs; ++p) {
      __m512i wv[NR];
      __m512 ws[NR];
      const int g0 = 2 * p / chunks_per_group, g1 = (2 * p + 1) / chunks_per_group;
      for (int i = 0; i < NR; ++i) {
        wv[i] = decode_pair<BITS>(w + (size_t)(n + i) * row_bytes + (size_t)p * PAIR * BITS / 8);
        const S* srow = scales + (size_t)(n + i) * groups;
        ws[i] = _mm512_mask_blend_ps(SECOND_CHUNK<BITS>, _mm512_set1_ps(as_float(srow[g0])),
                                     _mm512_set1_ps(as_float(srow[g1])));
      }
      for (int r = 0; r < R; ++r) {
        const __m512i xv = _mm512_loadu_si512(xq + (size_t)r * K + (size_t)p * PAIR);
        const __m512 dv = _mm512_loadu_ps(xd + ((size_t)r * pairs + p) * 16);
        for (int i = 0; i < NR; ++i) {
          const __m512i dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[i], xv);
          acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_mul_ps(ws[i], dv), acc[i][r]);
        }
      }
    }
    for (int i = 0; i < NR; ++i)
      for (int r = 0; r < R; ++r)
        out[(size_t)r * N + n + i] = _mm512_reduce_add_ps(acc[i][r]) +
                                     bias_dot(biases + (size_t)(n + i) * groups, xsum + (size_t)r * groups, groups);
  }
  if constexpr (NR > 1) {
    if (n < n1) rows_tile_int8<BITS, R, 1>(xq, xd, xsum, w, scales, biases, out, K, N, group, n, n1);
  }
}

template <int BITS, typename S>
void tile_dispatch_int8(int R, const int8_t* xq, const float* xd, const float* xsum, const uint8_t* w, const S* s,
                        const S* b, float* out, int K, int N, int group, int n0, int n1) {
  switch (R) {
    case 1: return rows_tile_int8<BITS, 1, 4>(xq, xd, xsum, w, s, b, out, K, N, group, n0, n1);
    case 2: return rows_tile_int8<BITS, 2, 4>(xq, xd, xsum, w, s, b, out, K, N, group, n0, n1);
    case 3: return rows_tile_int8<BITS, 3, 4>(xq, xd, xsum, w, s, b, out, K, N, group, n0, n1);
    case 4: return rows_tile_int8<BITS, 4, 2>(xq, xd, xsum, w, s, b, out, K, N, group, n0, n1);
    case 5: return rows_tile_int8<BITS, 5, 2>(xq, xd, xsum, w, s, b, out, K, N, group, n0, n1);
    case 6: return rows_tile_int8<BITS, 6, 2>(xq, xd, xsum, w, s, b, out, K, N, group, n0, n1);
    case 7: return rows_tile_int8<BITS, 7, 2>(xq, xd, xsum, w, s, b, out, K, N, group, n0, n1);
    default: return rows_tile_int8<BITS, 8, 2>(xq, xd, xsum, w, s, b, out, K, N, group, n0, n1);
  }
}
#endif

// Per-sequence LoRA deltas: row m belongs to sequence m / per_seq, which uses slot ids[seq] of the stacks
// a [slots, K, r] and b [slots, r, N], with that slot's scale (0 = no adapter: the row gets nothing). The
// Punica/S-LoRA gather of solverx.engine.lora for decode-sized inputs, without two graph nodes per projection:
// t = scale * x @ a[slot] first (M x r numbers), then each block of output rows adds t @ b[slot] for its own
// columns, on whichever core computes that block.
struct LoraPlan {
  const float* b = nullptr;  // nullptr: no LoRA
  int r = 0;
  std::vector<float> t;                 // [M, r], scaled
  std::vector<const float*> b_of_row;   // b[slot] per row, nullptr where the row has no adapter
};

LoraPlan plan_lora(const float* x, const float* a, const float* b, const float* lscale, const uint32_t* ids, int M,
                   int K, int N, int r, int per_seq) {
  LoraPlan plan;
  plan.b = b;
  plan.r = r;
  plan.t.assign((size_t)M * r, 0.f);
  plan.b_of_row.assign(M, nullptr);
  for (int m = 0; m < M; ++m) {
    const uint32_t slot = ids[m / per_seq];
    const float s = lscale[slot];
    if (s == 0.f) continue;
    const float* as = a + (size_t)slot * K * r;
    const float* xr = x + (size_t)m * K;
    float* t = plan.t.data() + (size_t)m * r;
    if (r % 8 == 0 && r <= 64) {  // the usual ranks: a row of a in whole 8-float vectors, kept in registers
      v8f acc[8] = {};
      const int vectors = r / 8;
      for (int k = 0; k < K; ++k) {
        const float xk = xr[k];
        const float* ak = as + (size_t)k * r;
        for (int c = 0; c < vectors; ++c) acc[c] += xk * load8(ak + 8 * c);
      }
      for (int c = 0; c < vectors; ++c) std::memcpy(t + 8 * c, &acc[c], sizeof(v8f));
    } else {
      for (int k = 0; k < K; ++k) {
        const float xk = xr[k];
        const float* ak = as + (size_t)k * r;
        for (int j = 0; j < r; ++j) t[j] += xk * ak[j];
      }
    }
    for (int j = 0; j < r; ++j) t[j] *= s;
    plan.b_of_row[m] = b + (size_t)slot * r * N;
  }
  return plan;
}

inline void add_lora_columns(const LoraPlan& plan, float* out, int M, int N, int n0, int n1) {
  for (int m = 0; m < M; ++m) {
    const float* bs = plan.b_of_row[m];
    if (bs == nullptr) continue;
    const float* t = plan.t.data() + (size_t)m * plan.r;
    float* orow = out + (size_t)m * N;
    for (int j = 0; j < plan.r; ++j) {
      const float tj = t[j];
      const float* bj = bs + (size_t)j * N;
      for (int n = n0; n < n1; ++n) orow[n] += tj * bj[n];
    }
  }
}

// Below this many multiply-adds a product runs on one core (the 192x576 k/v projections of one decode row): waking
// the other cores costs about what it saves. Measured on 2 cores, the default base's decode step: all products on
// one core 20.9-22.3 ms at batch 1 and 64-67 ms at batch 8; with this limit 20.2-21.4 ms and 47-50 ms.
constexpr size_t PARALLEL_WORK = 300000;

// Threads a product may use (0: OpenMP's default, every core). Processes that share the machine's cores (local
// training ranks, answering processes) each set their share, as they do for OpenBLAS.
std::atomic<int> kernel_threads{0};

inline int threads_to_use() {
  const int set = kernel_threads.load();
  return set > 0 ? set : omp_get_max_threads();
}

template <typename S>
void qmm(const float* x, const uint8_t* w, const S* scales, const S* biases, float* out, int M, int K, int N,
         int group, int bits, bool quantize_x, const LoraPlan& lora) {
  const int groups = K / group;
#ifdef SOLVERX_INT8_X
  const bool int8_x = quantize_x && K % PAIR == 0;
#else
  const bool int8_x = false;
  (void)quantize_x;
#endif
  std::vector<float> xp, xd, xsum((size_t)M * groups);
  std::vector<int8_t> xq;
  if (int8_x) {
#ifdef SOLVERX_INT8_X
    xq.resize((size_t)M * K);
    xd.resize((size_t)M * (K / PAIR) * 16);
    xprep_int8(x, M, K, group, bits, xq.data(), xd.data(), xsum.data());
#endif
  } else {
    xp.resize((size_t)M * K);
    xprep(x, M, K, group, bits, xp.data(), xsum.data());
  }
  // Output rows in blocks of 16 (a cache line of results per x row), spread over the cores.
  const int blocks = (N + 15) / 16;
  const bool parallel = (size_t)M * N * K >= PARALLEL_WORK;
#pragma omp parallel for schedule(static) if (parallel) num_threads(threads_to_use())
  for (int blk = 0; blk < blocks; ++blk) {
    const int n0 = blk * 16, n1 = std::min(N, n0 + 16);
    for (int m0 = 0; m0 < M; m0 += MAX_ROWS) {
      const int R = std::min(MAX_ROWS, M - m0);
      const float* xsm = xsum.data() + (size_t)m0 * groups;
      float* om = out + (size_t)m0 * N;
      if (int8_x) {
#ifdef SOLVERX_INT8_X
        const int8_t* xqm = xq.data() + (size_t)m0 * K;
        const float* xdm = xd.data() + (size_t)m0 * (K / PAIR) * 16;
        if (bits == 8)
          tile_dispatch_int8<8>(R, xqm, xdm, xsm, w, scales, biases, om, K, N, group, n0, n1);
        else
          tile_dispatch_int8<4>(R, xqm, xdm, xsm, w, scales, biases, om, K, N, group, n0, n1);
#endif
      } else {
        const float* xpm = xp.data() + (size_t)m0 * K;
        if (bits == 8)
          tile_dispatch<8>(R, xpm, xsm, w, scales, biases, om, K, N, group, n0, n1);
        else
          tile_dispatch<4>(R, xpm, xsm, w, scales, biases, om, K, N, group, n0, n1);
      }
    }
    if (lora.b != nullptr) add_lora_columns(lora, out, M, N, n0, n1);
  }
}

// The elements of a strided float32 view in row-major order.
void gather(const mx::array& x, float* dst) {
  const int ndim = x.ndim();
  std::vector<int64_t> index(ndim, 0);
  const float* src = x.data<float>();
  for (size_t i = 0; i < x.size(); ++i) {
    int64_t offset = 0;
    for (int d = 0; d < ndim; ++d) offset += index[d] * x.strides()[d];
    dst[i] = src[offset];
    for (int d = ndim - 1; d >= 0; --d) {
      if (++index[d] < x.shape(d)) break;
      index[d] = 0;
    }
  }
}

class CpuQuantizedMatmul : public mx::Primitive {
 public:
  CpuQuantizedMatmul(mx::Stream stream, int group, int bits, bool quantize_x)
      : mx::Primitive(stream), group_(group), bits_(bits), quantize_x_(quantize_x) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& x = inputs[0];
    auto& w = inputs[1];
    auto& scales = inputs[2];
    auto& biases = inputs[3];
    auto& out = outputs[0];
    if (!w.flags().row_contiguous || !scales.flags().row_contiguous || !biases.flags().row_contiguous)
      throw std::invalid_argument("w, scales and biases must be row-contiguous arrays");
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(w);
    encoder.set_input_array(scales);
    encoder.set_input_array(biases);
    encoder.set_output_array(out);
    const bool lora = inputs.size() == 8;
    std::vector<mx::array> extra;
    for (size_t i = 4; i < inputs.size(); ++i) {
      if (!inputs[i].flags().row_contiguous) throw std::invalid_argument("LoRA stacks must be row-contiguous");
      encoder.set_input_array(inputs[i]);
      extra.push_back(mx::array::unsafe_weak_copy(inputs[i]));
    }
    const int K = x.shape(-1), N = out.shape(-1), M = (int)(x.size() / K);
    const int per_seq = lora ? M / (int)inputs[7].size() : 1;
    const int r = lora ? inputs[4].shape(-1) : 0;
    encoder.dispatch([x = mx::array::unsafe_weak_copy(x), w = mx::array::unsafe_weak_copy(w),
                      s = mx::array::unsafe_weak_copy(scales), b = mx::array::unsafe_weak_copy(biases),
                      out = mx::array::unsafe_weak_copy(out), extra, lora, per_seq, r, M, K, N, group = group_,
                      bits = bits_, quantize_x = quantize_x_]() mutable {
      // A strided x (a transposed view) is gathered into rows here rather than by a graph node on every call.
      std::vector<float> gathered;
      const float* rows = x.data<float>();
      if (!x.flags().row_contiguous) {
        gathered.resize(x.size());
        gather(x, gathered.data());
        rows = gathered.data();
      }
      const auto* packed = reinterpret_cast<const uint8_t*>(w.data<uint32_t>());
      LoraPlan plan;
      if (lora)
        plan = plan_lora(rows, extra[0].data<float>(), extra[1].data<float>(), extra[2].data<float>(),
                         extra[3].data<uint32_t>(), M, K, N, r, per_seq);
      if (s.dtype() == mx::float16)
        qmm(rows, packed, s.data<uint16_t>(), b.data<uint16_t>(), out.data<float>(), M, K, N, group, bits, quantize_x, plan);
      else
        qmm(rows, packed, s.data<float>(), b.data<float>(), out.data<float>(), M, K, N, group, bits, quantize_x, plan);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("solverx cpu_quantized_matmul runs on the CPU only");
  }

  const char* name() const override { return "SolverxCpuQuantizedMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const CpuQuantizedMatmul&>(other);
    return group_ == o.group_ && bits_ == o.bits_ && quantize_x_ == o.quantize_x_;
  }

 private:
  int group_, bits_;
  bool quantize_x_;
};

mx::array quantized_matmul(const mx::array& x_in, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits, std::optional<mx::array> lora_a,
                           std::optional<mx::array> lora_b, std::optional<mx::array> lora_scales,
                           std::optional<mx::array> slot_ids, bool quantize_x) {
  if (bits != 4 && bits != 8) throw std::invalid_argument("bits must be 4 or 8");
  if (group_size % CHUNK != 0) throw std::invalid_argument("group_size must be a multiple of 32");
  if (w.ndim() != 2 || w.dtype() != mx::uint32) throw std::invalid_argument("w must be a 2-D uint32 array");
  if ((scales.dtype() != mx::float32 && scales.dtype() != mx::float16) || biases.dtype() != scales.dtype())
    throw std::invalid_argument("scales and biases must be both float32 or both float16");
  const int N = w.shape(0);
  const int K = w.shape(1) * 32 / bits;
  if (x_in.shape(-1) != K) throw std::invalid_argument("x's last axis does not match w");
  if (scales.shape(0) != N || scales.shape(1) != K / group_size || biases.shape() != scales.shape())
    throw std::invalid_argument("scales/biases do not match w and group_size");
  auto s = mx::to_stream(mx::Device::cpu);
  auto x = x_in.dtype() == mx::float32 ? x_in : mx::astype(x_in, mx::float32, s);
  auto shape = x.shape();
  shape.back() = N;
  std::vector<mx::array> inputs = {x, w, scales, biases};
  const int given = lora_a.has_value() + lora_b.has_value() + lora_scales.has_value() + slot_ids.has_value();
  if (given != 0 && given != 4) throw std::invalid_argument("give all of lora_a, lora_b, lora_scales, slot_ids");
  if (given == 4) {
    auto &a = *lora_a, &b = *lora_b, &ls = *lora_scales, &ids = *slot_ids;
    if (a.ndim() != 3 || b.ndim() != 3 || a.shape(1) != K || b.shape(2) != N || a.shape(2) != b.shape(1) ||
        a.shape(0) != b.shape(0) || ls.ndim() != 1 || ls.shape(0) != a.shape(0))
      throw std::invalid_argument("LoRA stacks must be a [slots, K, r], b [slots, r, N], scales [slots]");
    if (a.dtype() != mx::float32 || b.dtype() != mx::float32 || ls.dtype() != mx::float32 ||
        ids.dtype() != mx::uint32)
      throw std::invalid_argument("LoRA stacks and scales must be float32, slot_ids uint32");
    if (x.ndim() < 2 || ids.ndim() != 1 || ids.shape(0) != x.shape(0))
      throw std::invalid_argument("slot_ids needs one slot per sequence (x's first axis)");
    inputs.insert(inputs.end(), {a, b, ls, ids});
  }
  return mx::array(shape, mx::float32, std::make_shared<CpuQuantizedMatmul>(s, group_size, bits, quantize_x), inputs);
}

// ---- decode attention: one query token per sequence ------------------------------------------------------------
// softmax(scale * q k^T, masked) v for q [B, Hq, 1, D] against a KV cache's views k, v [B, Hkv, L, D] (strided:
// the cache's buffers are longer than L; the last axis must be contiguous), each query head reading its group's
// KV head (GQA), with an optional boolean mask [B or 1, 1, 1, L] (a batch cache's left padding). MLX's CPU
// fallback for this shape runs 4-6 graph nodes and a small BLAS call per sequence and head; this is one node.

struct View {
  const float* data;
  int64_t strides[4];
};

void decode_attention(const float* q, View k, View v, const bool* mask, int64_t mask_batch_stride, float* out,
                      int B, int Hq, int Hkv, int L, int D, float scale) {
  const int rep = Hq / Hkv;
  const size_t work = (size_t)B * Hq * L * D;
#pragma omp parallel for schedule(static) if (work >= PARALLEL_WORK) num_threads(threads_to_use())
  for (int bh = 0; bh < B * Hq; ++bh) {
    const int b = bh / Hq, h = bh % Hq, hk = h / rep;
    const float* qv = q + (size_t)bh * D;
    const float* kb = k.data + b * k.strides[0] + hk * k.strides[1];
    const float* vb = v.data + b * v.strides[0] + hk * v.strides[1];
    const bool* mrow = mask ? mask + b * mask_batch_stride : nullptr;
    std::vector<float> scores(L);
    float top = -std::numeric_limits<float>::infinity();
    for (int l = 0; l < L; ++l) {
      if (mrow && !mrow[l]) {
        scores[l] = -std::numeric_limits<float>::infinity();
        continue;
      }
      const float* kl = kb + l * k.strides[2];
      float dot = 0.f;
      for (int d = 0; d < D; ++d) dot += qv[d] * kl[d];
      scores[l] = dot * scale;
      top = std::max(top, scores[l]);
    }
    float total = 0.f;
    for (int l = 0; l < L; ++l) {
      scores[l] = std::exp(scores[l] - top);
      total += scores[l];
    }
    float* o = out + (size_t)bh * D;
    for (int d = 0; d < D; ++d) o[d] = 0.f;
    for (int l = 0; l < L; ++l) {
      const float p = scores[l] / total;
      if (p == 0.f) continue;
      const float* vl = vb + l * v.strides[2];
      for (int d = 0; d < D; ++d) o[d] += p * vl[d];
    }
  }
}

class DecodeAttention : public mx::Primitive {
 public:
  DecodeAttention(mx::Stream stream, float scale) : mx::Primitive(stream), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& q = inputs[0];
    auto& k = inputs[1];
    auto& v = inputs[2];
    auto& out = outputs[0];
    if (!q.flags().row_contiguous || k.strides()[3] != 1 || v.strides()[3] != 1)
      throw std::invalid_argument("decode_attention: q must be row-contiguous, k/v contiguous along head_dim");
    const bool masked = inputs.size() == 4;
    if (masked && (inputs[3].strides()[3] != 1))
      throw std::invalid_argument("decode_attention: the mask must be contiguous along the keys");
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& in : inputs) encoder.set_input_array(in);
    encoder.set_output_array(out);
    const int B = q.shape(0), Hq = q.shape(1), D = q.shape(3), Hkv = k.shape(1), L = k.shape(2);
    const int64_t mask_batch_stride = masked && inputs[3].shape(0) > 1 ? inputs[3].strides()[0] : 0;
    encoder.dispatch([q = mx::array::unsafe_weak_copy(q), k = mx::array::unsafe_weak_copy(k),
                      v = mx::array::unsafe_weak_copy(v),
                      m = masked ? std::optional<mx::array>(mx::array::unsafe_weak_copy(inputs[3])) : std::nullopt,
                      out = mx::array::unsafe_weak_copy(out), B, Hq, Hkv, L, D, mask_batch_stride,
                      scale = scale_]() mutable {
      View kv{k.data<float>(), {k.strides()[0], k.strides()[1], k.strides()[2], k.strides()[3]}};
      View vv{v.data<float>(), {v.strides()[0], v.strides()[1], v.strides()[2], v.strides()[3]}};
      decode_attention(q.data<float>(), kv, vv, m ? m->data<bool>() : nullptr, mask_batch_stride,
                       out.data<float>(), B, Hq, Hkv, L, D, scale);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("solverx decode_attention runs on the CPU only");
  }

  const char* name() const override { return "SolverxDecodeAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const DecodeAttention&>(other).scale_;
  }

 private:
  float scale_;
};

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                    std::optional<mx::array> mask) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4 || q.shape(2) != 1)
    throw std::invalid_argument("decode_attention takes q [B, H, 1, D] and k, v [B, Hkv, L, D]");
  if (q.dtype() != mx::float32 || k.dtype() != mx::float32 || v.dtype() != mx::float32)
    throw std::invalid_argument("decode_attention takes float32 q, k, v");
  if (k.shape() != v.shape() || k.shape(0) != q.shape(0) || k.shape(3) != q.shape(3) ||
      q.shape(1) % k.shape(1) != 0)
    throw std::invalid_argument("decode_attention: q, k and v do not fit (batch, heads, head_dim)");
  std::vector<mx::array> inputs = {q, k, v};
  if (mask) {
    const auto& m = *mask;
    if (m.dtype() != mx::bool_ || m.ndim() != 4 || m.shape(1) != 1 || m.shape(2) != 1 ||
        m.shape(3) != k.shape(2) || (m.shape(0) != 1 && m.shape(0) != q.shape(0)))
      throw std::invalid_argument("decode_attention takes a boolean mask [B or 1, 1, 1, L]");
    inputs.push_back(m);
  }
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array(q.shape(), mx::float32, std::make_shared<DecodeAttention>(s, scale), inputs);
}

}  // namespace

NB_MODULE(_solverx_qmm, m) {
  m.doc() = "Fast CPU products against MLX affine-quantized weights (see qmm.cpp)";
  m.def("decode_attention", &attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("scale"),
        nb::arg("mask") = nb::none(),
        "softmax(scale * q k^T) v for one query token per sequence against a KV cache (GQA, boolean mask)");
  m.def("set_threads", [](int n) { kernel_threads.store(n > 0 ? n : 0); }, nb::arg("threads"),
        "the threads each product may use (0: every core)");
  m.def("quantized_matmul", &quantized_matmul, nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"),
        nb::arg("group_size"), nb::arg("bits"), nb::arg("lora_a") = nb::none(), nb::arg("lora_b") = nb::none(),
        nb::arg("lora_scales") = nb::none(), nb::arg("slot_ids") = nb::none(), nb::arg("quantize_x") = false,
        "x @ dequantize(w, scales, biases).T for float32 x on the CPU, plus each sequence's LoRA delta "
        "scale[id] * x @ a[id] @ b[id] when the stacks and one slot id per sequence (x's first axis) are given; "
        "quantize_x: x rounded to int8 per 32 values (VNNI), where INT8_X and K is a multiple of 64");
#ifdef SOLVERX_INT8_X
  m.attr("INT8_X") = true;
#else
  m.attr("INT8_X") = false;
#endif
}
