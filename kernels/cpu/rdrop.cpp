// Native CPU kernel of the fused R-Drop loss: OpenMP across rows, SIMD across the vocabulary.
//
// Math, per row (README, "The math"). z1, z2 are one row of each pass, after the optional
// softcap z = c * tanh(x / c); e_y is the one-hot of the label y; eps the label smoothing. Each
// pass's log-sum-exp is kept as m_k, itself rounded to float, and log s_k, s_k = sum exp(z_k -
// m_k), the rest, so that p loses nothing to the rounding of a large lse = m + log s:
//
//     p = exp(z1 - m1 - log s1)        q = exp(z2 - m2 - log s2)        D = z1 - z2
//     CE_k  = (m_k - z_k[y]) + log s_k + eps (z_k[y] - m_k - sigma_k / V'),  sigma_k = sum (z_k - m_k)
//     symKL = 1/2 sum (p - q) D = 1/2 (E_p[D] - E_q[D])                  (because sum p - q = 0)
//
//     dz1 = c_ce1 (p - (1 - eps) e_y - eps / V') + c_kl / 2 (p (D - E_p[D]) + p - q)
//     dz2 = c_ce2 (q - (1 - eps) e_y - eps / V') - c_kl / 2 (q (D - E_q[D]) + p - q)
//
// c_ce1, c_ce2, c_kl are the row's upstream gradients of CE_1, CE_2, symKL. With softcap the
// gradient is multiplied by 1 - (z / c)^2. A position where both raw logits are -inf (a masked
// vocabulary entry) is absent: it adds nothing to any sum, gets gradient 0, and V' counts the
// present positions only; a row with no present position has symKL = 0 (the empty sum). All math
// is fp32 whatever the input dtype; the sums over vocabulary blocks are carried in double.
//
// A row whose loss is not finite (NaN or +inf in it: NaN; -inf in one pass only, or a label on an
// absent entry: +inf) gets NaN gradients, whole rows.
//
// Per-row outputs, as in the Triton kernels: parts [3, n_rows] = (CE_1, CE_2, symKL), 0 for an
// ignored row; stats [8, n_rows] = (m1, m2, log s1, log s2, E_p[D], E_q[D], V', row_ok), row_ok 1,
// or 0 where the loss is not finite.
//
// The C API takes raw pointers and sizes only: no libtorch, so the library does not depend on the
// torch version. Rows may be strided (row stride in elements); the last dim is contiguous.

#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define FASTRDROP_AVX512 1
// GCC 12 warns of the intrinsics' own _mm512_undefined_* placeholders (GCC bug 105593)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "features.h"

namespace {

constexpr int64_t kBlock = 2048;  // vocabulary block: both rows' fp32 copies stay in L1
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- element types: storage, and branch-free conversions to and from fp32 ----------------------

inline float as_float(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float as_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t as_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

template <typename Fmt>
using Elem = typename Fmt::storage;

// The vocabulary loops read and write a row as words of kLanes elements: one 32-bit word holds
// two 16-bit elements, element 2k in its low half. Lane l of word k is element kLanes * k + l.
// Each lane of a vector register then sits in a 32-bit lane, with no packing or permuting.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "words of 16-bit elements");

template <int L>
struct Word {  // the fp32 values of one word's lanes
  float x[L];
};

template <typename Fmt>
inline uint32_t load_word(const Elem<Fmt>* p, int64_t k) {
  uint32_t w;
  std::memcpy(&w, p + 2 * k, sizeof w);  // rows need no 4-byte alignment
  return w;
}

template <typename Fmt>
inline void store_word(Elem<Fmt>* p, int64_t k, uint32_t w) {
  std::memcpy(p + 2 * k, &w, sizeof w);
}

struct F32 {
  using storage = float;
  static constexpr int kLanes = 1;
  static constexpr int kExpDegree = 5;  // see vexp
  static float load(float x) { return x; }
  static float store(float x) { return x; }
  template <int>
  static float lane(const float* p, int64_t k) {
    return p[k];
  }
  static void pack(float* p, int64_t k, Word<1> g) { p[k] = g.x[0]; }
};

struct BF16 {  // the top half of a float's bits
  using storage = uint16_t;
  static constexpr int kLanes = 2;
  static constexpr int kExpDegree = 4;
  static float load(uint16_t x) { return as_float(static_cast<uint32_t>(x) << 16); }
  // x's bits rounded to nearest even in the top half: add half an ulp, less one unless the kept
  // mantissa is odd
  static uint32_t rounded(float x) {
    const uint32_t bits = as_bits(x);
    return bits + 0x7FFFu + ((bits >> 16) & 1u);
  }
  static uint16_t store(float x) { return static_cast<uint16_t>(rounded(x) >> 16); }
  template <int kLane>
  static float lane(const uint16_t* p, int64_t k) {
    const uint32_t w = load_word<BF16>(p, k);
    return as_float(kLane == 0 ? w << 16 : w & 0xFFFF0000u);
  }
  static void pack(uint16_t* p, int64_t k, Word<2> g) {
    store_word<BF16>(p, k, (rounded(g.x[0]) >> 16) | (rounded(g.x[1]) & 0xFFFF0000u));
  }
};

struct F16 {  // IEEE half, converted on the bits so that the loops vectorise without AVX512-FP16
  using storage = uint16_t;
  static constexpr int kLanes = 2;
  static constexpr int kExpDegree = 4;
  static float load(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t rest = static_cast<uint32_t>(h & 0x7FFFu) << 13;
    // exponent and mantissa in place; times 2^112 rebias 15 -> 127, exact for subnormals too
    const float finite = as_float(rest) * 0x1p112f;
    const uint32_t inf_nan = rest | 0x7F800000u;
    return as_float((rest >= (0x7C00u << 13) ? inf_nan : as_bits(finite)) | sign);
  }
  static uint16_t store(float x) {
    // round to nearest even; NaN -> quiet NaN, overflow -> inf, subnormals by a float addition.
    // Signed int32 throughout (the magnitude has no sign bit): AVX2 compares signed ints only.
    const int32_t bits = static_cast<int32_t>(as_bits(x));
    const int32_t sign = (bits >> 16) & 0x8000;
    const int32_t mag = bits & 0x7FFFFFFF;
    const int32_t denorm_magic = ((127 - 15) + (23 - 10) + 1) << 23;
    const int32_t subnormal =
        static_cast<int32_t>(as_bits(as_float(mag) + as_float(denorm_magic))) - denorm_magic;
    const int32_t normal = (mag - ((127 - 15) << 23) + 0xFFF + ((mag >> 13) & 1)) >> 13;
    const int32_t special = mag > 0x7F800000 ? 0x7E00 : 0x7C00;
    const int32_t out = mag >= ((127 + 16) << 23) ? special
                        : mag < (113 << 23)       ? subnormal
                                                  : normal;
    return static_cast<uint16_t>(out | sign);
  }
  template <int kLane>
  static float lane(const uint16_t* p, int64_t k) {
    return load(static_cast<uint16_t>(load_word<F16>(p, k) >> (16 * kLane)));
  }
  static void pack(uint16_t* p, int64_t k, Word<2> g) {
    const uint32_t low = store(g.x[0]), high = store(g.x[1]);
    store_word<F16>(p, k, low | high << 16);
  }
};

// One element per word: the odd last element of a row of 16-bit elements.
template <typename Fmt>
struct Single {
  using storage = Elem<Fmt>;
  static constexpr int kLanes = 1;
  static constexpr int kExpDegree = Fmt::kExpDegree;
  template <int>
  static float lane(const storage* p, int64_t k) {
    return Fmt::load(p[k]);
  }
  static void pack(storage* p, int64_t k, Word<1> g) { p[k] = Fmt::store(g.x[0]); }
};

// Word k of a row: its lanes as fp32.
template <typename Fmt>
inline Word<Fmt::kLanes> unpack(const Elem<Fmt>* p, int64_t k) {
  if constexpr (Fmt::kLanes == 1) {
    return {{Fmt::template lane<0>(p, k)}};
  } else {
    return {{Fmt::template lane<0>(p, k), Fmt::template lane<1>(p, k)}};
  }
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<W>{}, at, count) for the whole words of elements [0, len) (W = Fmt, at = 0) and for
// the odd element left at the end of a 16-bit run (W = Single<Fmt>).
template <typename Fmt, typename F>
inline void by_words(int64_t len, F&& f) {
  const int64_t whole = len - len % Fmt::kLanes;
  f(Tag<Fmt>{}, int64_t{0}, whole);
  if constexpr (Fmt::kLanes > 1) {
    if (whole < len) f(Tag<Single<Fmt>>{}, whole, len - whole);
  }
}

// Where by_words puts element j of a run of len elements, when each lane's values are kept in
// order: lane by lane over the whole words, then the odd last element.
template <typename Fmt>
inline int64_t lane_major(int64_t j, int64_t len) {
  const int64_t words = len / Fmt::kLanes;
  return j < words * Fmt::kLanes ? (j % Fmt::kLanes) * words + j / Fmt::kLanes : j;
}

// ---- vectorisable elementary functions ---------------------------------------------------------

// exp(x), branch-free so that loops over it vectorise: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a
// polynomial of degree kDegree, 2^n put into the exponent bits. One FMA reduces x with ln2
// rounded to float, whose error of 1.9e-9 grows with |n|. Degree 5, for fp32 rows: the relative
// error is below 2.1e-7 (1.7 ulp) for x in [-20, 0] and 4e-7 down to the smallest normal float.
// Degree 4, for 16-bit rows, one FMA shorter: below 5.4e-6, 90 times finer than fp16's rounding
// of the logits themselves (bf16's: 700 times). x is clamped at -88, where n = -127 makes the
// exponent bits, and so the result, exactly 0: exp(-inf) = 0 with no test. From 88.38 the
// exponent bits saturate: the result is inf (which a block's sum shows, see row_sums), or NaN
// for x = inf or NaN.
namespace exp_coef {
constexpr float kLowest = -88.0f;
constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
constexpr uint32_t kMagicBits = 0x4B400000u;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147182f;
// exp(r) = 1 + r + r^2 (c2 + c3 r + ...), highest coefficient first, fitted for relative error
// on |r| <= ln2 / 2
template <int kDegree>
struct Poly;
template <>
struct Poly<5> {
  static constexpr float c[] = {8.33381e-3f, 4.189858e-2f, 1.6666887e-1f, 4.9999143e-1f, 1.0f,
                                1.0f};
};
template <>
struct Poly<4> {
  static constexpr float c[] = {4.127775e-2f, 1.6753516e-1f, 5.0005114e-1f, 1.0f, 1.0f};
};
}  // namespace exp_coef

template <int kDegree>
[[gnu::always_inline]] inline float vexp(float x) {
  using namespace exp_coef;
  const float xc = std::max(x, kLowest);
  // t = x log2(e) + 1.5 * 2^23 rounds to an integer n that sits in t's low mantissa bits
  const float t = xc * kLog2e + kMagic;
  const float n = t - kMagic;
  const float r = xc - n * kLn2;
  float p = Poly<kDegree>::c[0];  // Horner's scheme, kDegree FMAs
  for (int i = 1; i <= kDegree; ++i) p = p * r + Poly<kDegree>::c[i];
  // 2^n: n + 127, at most 255 (inf), into the exponent bits; unsigned, so that no input, NaN
  // included, makes the shift undefined
  const uint32_t scale_bits = std::min(as_bits(t) - kMagicBits + 127u, 255u) << 23;
  return p * as_float(scale_bits);
}

// c * tanh(x / c), the same formulas as the Triton kernels: (1 - e) / (1 + e), e = exp(-2 |x / c|),
// from |x / c| = 1/2 on; below, where 1 - e would cancel (an error of about c 2^-25 in the
// result, growing with the softcap), y P(y^2), a fit of tanh(y) / y for relative error on
// |y| < 1/2, within 1.1e-7 of tanh(y).
[[gnu::always_inline]] inline float softcap_of(float x, float c) {
  const float y = x * (1.0f / c), u = y * y;  // the loops keep 1 / c: no division per entry
  const float small =
      y * (1.0f + u * (-0.3333306908607483f +
                       u * (0.13324779272079468f +
                            u * (-0.05298607423901558f + u * 0.017135005444288254f))));
  const float e = vexp<5>(-2.0f * std::fabs(y));
  const float t = (1.0f - e) / (1.0f + e);
  return c * (std::fabs(y) < 0.5f ? small : x < 0.0f ? -t : t);
}

#if FASTRDROP_AVX512
// ---- AVX-512 forms of the hot loops -------------------------------------------------------------
//
// GCC vectorises the loops below by itself, but with a block's nine reductions in registers it
// reloads and converts each word once per lane, and packs 16-bit results element by element.
// Where the build targets AVX-512 (F and BW), the statistics loop over blocks with no -inf, NaN
// or +inf, and the gradient loops (from the kept exponentials, or from exp in the backward
// pass), are written out instead for rows without softcap (see block_sums_avx512 and
// grads_avx512): 16 words a step, all lanes of a word in the same step, the tail under a mask.
// The conversions give the same bits as Fmt::load / Fmt::store (but for bf16 results below
// 2^-126 with AVX512-BF16, see Words<BF16>); sums differ in the order of their additions. exp
// looks 2^(j / 32) up in a table held in registers, which the generic loops would have to
// gather, so it and vexp differ by up to their errors (2.1e-7 for fp32 rows, 5.4e-6 for 16-bit
// ones; 6.5e-5 where the statistics pass of 16-bit rows in place takes exp of degree 1), and below
// e^-87, where exp keeps subnormals.
namespace avx512 {

using Vec = __m512;
using Mask = __mmask16;

inline Vec set(float x) { return _mm512_set1_ps(x); }

// The stats pass reads each row once from memory, in blocks of kBlock elements (a 4 KiB page of
// a 16-bit row), and the hardware prefetchers do not cross pages: each step asks for the line a
// page ahead, so that the next block is on its way before the loop reaches it.
template <typename T>
inline void prefetch_next_page(const T* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + 4096, _MM_HINT_T0);
}

// the first n of 16 lanes
inline Mask first(int64_t n) { return n >= 16 ? Mask(0xFFFF) : Mask((1u << n) - 1); }

// 16 words at p (those in mask m). stream: a whole line, 64-byte aligned, written around the
// caches, with no read of the line first (see Options::stream).
inline void put(void* p, Mask m, __m512i w, bool stream) {
  if (stream && m == Mask(0xFFFF)) {
    _mm512_stream_si512(static_cast<__m512i*>(p), w);
  } else {
    _mm512_mask_storeu_epi32(p, m, w);
  }
}

// exp(x) = 2^(i + j / 32) exp(r): n = i + j / 32 is x log2(e) rounded to a multiple of 1/32,
// so that |r| <= ln2 / 64. 2^(j / 32) comes from a table of 32 floats in two registers, 2^i from
// vscalefps, which also gives inf past the float range (for x = +inf too) and 0 below it: from
// x = -103.97 the result rounds to 0, and x is clamped at -105, so exp(-inf) = 0. exp(r) is a
// polynomial of degree kDegree, exact at r = 0:
// - 2: 1 + r (c1 + c2 r), fitted for relative error on |r| <= ln2 / 64, within 5.3e-8 of exp(r);
//   exp(x) within 2.2e-7 for x in [-20, 0] and 4.1e-7 down to the smallest normal float, with 9
//   instructions against vexp's 12 (degree 4) and 13 (degree 5).
// - 1: 1 + r, within 6.0e-5 (r^2 / 2 + |r|^3 / 3 at most), with 7 instructions. Only where
//   nothing needs exp's own accuracy: the statistics pass of 16-bit rows whose gradients go into
//   the logits (in place) from the exponentials it keeps (see SumsAvx512).
// Zen 5 issues about 2.5 vector instructions a cycle in these loops whatever they are, so the
// count is the cost; Zen 4 one 512-bit FMA-class instruction a cycle.
struct Exp2Table {
  Vec lo, hi;  // 2^(j / 32), j = 0..15 and 16..31
};

inline Exp2Table exp2_table() {
  struct Values {
    alignas(64) float at[32];
  };
  static const Values values = [] {
    Values v;
    for (int j = 0; j < 32; ++j) v.at[j] = static_cast<float>(std::exp2(j / 32.0));
    return v;
  }();
  return {_mm512_load_ps(values.at), _mm512_load_ps(values.at + 16)};
}

template <int kDegree>
inline Vec exp(Vec x, const Exp2Table& table) {
  constexpr float kMagic = 393216.0f;  // 1.5 * 2^18, whose float spacing is 1/32
  const Vec xc = _mm512_max_ps(set(-105.0f), x);  // max(-105, NaN) is NaN
  // t = x log2(e) + kMagic rounds x log2(e) to n, with 32 n's fraction in t's low 5 bits
  const Vec t = _mm512_fmadd_ps(xc, set(exp_coef::kLog2e), set(kMagic));
  const Vec n = _mm512_sub_ps(t, set(kMagic));
  const Vec r = _mm512_fnmadd_ps(n, set(exp_coef::kLn2), xc);
  const Vec two_j = _mm512_permutex2var_ps(table.lo, _mm512_castps_si512(t), table.hi);
  Vec e;  // 2^(j / 32) exp(r)
  if constexpr (kDegree == 2) {
    const Vec c = _mm512_fmadd_ps(r, set(0.49999633f), set(1.0000147f));
    e = _mm512_fmadd_ps(_mm512_mul_ps(two_j, r), c, two_j);
  } else {
    e = _mm512_fmadd_ps(two_j, r, two_j);
  }
  return _mm512_scalef_ps(e, n);  // times 2^floor(n) = 2^i
}

// Words k, ..., k + 15 of a row (those in mask m) as Fmt::kLanes vectors of fp32, vector l holding
// lane l of each word; and back.
template <typename Fmt>
struct Words;

template <>
struct Words<F32> {
  static void load(const float* p, int64_t k, Mask m, Vec (&x)[1]) {
    x[0] = _mm512_maskz_loadu_ps(m, p + k);
  }
  static void store(float* p, int64_t k, Mask m, const Vec (&g)[1], bool stream) {
    put(p + k, m, _mm512_castps_si512(g[0]), stream);
  }
};

inline __m512i load_words(const uint16_t* p, int64_t k, Mask m) {
  return _mm512_maskz_loadu_epi32(m, p + 2 * k);
}

template <>
struct Words<BF16> {
  static void load(const uint16_t* p, int64_t k, Mask m, Vec (&x)[2]) {
    const __m512i w = load_words(p, k, m);
    x[0] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    x[1] = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xFFFF0000u))));
  }
#if defined(__AVX512BF16__)
  // Rounded to nearest even by the instruction, which also flushes results below 2^-126 to 0
  // (BF16::store keeps them as subnormals): both lanes' 16 values, then interleaved.
  static void store(uint16_t* p, int64_t k, Mask m, const Vec (&g)[2], bool stream) {
    alignas(64) static constexpr int16_t kInterleave[32] = {
        0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(g[1], g[0]));
    const __m512i w = _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), both);
    put(p + 2 * k, m, w, stream);
  }
#else
  static __m512i rounded(Vec g) {  // BF16::rounded
    const __m512i bits = _mm512_castps_si512(g);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd);
  }
  static void store(uint16_t* p, int64_t k, Mask m, const Vec (&g)[2], bool stream) {
    const __m512i low = _mm512_srli_epi32(rounded(g[0]), 16);
    // (high & 0xFFFF0000) | low
    const __m512i w = _mm512_ternarylogic_epi32(_mm512_set1_epi32(int(0xFFFF0000u)),
                                                rounded(g[1]), low, 0xEA);
    put(p + 2 * k, m, w, stream);
  }
#endif
};

template <>
struct Words<F16> {
  static void load(const uint16_t* p, int64_t k, Mask m, Vec (&x)[2]) {
    const __m512i w = load_words(p, k, m);
    x[0] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(w));
    x[1] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(w, 16)));
  }
  static __m512i half(Vec g) {  // F16::store, in the low half of each 32-bit lane
    return _mm512_cvtepu16_epi32(_mm512_cvtps_ph(g, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store(uint16_t* p, int64_t k, Mask m, const Vec (&g)[2], bool stream) {
    const __m512i w = _mm512_or_si512(half(g[0]), _mm512_slli_epi32(half(g[1]), 16));
    put(p + 2 * k, m, w, stream);
  }
};

}  // namespace avx512
#endif  // FASTRDROP_AVX512

// ---- one row -----------------------------------------------------------------------------------

struct Options {
  int64_t vocab;
  int64_t ignore_index;
  float eps;      // label smoothing
  float softcap;  // 0: none
  bool has_target;
  // Write the gradients around the caches (the AVX-512 loops, into rows that are not the
  // logits, 64-byte aligned): a store to a line that is not in cache reads it first, and a
  // gradient of kStreamBytes or more is mostly not in cache when written, nor kept there for
  // its reader. Streaming spares the read. stacked_rdrop_loss fwd+bwd in the default mode, Zen 5
  // (32 MiB of L3), streaming against not, builds alternating, two runs or more each: 10-26%
  // less time at 256 x 32000 and 128 x 32000 (bf16 and fp32), 4-13% at 256 x 131072, 4-17% at
  // 12-16 MB (48 and 64 x 32000 fp32, 96 x 32000 bf16). Smaller, the lines may still be in the
  // L3: fp32 at 4.4 and 8.2 MB (17 and 32 x 32000) took 4-10% longer streamed, bf16 at 5-8 MB
  // within 8% either way, at 10 MB both within 11%.
  bool stream = false;
};

constexpr int64_t kStreamBytes = int64_t{8} << 20;  // both gradients of a call

// After a row's streamed stores: they are ordered before the stores that follow (the label's
// entry, written again over one of them). Once a row, not once a block: the fence waits for
// the lines in flight.
inline void end_streams(const Options& o) {
#if FASTRDROP_AVX512
  if (o.stream) _mm_sfence();
#else
  (void)o;
#endif
}

struct RowStats {
  float ce1, ce2, kl, m1, m2, log_s1, log_s2, ep, eq, n_present;
  bool ok;       // the loss is finite; else the gradients are NaN
  bool guarded;  // D is infinite or NaN somewhere (a -inf logit): see grads_of
};

// One position of both rows as fp32, softcapped, -inf where absent. Returns whether present.
template <bool kSoftcap>
[[gnu::always_inline]] inline bool present(float& a, float& b, float cap) {
  const bool here = !(a == kNegInf && b == kNegInf);
  if constexpr (kSoftcap) {
    a = here ? softcap_of(a, cap) : kNegInf;
    b = here ? softcap_of(b, cap) : kNegInf;
  }
  return here;
}

template <typename Fmt, bool kSoftcap>
inline bool load_pair(const Elem<Fmt>* z1, const Elem<Fmt>* z2, int64_t j, float cap, float& a,
                      float& b) {
  a = Fmt::load(z1[j]);
  b = Fmt::load(z2[j]);
  return present<kSoftcap>(a, b, cap);
}

// The maxima of a block's softcapped logits, from the raw values (softcap is monotonic, and maps
// -inf to -c). Used only as the shift of the exponentials, so a bound near the maximum will do.
template <typename Fmt, bool kSoftcap>
inline void block_max(const Elem<Fmt>* z1, const Elem<Fmt>* z2, int64_t len, float cap,
                      float& max1, float& max2) {
  float m1 = kNegInf, m2 = kNegInf;
#pragma omp simd reduction(max : m1, m2)
  for (int64_t j = 0; j < len; ++j) {
    m1 = std::max(m1, Fmt::load(z1[j]));
    m2 = std::max(m2, Fmt::load(z2[j]));
  }
  if constexpr (kSoftcap) {
    m1 = m1 == kNegInf ? -cap : softcap_of(m1, cap);
    m2 = m2 == kNegInf ? -cap : softcap_of(m2, cap);
  }
  max1 = m1;
  max2 = m2;
}

// exp(m_old - m_new), 0 while nothing was seen yet: never -inf - -inf
inline double rescale(float m_old, float shift) {
  return m_old == kNegInf ? 0.0 : std::exp(static_cast<double>(m_old) - shift);
}

// The sums of one block for fixed shifts: s_k = sum exp(z_k - shift_k), t_k = sum exp(z_k -
// shift_k) D, sum (z_k - shift_k) and the count of present entries (smoothing only). lone: 1
// where a position is -inf in one pass only (found by the guarded pass).
struct BlockSums {
  float s1 = 0, s2 = 0, t1 = 0, t2 = 0, z1 = 0, z2 = 0, n = 0, lone = 0;

  BlockSums& operator+=(const BlockSums& o) {
    s1 += o.s1, s2 += o.s2, t1 += o.t1, t2 += o.t2, z1 += o.z1, z2 += o.z2, n += o.n;
    lone = std::max(lone, o.lone);
    return *this;
  }

  // The fast pass's test: D is finite everywhere, as far as t_k tells. An infinite or NaN D (at
  // a -inf, +inf or NaN logit) makes a t_k infinite or NaN: exp(z_k - shift_k) D, or 0 * D where
  // the exponential is 0. (t_k may also overflow with D finite: the guarded pass then gives the
  // same sums.)
  bool d_finite() const { return std::isfinite(t1) && std::isfinite(t2); }
};

// Where a row's exponentials exp(z_k - shift_k) and each block's shifts are kept for the
// gradient pass that follows in the forward pass, which then needs no exp per entry.
struct RowCache {
  float* e1;
  float* e2;
  float* shift1;  // per block
  float* shift2;
};

// The sums of lane kLane of words [0, words); with kCache the exponentials go to e1_out,
// e2_out. D is infinite or NaN only at a -inf logit. Without kGuard such a position makes t_k
// non-finite, and the block is summed again with kGuard: t_k then takes 0 for exp(z_k -
// shift_k) D where the exponential is 0 (0 * inf := 0), and nothing where the position is -inf
// in one pass only, which it counts instead (its KL is +inf, whatever exp(z_k) rounds to).
template <typename Fmt, int kLane, bool kSoftcap, bool kSmoothing, bool kCache, bool kGuard>
inline BlockSums block_sums(const Elem<Fmt>* z1, const Elem<Fmt>* z2, int64_t words, float cap,
                            float shift1, float shift2, float* __restrict e1_out,
                            float* __restrict e2_out) {
  float s1 = 0, s2 = 0, t1 = 0, t2 = 0, sz1 = 0, sz2 = 0, n = 0, lone = 0;
#pragma omp simd reduction(+ : s1, s2, t1, t2, sz1, sz2, n) reduction(max : lone)
  for (int64_t k = 0; k < words; ++k) {
    float a = Fmt::template lane<kLane>(z1, k), b = Fmt::template lane<kLane>(z2, k);
    const bool here = present<kSoftcap>(a, b, cap);
    float d = a - b;  // inf or NaN only at a -inf logit
    const float e1 = vexp<Fmt::kExpDegree>(a - shift1), e2 = vexp<Fmt::kExpDegree>(b - shift2);
    if constexpr (kCache) {
      e1_out[k] = e1;
      e2_out[k] = e2;
    }
    s1 += e1;
    s2 += e2;
    if constexpr (kGuard) {
      const bool one_pass = here && (a == kNegInf || b == kNegInf);
      lone = std::max(lone, one_pass ? 1.0f : 0.0f);
      d = one_pass ? 0.0f : d;
      t1 += e1 > 0.0f ? e1 * d : 0.0f;  // 0 * inf := 0: a zero probability adds nothing
      t2 += e2 > 0.0f ? e2 * d : 0.0f;
    } else {
      t1 += e1 * d;
      t2 += e2 * d;
    }
    if constexpr (kSmoothing) {
      sz1 += here ? a - shift1 : 0.0f;
      sz2 += here ? b - shift2 : 0.0f;
      n += here ? 1.0f : 0.0f;
    }
  }
  return {s1, s2, t1, t2, sz1, sz2, n, lone};
}

#if FASTRDROP_AVX512
// block_sums without kSoftcap or kGuard, all lanes at once: the sums of a block, and with kCache
// its exponentials lane by lane into e1, e2. kCoarse: the row's gradients go into the logits (in
// place), from these exponentials alone, and nothing computes its probabilities again from the
// stats: p = e / sum e then holds whatever exp's error is, the gradient is that of logits moved
// by at most that error, and 16-bit rows take exp of degree 1 (6.0e-5, where bf16 rounds a logit
// of magnitude 1 by 3.9e-3): 2 instructions fewer per exponential took the pass from 0.355 to
// 0.303 ns an element pair in bf16 (Zen 4, one thread, 64 x 32000, builds alternating). The loss
// value takes that error too (a cross entropy below float64's by up to 6.0e-5). Elsewhere a
// later pass (the backward pass's, for an upstream gradient other than 1) computes p again with
// exp of degree 2 from these stats, whose log s must agree with it: for a label of probability
// near 1, p_y - 1 is as small as the disagreement.
template <typename Fmt, bool kSmoothing, bool kCache, bool kCoarse>
struct SumsAvx512 {
  static constexpr int L = Fmt::kLanes;
  static constexpr int kDegree = kCoarse && L == 2 ? 1 : 2;
  const Elem<Fmt>* z1;
  const Elem<Fmt>* z2;
  int64_t words;
  avx512::Vec shift1, shift2;
  float* __restrict e1;
  float* __restrict e2;
  avx512::Exp2Table table = avx512::exp2_table();
  avx512::Vec s1 = avx512::set(0), s2 = avx512::set(0), t1 = avx512::set(0),
              t2 = avx512::set(0), sz1 = avx512::set(0), sz2 = avx512::set(0);

  // Words k, ..., k + 15 (those in mask m). It is called with a constant full mask but for the
  // last step, so that the others compile to plain loads, stores and sums: 93 instructions a
  // step of 16 bf16 words against 106 with merge masks, and 8-10% less time for the whole fused
  // pass on Zen 5. (The gradient loop keeps its masks: without them it took 8% more time.)
  [[gnu::always_inline]] void step(int64_t k, avx512::Mask m) {
    using namespace avx512;
    Vec a[L], b[L];
    Words<Fmt>::load(z1, k, m, a);
    Words<Fmt>::load(z2, k, m, b);
    for (int l = 0; l < L; ++l) {
      const Vec x1 = _mm512_sub_ps(a[l], shift1), x2 = _mm512_sub_ps(b[l], shift2);
      const Vec d = _mm512_sub_ps(a[l], b[l]);
      const Vec p = exp<kDegree>(x1, table), q = exp<kDegree>(x2, table);
      if constexpr (kCache) {
        _mm512_mask_storeu_ps(e1 + l * words + k, m, p);
        _mm512_mask_storeu_ps(e2 + l * words + k, m, q);
      }
      s1 = _mm512_mask_add_ps(s1, m, s1, p);
      s2 = _mm512_mask_add_ps(s2, m, s2, q);
      t1 = _mm512_mask3_fmadd_ps(p, d, t1, m);
      t2 = _mm512_mask3_fmadd_ps(q, d, t2, m);
      if constexpr (kSmoothing) {
        sz1 = _mm512_mask_add_ps(sz1, m, sz1, x1);
        sz2 = _mm512_mask_add_ps(sz2, m, sz2, x2);
      }
    }
  }
};

template <typename Fmt, bool kSmoothing, bool kCache, bool kCoarse>
BlockSums block_sums_avx512(const Elem<Fmt>* z1, const Elem<Fmt>* z2, int64_t len, float shift1,
                            float shift2, float* __restrict e1, float* __restrict e2) {
  using namespace avx512;
  constexpr int L = Fmt::kLanes;
  const int64_t words = len / L;
  SumsAvx512<Fmt, kSmoothing, kCache, kCoarse> acc{z1, z2, words, set(shift1), set(shift2), e1, e2};
  int64_t k = 0;
  for (; k + 16 <= words; k += 16) {
    // here, not in step: GCC 12 leaves a prefetch inside it out of the code
    prefetch_next_page(z1 + L * k);
    prefetch_next_page(z2 + L * k);
    acc.step(k, Mask(0xFFFF));
  }
  if (k < words) acc.step(k, first(words - k));
  BlockSums sums{_mm512_reduce_add_ps(acc.s1),  _mm512_reduce_add_ps(acc.s2),
                 _mm512_reduce_add_ps(acc.t1),  _mm512_reduce_add_ps(acc.t2),
                 _mm512_reduce_add_ps(acc.sz1), _mm512_reduce_add_ps(acc.sz2),
                 kSmoothing ? static_cast<float>(words * L) : 0.0f, 0.0f};
  if (words * L < len) {  // the odd last element of a 16-bit run
    const int64_t at = words * L;
    sums += block_sums<Single<Fmt>, 0, false, kSmoothing, kCache, false>(
        z1 + at, z2 + at, 1, 0.0f, shift1, shift2, kCache ? e1 + at : nullptr,
        kCache ? e2 + at : nullptr);
  }
  return sums;
}
#endif

// The partial statistics of a row (or of its slice of a vocabulary split across ranks): each
// pass's reference m_k and, relative to it, s_k = sum exp(z_k - m_k), t_k = sum exp(z_k - m_k) D,
// and with smoothing sigma_k = sum (z_k - m_k) and V' (else V' = V and sigma_k = 0). m_k is the
// pass's log-sum-exp rounded to float; -inf where nothing is present; where a sum is not finite,
// the last block's shift.
struct RowSums {
  float m1, m2;
  double s1, s2, t1, t2, sigma1, sigma2, n_present;
  bool guarded;  // D is infinite or NaN somewhere (a -inf logit): see grads_of
  bool lone;     // a position is -inf in one pass only: the KL is +inf
};

// A reference m with s = sum exp(z - m), t = sum exp(z - m) D, moved to m's pass's log-sum-exp
// rounded to float: then z - m <= 0 but for that rounding, and log s, a float in the stats, is
// 0 but for it. Left as it is where nothing is present or a sum is not finite.
inline void settle(float& m, double& s, double& t) {
  if (!(s > 0.0) || !std::isfinite(s) || !std::isfinite(m)) return;
  const float lse = static_cast<float>(m + std::log(s));
  const double r = std::exp(static_cast<double>(m) - lse);
  s *= r;
  t *= r;
  m = lse;
}

// Online softmax over vocabulary blocks with running references m_k in place of running maxima,
// so that the pass over a block needs no maximum of its entries: each block is summed with the
// references as its shifts. The references start at the first block's maxima (and stay -inf
// while a pass has nothing present), and are raised to a block's maxima only where its sum
// exceeds kLimit, where exp would come near overflow, which that block's sums then take again.
// sigma_k comes from the blocks' sums of (z_k - shift) and their shifts.
template <typename Fmt, bool kSoftcap, bool kSmoothing, bool kCache = false, bool kCoarse = false>
RowSums row_sums(const Elem<Fmt>* z1, const Elem<Fmt>* z2, const Options& o,
                 const RowCache& cache = {}) {
  constexpr float kLimit = 0x1p90f;  // e^62: times |D| still far below FLT_MAX
  const float cap = o.softcap;
  float m1 = kNegInf, m2 = kNegInf;  // the references
  // sum_z_k: sum (z_k - shift) over the blocks; shifted_k: sum n_block shift (smoothing only)
  double s1 = 0, s2 = 0, t1 = 0, t2 = 0, sum_z1 = 0, sum_z2 = 0, n_present = o.vocab;
  double shifted1 = 0, shifted2 = 0;
  if constexpr (kSmoothing) n_present = 0;
  bool guarded = false, lone = false;
  auto too_large = [](const BlockSums& b) { return !(b.s1 <= kLimit && b.s2 <= kLimit); };
  auto block = [&](const Elem<Fmt>* b1, const Elem<Fmt>* b2, int64_t len, float shift1,
                   float shift2, float* e1, float* e2) {
    // lane by lane, so that with kCache the gradient pass finds each lane's exponentials in
    // order (see lane_major); without, in the same order, so that the stats have the same bits
    auto sums = [&](auto guard) {
      constexpr bool kGuard = decltype(guard)::value;
#if FASTRDROP_AVX512
      if constexpr (!kSoftcap && !kGuard) {
        return block_sums_avx512<Fmt, kSmoothing, kCache, kCoarse>(b1, b2, len, shift1, shift2,
                                                                    e1, e2);
      }
#endif
      BlockSums b;
      by_words<Fmt>(len, [&](auto tag, int64_t at, int64_t count) {
        using W = typename decltype(tag)::type;
        const int64_t words = count / W::kLanes;
        auto lane = [&](float* e, int l) { return kCache ? e + at + l * words : nullptr; };
        b += block_sums<W, 0, kSoftcap, kSmoothing, kCache, kGuard>(
            b1 + at, b2 + at, words, cap, shift1, shift2, lane(e1, 0), lane(e2, 0));
        if constexpr (W::kLanes == 2) {
          b += block_sums<W, 1, kSoftcap, kSmoothing, kCache, kGuard>(
              b1 + at, b2 + at, words, cap, shift1, shift2, lane(e1, 1), lane(e2, 1));
        }
      });
      return b;
    };
    const BlockSums b = sums(std::false_type{});
    if (too_large(b) || b.d_finite()) return b;  // too large: the shifts are raised first
    guarded = true;
    return sums(std::true_type{});
  };
  for (int64_t start = 0; start < o.vocab; start += kBlock) {
    const int64_t len = std::min(kBlock, o.vocab - start);
    const Elem<Fmt>* b1 = z1 + start;
    const Elem<Fmt>* b2 = z2 + start;
    float new_m1 = m1, new_m2 = m2;
    auto raise = [&] {  // the references to at least this block's maxima
      float max1, max2;
      block_max<Fmt, kSoftcap>(b1, b2, len, cap, max1, max2);
      new_m1 = std::max(new_m1, max1);
      new_m2 = std::max(new_m2, max2);
    };
    if (m1 == kNegInf || m2 == kNegInf) raise();
    // the shifts: the references, never -inf (-inf - -inf)
    auto shift = [](float m) { return m == kNegInf ? 0.0f : m; };
    float* e1 = kCache ? cache.e1 + start : nullptr;
    float* e2 = kCache ? cache.e2 + start : nullptr;
    BlockSums b = block(b1, b2, len, shift(new_m1), shift(new_m2), e1, e2);
    if (too_large(b)) {
      raise();
      b = block(b1, b2, len, shift(new_m1), shift(new_m2), e1, e2);
    }
    const float shift1 = shift(new_m1), shift2 = shift(new_m2);
    if constexpr (kCache) {
      cache.shift1[start / kBlock] = shift1;
      cache.shift2[start / kBlock] = shift2;
    }
    // the running sums to the new references, which are the block's shifts
    const double r1 = rescale(m1, shift1), r2 = rescale(m2, shift2);
    s1 = s1 * r1 + b.s1;
    s2 = s2 * r2 + b.s2;
    t1 = t1 * r1 + b.t1;
    t2 = t2 * r2 + b.t2;
    if constexpr (kSmoothing) {
      sum_z1 += b.z1;
      sum_z2 += b.z2;
      shifted1 += b.n * static_cast<double>(shift1);
      shifted2 += b.n * static_cast<double>(shift2);
      n_present += b.n;
    }
    lone = lone || b.lone > 0.0f;
    m1 = new_m1;
    m2 = new_m2;
  }
  settle(m1, s1, t1);
  settle(m2, s2, t2);
  RowSums u{m1, m2, s1, s2, t1, t2, 0.0, 0.0, n_present, guarded, lone};
  if constexpr (kSmoothing) {
    const double ref1 = m1 == kNegInf ? 0.0 : m1, ref2 = m2 == kNegInf ? 0.0 : m2;
    u.sigma1 = sum_z1 + (shifted1 - n_present * ref1);
    u.sigma2 = sum_z2 + (shifted2 - n_present * ref2);
  }
  return u;
}

// 1. the partial statistics of the whole row;
// 2. log s_k, E_p[D] = t1 / s1, E_q[D] = t2 / s2, symKL = (E_p[D] - E_q[D]) / 2, 0 for a row
//    with nothing present (both s_k are 0 only then);
// 3. CE_k = (m_k - z_k[y]) + log s_k + eps (z_k[y] - m_k - sigma_k / V').
template <typename Fmt, bool kSoftcap, bool kSmoothing, bool kCache = false, bool kCoarse = false>
RowStats row_stats(const Elem<Fmt>* z1, const Elem<Fmt>* z2, int64_t y, const Options& o,
                   const RowCache& cache = {}) {
  const RowSums u = row_sums<Fmt, kSoftcap, kSmoothing, kCache, kCoarse>(z1, z2, o, cache);
  RowStats r{};
  r.guarded = u.guarded;
  const double log_s1 = std::log(u.s1), log_s2 = std::log(u.s2);
  r.m1 = u.m1;
  r.m2 = u.m2;
  r.log_s1 = static_cast<float>(log_s1);
  r.log_s2 = static_cast<float>(log_s2);
  r.ep = static_cast<float>(u.t1 / u.s1);
  r.eq = static_cast<float>(u.t2 / u.s2);
  r.kl = u.s1 == 0 && u.s2 == 0 ? 0.0f : static_cast<float>(0.5 * (u.t1 / u.s1 - u.t2 / u.s2));
  // -inf in one pass only: that pass gives probability 0 where the other does not (unless the row
  // is NaN already, or a pass has no finite entry)
  if (u.lone && !std::isnan(r.kl)) r.kl = std::numeric_limits<float>::infinity();
  r.n_present = static_cast<float>(u.n_present);  // V' with smoothing, where it is used; else V
  if (o.has_target) {
    float zy1, zy2;
    load_pair<Fmt, kSoftcap>(z1, z2, y, o.softcap, zy1, zy2);
    // a_k = z_k[y] - m_k: exact where it matters; -inf for a label of probability 0
    const bool zero1 = zy1 == kNegInf, zero2 = zy2 == kNegInf;
    const double a1 = zero1 ? kNegInf : static_cast<double>(zy1) - u.m1;
    const double a2 = zero2 ? kNegInf : static_cast<double>(zy2) - u.m2;
    // (log s - a) + eps (a - sigma / V'): exactly 0 where it is 0 (V' = 1); a label of
    // probability 0 has an infinite cross entropy (also in a row with nothing present)
    double ce1 = zero1 ? -kNegInf : log_s1 - a1, ce2 = zero2 ? -kNegInf : log_s2 - a2;
    if constexpr (kSmoothing) {
      ce1 += zero1 ? 0.0 : o.eps * (a1 - u.sigma1 / u.n_present);
      ce2 += zero2 ? 0.0 : o.eps * (a2 - u.sigma2 / u.n_present);
    }
    r.ce1 = static_cast<float>(ce1);
    r.ce2 = static_cast<float>(ce2);
  }
  r.ok = std::isfinite(r.ce1 + r.ce2 + r.kl);
  return r;
}

// A row's gradient is a linear form in p, q, p (D - E_p[D]) and q (D - E_q[D]), with h = c_kl / 2
// and u = (1 - eps) [j == y] + eps / V' the label term (0 without target):
//   dz1 =  h p (D - E_p[D]) + (c_ce1 + h) p - h q - c_ce1 u  =  (h p) D + k1 p - h q - c_ce1 u
//   dz2 = -h q (D - E_q[D]) + (c_ce2 + h) q - h p - c_ce2 u  = -(h q) D + k2 q - h p - c_ce2 u
// with k1 = c_ce1 + h (1 - E_p[D]), k2 = c_ce2 + h (1 + E_q[D]), computed once per row. h p and
// h q come first, so that where p or q is 0 the term is 0 for a finite D however large (D h
// itself may overflow). Given p / s1 and q / s2 in place of p and q, the form scaled(s1, s2)
// gives the same dz1, dz2.
struct GradForm {
  float m1, m2, log_s1, log_s2;  // the row's stats
  float h1, h2;      // c_kl / 2, times s1 and s2 when scaled
  float k1, k2;      // times s1 and s2 when scaled
  float c1, c2;      // c_ce1, c_ce2
  float smooth;      // eps / V': u away from the label

  GradForm scaled(float s1, float s2) const {
    return {m1, m2, log_s1, log_s2, h1 * s1, h2 * s2, k1 * s1, k2 * s2, c1, c2, smooth};
  }
};

// kGuard: D may be infinite where p or q is 0 (a -inf logit), and 0 * inf := 0 there.
// kLabel: u may be nonzero.
template <bool kSoftcap, bool kGuard = true, bool kLabel = true>
[[gnu::always_inline]] inline void grads_of(float p, float q, float x1, float x2, bool present,
                                            float u, const GradForm& f, float softcap, float& g1,
                                            float& g2) {
  const float d = x1 - x2;
  const float hp = f.h1 * p, hq = f.h2 * q;
  float w1 = hp * d + f.k1 * p, w2 = f.k2 * q - hq * d;
  if constexpr (kGuard) {
    w1 = p > 0.0f ? w1 : 0.0f;
    w2 = q > 0.0f ? w2 : 0.0f;
  }
  float a = w1 - hq, b = w2 - hp;
  if constexpr (kLabel) {
    a -= f.c1 * u;
    b -= f.c2 * u;
  }
  if constexpr (kSoftcap) {  // d/dx c tanh(x / c) = 1 - (z / c)^2
    const float y1 = x1 * (1.0f / softcap), y2 = x2 * (1.0f / softcap);
    a *= 1.0f - y1 * y1;
    b *= 1.0f - y2 * y2;
  }
  g1 = present ? a : 0.0f;
  g2 = present ? b : 0.0f;
}

// Second pass: p and q from the stats, then dz1, dz2 (which may alias z1, z2: each position is
// read before it is written). The label's position is redone in fp32 with its (1 - eps) term,
// never as a read-modify-write of a stored bf16 value.
inline GradForm grad_form(const RowStats& st, float c_ce1, float c_ce2, float c_kl,
                          const Options& o) {
  const float h = 0.5f * c_kl;
  const float c1 = o.has_target ? c_ce1 : 0.0f, c2 = o.has_target ? c_ce2 : 0.0f;
  return {st.m1, st.m2, st.log_s1, st.log_s2, h, h, c1 + h * (1.0f - st.ep),
          c2 + h * (1.0f + st.eq), c1, c2,
          o.has_target && o.eps > 0.0f ? o.eps / st.n_present : 0.0f};
}

// The gradients of the whole words of elements [0, len) into dz1, dz2, which may be z1, z2: each
// word is read before it is written. p and q are exp(z - lse), or with kCached the stats pass's
// exponentials e1, e2 (lane by lane, see lane_major) times s1, s2. Without smoothing and softcap
// an absent position's gradient is 0 anyway (p = q = 0 and no label term).
template <typename Fmt, bool kSoftcap, bool kSmoothing, bool kGuard, bool kCached>
inline void grads_words(const Elem<Fmt>* z1, const Elem<Fmt>* z2, Elem<Fmt>* dz1,
                        Elem<Fmt>* dz2, int64_t len, const float* e1, const float* e2, float s1,
                        float s2, const GradForm& f, float cap) {
  constexpr int L = Fmt::kLanes;
  constexpr bool kMasked = kSmoothing || kSoftcap;
  const int64_t words = len / L;
#pragma omp simd
  for (int64_t k = 0; k < words; ++k) {
    const Word<L> w1 = unpack<Fmt>(z1, k), w2 = unpack<Fmt>(z2, k);
    auto lane = [&](float a, float b, int64_t at) __attribute__((always_inline)) {
      const bool here = present<kSoftcap>(a, b, cap);
      const float p = kCached ? e1[at] * s1 : vexp<Fmt::kExpDegree>(a - f.m1 - f.log_s1);
      const float q = kCached ? e2[at] * s2 : vexp<Fmt::kExpDegree>(b - f.m2 - f.log_s2);
      float g1, g2;
      grads_of<kSoftcap, kGuard, kSmoothing>(p, q, a, b, kMasked ? here : true, f.smooth, f, cap,
                                             g1, g2);
      return std::pair{g1, g2};
    };
    const auto [g1, g2] = lane(w1.x[0], w2.x[0], k);
    if constexpr (L == 1) {
      Fmt::pack(dz1, k, {{g1}});
      Fmt::pack(dz2, k, {{g2}});
    } else {
      const auto [h1, h2] = lane(w1.x[1], w2.x[1], words + k);
      Fmt::pack(dz1, k, {{g1, h1}});
      Fmt::pack(dz2, k, {{g2, h2}});
    }
  }
}

#if FASTRDROP_AVX512
// grads_words without kSoftcap, all lanes at once. kCached: p, q are the stats pass's
// exponentials, f is scaled, and the block has no -inf, NaN or +inf (no guard, every position
// present). Else p and q are exp(z - m - log s), and a row whose loss is finite may hold absent
// positions (-inf in both passes): there D is NaN and p = q = 0, and the guard and the presence
// test of grads_of give 0. u = eps / V' at every present position: the label's is redone after.
template <typename Fmt, bool kSmoothing, bool kCached>
void grads_avx512(const Elem<Fmt>* z1, const Elem<Fmt>* z2, Elem<Fmt>* dz1, Elem<Fmt>* dz2,
                  int64_t len, const float* e1, const float* e2, const GradForm& f,
                  bool stream) {
  using namespace avx512;
  constexpr int L = Fmt::kLanes;
  const int64_t words = len / L;
  const Vec h1 = set(f.h1), h2 = set(f.h2), k1 = set(f.k1), k2 = set(f.k2);
  const Vec m1 = set(f.m1), m2 = set(f.m2), log_s1 = set(f.log_s1), log_s2 = set(f.log_s2);
  const Vec label1 = set(kSmoothing ? -f.c1 * f.smooth : 0.0f);
  const Vec label2 = set(kSmoothing ? -f.c2 * f.smooth : 0.0f);
  const Vec zero = set(0.0f), neg_inf = set(kNegInf);
  const Exp2Table table = exp2_table();
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 64 == 0; };
  stream = stream && aligned(dz1) && aligned(dz2);  // then every whole step is a whole line
  for (int64_t k = 0; k < words; k += 16) {
    const Mask m = first(words - k);
    Vec a[L], b[L], g1[L], g2[L];
    if constexpr (!kCached) {  // the rows come from memory
      prefetch_next_page(z1 + L * k);
      prefetch_next_page(z2 + L * k);
    }
    Words<Fmt>::load(z1, k, m, a);
    Words<Fmt>::load(z2, k, m, b);
    for (int l = 0; l < L; ++l) {
      const Vec d = _mm512_sub_ps(a[l], b[l]);
      Vec p, q, c1 = label1, c2 = label2;
      Mask p_live = m, q_live = m;  // where p, q > 0: elsewhere 0 * D := 0
      if constexpr (kCached) {
        p = _mm512_maskz_loadu_ps(m, e1 + l * words + k);
        q = _mm512_maskz_loadu_ps(m, e2 + l * words + k);
      } else {
        p = exp<2>(_mm512_sub_ps(_mm512_sub_ps(a[l], m1), log_s1), table);
        q = exp<2>(_mm512_sub_ps(_mm512_sub_ps(b[l], m2), log_s2), table);
        p_live = _mm512_cmp_ps_mask(p, zero, _CMP_GT_OQ);
        q_live = _mm512_cmp_ps_mask(q, zero, _CMP_GT_OQ);
        if constexpr (kSmoothing) {
          const Mask here = _mm512_cmp_ps_mask(a[l], neg_inf, _CMP_NEQ_OQ) |
                            _mm512_cmp_ps_mask(b[l], neg_inf, _CMP_NEQ_OQ);
          c1 = _mm512_maskz_mov_ps(here, c1);
          c2 = _mm512_maskz_mov_ps(here, c2);
        }
      }
      // (h1 p) D + k1 p - h2 q - c1 u,  -(h2 q) D + k2 q - h1 p - c2 u (see GradForm)
      const Vec hp = _mm512_mul_ps(h1, p), hq = _mm512_mul_ps(h2, q);
      Vec rest1, rest2;  // all but the D terms
      if constexpr (kSmoothing) {
        rest1 = _mm512_fmadd_ps(k1, p, _mm512_sub_ps(c1, hq));
        rest2 = _mm512_fmadd_ps(k2, q, _mm512_sub_ps(c2, hp));
      } else {
        rest1 = _mm512_fmsub_ps(k1, p, hq);
        rest2 = _mm512_fmsub_ps(k2, q, hp);
      }
      g1[l] = _mm512_mask3_fmadd_ps(hp, d, rest1, p_live);
      g2[l] = _mm512_mask3_fnmadd_ps(hq, d, rest2, q_live);
    }
    Words<Fmt>::store(dz1, k, m, g1, stream);
    Words<Fmt>::store(dz2, k, m, g2, stream);
  }
  if (words * L < len) {  // the odd last element of a 16-bit run
    const int64_t at = words * L;
    grads_words<Single<Fmt>, false, kSmoothing, !kCached, kCached>(
        z1 + at, z2 + at, dz1 + at, dz2 + at, 1, kCached ? e1 + at : nullptr,
        kCached ? e2 + at : nullptr, 1.0f, 1.0f, f, 0.0f);
  }
}
#endif

// The label's position, redone in fp32 with its (1 - eps) term after the loop, never as a
// read-modify-write of a stored 16-bit value. p_y, q_y: its probabilities.
template <typename Fmt, bool kSoftcap>
inline void label_grads(Elem<Fmt>* dz1, Elem<Fmt>* dz2, int64_t y, float p_y, float q_y,
                        float z1_y, float z2_y, bool here, const GradForm& f, const Options& o) {
  float g1, g2;
  grads_of<kSoftcap>(p_y, q_y, z1_y, z2_y, here, 1.0f - o.eps + f.smooth, f, o.softcap, g1, g2);
  dz1[y] = Fmt::store(g1);
  dz2[y] = Fmt::store(g2);
}

// Both gradient rows set to value: 0 for an ignored row, NaN where the loss is not finite.
template <typename Fmt>
void fill_rows(Elem<Fmt>* dz1, Elem<Fmt>* dz2, int64_t vocab, float value) {
  const Elem<Fmt> stored = Fmt::store(value);
  std::fill(dz1, dz1 + vocab, stored);
  std::fill(dz2, dz2 + vocab, stored);
}

// The rows whose gradients are known without a pass: NaN where the loss is not finite, 0 where
// nothing is present (no maximum in either pass). Returns whether it filled them.
template <typename Fmt>
bool filled(const RowStats& st, Elem<Fmt>* dz1, Elem<Fmt>* dz2, int64_t vocab) {
  if (!st.ok) {
    fill_rows<Fmt>(dz1, dz2, vocab, NAN);
  } else if (st.m1 == kNegInf && st.m2 == kNegInf) {
    fill_rows<Fmt>(dz1, dz2, vocab, 0.0f);
  } else {
    return false;
  }
  return true;
}

template <typename Fmt, bool kSoftcap>
void row_grads(const Elem<Fmt>* z1, const Elem<Fmt>* z2, Elem<Fmt>* dz1, Elem<Fmt>* dz2,
               int64_t y, const RowStats& st, float c_ce1, float c_ce2, float c_kl,
               const Options& o) {
  if (filled<Fmt>(st, dz1, dz2, o.vocab)) return;
  const GradForm f = grad_form(st, c_ce1, c_ce2, c_kl, o);
  // a label outside [0, V) has no term here: with a vocabulary split across ranks it is another
  // rank's (the smoothing term stays)
  const bool label_local = o.has_target && y >= 0 && y < o.vocab;
  float label1 = 0.0f, label2 = 0.0f;  // read before the loop: dz may overwrite z
  const bool label_here =
      label_local && load_pair<Fmt, kSoftcap>(z1, z2, y, o.softcap, label1, label2);
  auto run = [&](auto smoothing) {
#if FASTRDROP_AVX512
    if constexpr (!kSoftcap) {
      grads_avx512<Fmt, decltype(smoothing)::value, false>(z1, z2, dz1, dz2, o.vocab, nullptr,
                                                           nullptr, f, o.stream);
      return;
    }
#endif
    by_words<Fmt>(o.vocab, [&](auto tag, int64_t at, int64_t count) {
      using W = typename decltype(tag)::type;
      grads_words<W, kSoftcap, decltype(smoothing)::value, true, false>(
          z1 + at, z2 + at, dz1 + at, dz2 + at, count, nullptr, nullptr, 1.0f, 1.0f, f, o.softcap);
    });
  };
  if (o.has_target && o.eps > 0.0f) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
  end_streams(o);
  if (label_local) {
    // degree 5 for every format: p_y - 1, as small as 1 - p_y for a likely label, takes p_y's
    // error whole (the AVX-512 loops' exp of degree 2 is as fine)
    label_grads<Fmt, kSoftcap>(dz1, dz2, y, vexp<5>(label1 - f.m1 - f.log_s1),
                               vexp<5>(label2 - f.m2 - f.log_s2), label1, label2, label_here,
                               f, o);
  }
}

// row_grads with p and q from the stats pass's exponentials: p = exp(z1 - shift1) times
// exp(shift1 - m1 - log s1), one factor per block, which goes into the form's coefficients (with the
// guard it goes into p and q: the guard tests p > 0). No softcap (its derivative needs the
// capped values).
template <typename Fmt, bool kSmoothing, bool kGuard>
void row_grads_cached(const Elem<Fmt>* z1, const Elem<Fmt>* z2, Elem<Fmt>* dz1, Elem<Fmt>* dz2,
                      int64_t y, const RowStats& st, float c_ce1, float c_ce2, float c_kl,
                      const Options& o, const RowCache& cache) {
  const GradForm f = grad_form(st, c_ce1, c_ce2, c_kl, o);
  auto factors = [&](int64_t block, float& f1, float& f2) {
    f1 = static_cast<float>(std::exp(static_cast<double>(cache.shift1[block]) - st.m1 - st.log_s1));
    f2 = static_cast<float>(std::exp(static_cast<double>(cache.shift2[block]) - st.m2 - st.log_s2));
  };
  float label1 = 0.0f, label2 = 0.0f, p_y = 0.0f, q_y = 0.0f;  // read before dz overwrites z
  const bool label_here = o.has_target && load_pair<Fmt, false>(z1, z2, y, 0.0f, label1, label2);
  if (o.has_target) {
    const int64_t start = y / kBlock * kBlock;
    const int64_t at = start + lane_major<Fmt>(y - start, std::min(kBlock, o.vocab - start));
    float f1, f2;
    factors(y / kBlock, f1, f2);
    p_y = cache.e1[at] * f1;
    q_y = cache.e2[at] * f2;
  }
  for (int64_t start = 0; start < o.vocab; start += kBlock) {
    const int64_t len = std::min(kBlock, o.vocab - start);
    float f1, f2;
    factors(start / kBlock, f1, f2);
    const GradForm fs = kGuard ? f : f.scaled(f1, f2);
    const float s1 = kGuard ? f1 : 1.0f, s2 = kGuard ? f2 : 1.0f;
#if FASTRDROP_AVX512
    if constexpr (!kGuard) {
      grads_avx512<Fmt, kSmoothing, true>(z1 + start, z2 + start, dz1 + start, dz2 + start, len,
                                          cache.e1 + start, cache.e2 + start, fs, o.stream);
      continue;
    }
#endif
    by_words<Fmt>(len, [&](auto tag, int64_t at, int64_t count) {
      using W = typename decltype(tag)::type;
      const int64_t i = start + at;
      grads_words<W, false, kSmoothing, kGuard, true>(z1 + i, z2 + i, dz1 + i, dz2 + i, count,
                                                      cache.e1 + i, cache.e2 + i, s1, s2, fs, 0.0f);
    });
  }
  end_streams(o);
  if (o.has_target) {
    label_grads<Fmt, false>(dz1, dz2, y, p_y, q_y, label1, label2, label_here, f, o);
  }
}

// This thread's RowCache for rows of `vocab` entries (kept between calls; 8 bytes per entry).
// e1 and e2 start on 64-byte lines, and so do the vector loops' steps in them, but for lane 1
// of the last block of a 16-bit row whose V % 32 is neither 0 nor 1. malloc aligns a vector to
// 16 bytes only, and off a line each 64-byte load and store of the exponentials touches two
// lines: aligned, the kernel alone took 10-19% less time in place at 256 x 32000 bf16, 26-28%
// less at 256 x 131072, 13-14% less at 256 x 32000 fp32 (Intel Xeon host, both builds in each
// process, in random order).
inline RowCache row_cache(int64_t vocab) {
  constexpr int64_t kLine = 64 / sizeof(float);
  thread_local std::vector<float> buffer;
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  const int64_t entries = (vocab + kLine - 1) / kLine * kLine;  // e1's and e2's, whole lines
  const int64_t size = 2 * (entries + blocks) + kLine - 1;
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  const auto at = reinterpret_cast<uintptr_t>(buffer.data());
  float* data = buffer.data() + (-at % 64) / sizeof(float);  // the first whole line
  return {data, data + entries, data + 2 * entries, data + 2 * entries + blocks};
}

// A row's stats, then its gradients from the exponentials that the stats pass kept: one exp per
// entry and pass, and each row read twice while it is in cache. No softcap. kInPlace: dz1, dz2
// are z1, z2 (see SumsAvx512's kCoarse).
template <typename Fmt, bool kSmoothing, bool kInPlace>
RowStats stats_and_grads(const Elem<Fmt>* z1, const Elem<Fmt>* z2, Elem<Fmt>* dz1, Elem<Fmt>* dz2,
                         int64_t y, float c_ce1, float c_ce2, float c_kl, const Options& o) {
  const RowCache cache = row_cache(o.vocab);
  const RowStats st = row_stats<Fmt, false, kSmoothing, true, kInPlace>(z1, z2, y, o, cache);
  if (filled<Fmt>(st, dz1, dz2, o.vocab)) return st;
  if (st.guarded) {
    row_grads_cached<Fmt, kSmoothing, true>(z1, z2, dz1, dz2, y, st, c_ce1, c_ce2, c_kl, o, cache);
  } else {
    row_grads_cached<Fmt, kSmoothing, false>(z1, z2, dz1, dz2, y, st, c_ce1, c_ce2, c_kl, o, cache);
  }
  return st;
}

inline bool ignored(const int64_t* target, int64_t row, const Options& o) {
  return o.has_target && target[row] == o.ignore_index;
}

// ---- whole batches -----------------------------------------------------------------------------

constexpr int kStats = 8;  // rows of stats

inline void store_row(const RowStats& st, float* parts, float* stats, int64_t n_rows,
                      int64_t row) {
  const float out_parts[3] = {st.ce1, st.ce2, st.kl};
  const float out_stats[kStats] = {st.m1, st.m2, st.log_s1, st.log_s2, st.ep,
                                   st.eq, st.n_present, st.ok ? 1.0f : 0.0f};
  for (int k = 0; k < 3; ++k) parts[k * n_rows + row] = out_parts[k];
  for (int k = 0; k < kStats; ++k) stats[k * n_rows + row] = out_stats[k];
}

// Where the forward pass writes the gradients of row_weight * (CE_1 + CE_2 + alpha * symKL):
// nowhere (row_weight NULL), into z1, z2 themselves (in place), or into other rows.
template <typename Fmt>
struct GradOut {
  const float* row_weight;
  float alpha;
  Elem<Fmt>* dz1;
  Elem<Fmt>* dz2;
  int64_t stride1, stride2;
};

// Forward; with out.row_weight, also the gradients, in a second pass over each row while it is
// in cache.
template <typename Fmt, bool kSoftcap>
void forward(const Elem<Fmt>* z1, const Elem<Fmt>* z2, int64_t stride1, int64_t stride2,
             int64_t n_rows, const int64_t* target, const Options& o, const GradOut<Fmt>& out,
             float* parts, float* stats, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t row = 0; row < n_rows; ++row) {
    const Elem<Fmt>* r1 = z1 + row * stride1;
    const Elem<Fmt>* r2 = z2 + row * stride2;
    Elem<Fmt>* d1 = out.row_weight ? out.dz1 + row * out.stride1 : nullptr;
    Elem<Fmt>* d2 = out.row_weight ? out.dz2 + row * out.stride2 : nullptr;
    if (ignored(target, row, o)) {
      for (int k = 0; k < 3; ++k) parts[k * n_rows + row] = 0.0f;
      for (int k = 0; k < kStats; ++k) stats[k * n_rows + row] = 0.0f;
      if (out.row_weight) fill_rows<Fmt>(d1, d2, o.vocab, 0.0f);
      continue;
    }
    const int64_t y = o.has_target ? target[row] : 0;
    const bool smoothing = o.has_target && o.eps > 0.0f;
    if constexpr (!kSoftcap) {
      if (out.row_weight) {
        const float w = out.row_weight[row];
        auto run = [&](auto smooth, auto in_place) {
          return stats_and_grads<Fmt, smooth, in_place>(r1, r2, d1, d2, y, w, w, out.alpha * w, o);
        };
        const RowStats st = d1 == r1 ? smoothing ? run(std::true_type{}, std::true_type{})
                                                 : run(std::false_type{}, std::true_type{})
                            : smoothing ? run(std::true_type{}, std::false_type{})
                                        : run(std::false_type{}, std::false_type{});
        store_row(st, parts, stats, n_rows, row);
        continue;
      }
    }
    const RowStats st = smoothing ? row_stats<Fmt, kSoftcap, true>(r1, r2, y, o)
                                  : row_stats<Fmt, kSoftcap, false>(r1, r2, y, o);
    store_row(st, parts, stats, n_rows, row);
    if (out.row_weight) {
      const float w = out.row_weight[row];
      row_grads<Fmt, kSoftcap>(r1, r2, d1, d2, y, st, w, w, out.alpha * w, o);
    }
  }
}

// upstream: as in fastrdrop_cpu_backward.
template <typename Fmt, bool kSoftcap>
void backward(const Elem<Fmt>* z1, const Elem<Fmt>* z2, int64_t stride1, int64_t stride2,
              int64_t n_rows, const int64_t* target, const Options& o, const float* stats,
              const float* grad_parts, const float* upstream, int64_t upstream_stride,
              Elem<Fmt>* dz1, Elem<Fmt>* dz2, int64_t dstride1, int64_t dstride2,
              int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t row = 0; row < n_rows; ++row) {
    if (upstream && upstream[row * upstream_stride] == 1.0f) continue;
    Elem<Fmt>* d1 = dz1 + row * dstride1;
    Elem<Fmt>* d2 = dz2 + row * dstride2;
    if (ignored(target, row, o)) {
      fill_rows<Fmt>(d1, d2, o.vocab, 0.0f);
      continue;
    }
    RowStats st{};
    st.m1 = stats[row];
    st.m2 = stats[n_rows + row];
    st.log_s1 = stats[2 * n_rows + row];
    st.log_s2 = stats[3 * n_rows + row];
    st.ep = stats[4 * n_rows + row];
    st.eq = stats[5 * n_rows + row];
    st.n_present = stats[6 * n_rows + row];
    st.ok = stats[7 * n_rows + row] != 0.0f;
    row_grads<Fmt, kSoftcap>(z1 + row * stride1, z2 + row * stride2, d1, d2,
                           o.has_target ? target[row] : 0, st, grad_parts[row],
                           grad_parts[n_rows + row], grad_parts[2 * n_rows + row], o);
  }
}

// A fresh gradient buffer is first touched by the kernel's writes; with 4 KiB pages the page
// faults cost more than the kernel itself. Ask for transparent huge pages on the buffer's whole
// pages (Linux; a no-op where THP is off or the buffer is small).
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr int64_t kHuge = int64_t{2} << 20;
  if (bytes < 2 * kHuge) return;
  const int64_t page = sysconf(_SC_PAGESIZE);
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + page - 1) / page * page;
  const uintptr_t last = (begin + bytes) / page * page;
  madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Options::stream for gradient rows dz1 that are not the logits z1
inline bool streams(const void* z1, const void* dz1, int64_t n_rows, int64_t vocab,
                    int64_t elem_bytes) {
  return dz1 != z1 && 2 * n_rows * vocab * elem_bytes >= kStreamBytes;
}

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Calls f(Tag<Fmt>{}, std::bool_constant<softcap>{}) for the element format and softcap flag.
template <typename F>
int dispatch(int dtype, bool softcap, F&& f) {
  auto with_type = [&](auto tag) {
    if (softcap) {
      f(tag, std::true_type{});
    } else {
      f(tag, std::false_type{});
    }
  };
  switch (dtype) {
    case kFloat32: with_type(Tag<F32>{}); return 0;
    case kBFloat16: with_type(Tag<BF16>{}); return 0;
    case kFloat16: with_type(Tag<F16>{}); return 0;
    default: return 1;
  }
}

// ---- the instruction sets the build may use (features.h) ----------------------------------

// Whether macro m is defined (as a number): its expansion, as a string, no longer starts with "_"
#define FASTRDROP_STRING(m) #m
#define FASTRDROP_DEFINED(m) (FASTRDROP_STRING(m)[0] != '_')

struct Feature {
  bool built_for;  // the compiler was allowed to use it (-march)
  const char* name;
};

#define FASTRDROP_BUILT_FOR_X86(macro, name, ...) {FASTRDROP_DEFINED(macro), name},
#define FASTRDROP_BUILT_FOR_ARM(macro, name) {FASTRDROP_DEFINED(macro), name},
constexpr Feature kFeatures[] = {FASTRDROP_X86_FEATURES(FASTRDROP_BUILT_FOR_X86)
                                     FASTRDROP_ARM_FEATURES(FASTRDROP_BUILT_FOR_ARM)};

// The features built for: constant data, made by the compiler, so that the function that
// returns it runs no instruction the CPU may lack.
constexpr FastrdropFeatureNames built_for_names() {
  FastrdropFeatureNames out;
  int at = 0;
  for (const Feature& f : kFeatures) {
    if (!f.built_for) continue;
    for (const char* c = f.name; *c; ++c) out.text[at++] = *c;
    out.text[at++] = ' ';
  }
  return out;
}

constexpr FastrdropFeatureNames kBuiltFor = built_for_names();

}  // namespace

// ---- C API: returns 0, or 1 for an unknown dtype -------------------------------------------

extern "C" {

// Bumped whenever a signature of the C API (below, and in features.cpp) changes: the loader
// refuses a stale build.
FASTRDROP_API int fastrdrop_cpu_abi_version() { return 8; }

// The CPU features this build may use, as /proc/cpuinfo names them, separated by spaces ("" for
// a build for the architecture's baseline).
FASTRDROP_API const char* fastrdrop_cpu_features() { return kBuiltFor.text; }

// The index of the first of the n labels that lies outside [0, vocab) and is not ignore_index,
// or -1 where there is none: the argument check of the CPU backends, one pass over the labels
// with no tensor made.
FASTRDROP_API int64_t fastrdrop_cpu_first_bad_label(const int64_t* target, int64_t n,
                                                    int64_t vocab, int64_t ignore_index) {
  for (int64_t i = 0; i < n; ++i) {
    if ((target[i] < 0 || target[i] >= vocab) && target[i] != ignore_index) return i;
  }
  return -1;
}

// z1, z2: [n_rows, vocab] rows of `dtype`, row strides in elements; target: int64 [n_rows] or
// NULL; softcap 0 for none. parts: float [3, n_rows]; stats: float [8, n_rows]. row_weight: NULL
// for the plain forward, else [n_rows], and the gradients go into the rows of dz1, dz2 (row
// strides dstride1, dstride2), which may be z1, z2 themselves.
FASTRDROP_API int fastrdrop_cpu_forward(void* z1, void* z2, int64_t stride1, int64_t stride2, int dtype,
                          int64_t n_rows, int64_t vocab, const int64_t* target,
                          int64_t ignore_index, float label_smoothing, float softcap,
                          const float* row_weight, float alpha, void* dz1, void* dz2,
                          int64_t dstride1, int64_t dstride2, float* parts, float* stats,
                          int num_threads) {
  return dispatch(dtype, softcap > 0.0f, [&](auto tag, auto has_softcap) {
    using Fmt = typename decltype(tag)::type;
    using T = Elem<Fmt>;
    const Options o{vocab, ignore_index, label_smoothing, softcap, target != nullptr,
                    row_weight && streams(z1, dz1, n_rows, vocab, sizeof(T))};
    if (row_weight && dz1 != z1) {
      advise_huge_pages(dz1, n_rows * dstride1 * int64_t{sizeof(T)});
      advise_huge_pages(dz2, n_rows * dstride2 * int64_t{sizeof(T)});
    }
    const GradOut<Fmt> out{row_weight, alpha, static_cast<T*>(dz1), static_cast<T*>(dz2),
                           dstride1, dstride2};
    forward<Fmt, has_softcap>(static_cast<const T*>(z1), static_cast<const T*>(z2), stride1,
                              stride2, n_rows, target, o, out, parts, stats, num_threads);
  });
}

// grad_parts: float [3, n_rows], the upstream gradients of (CE_1, CE_2, symKL); dz1, dz2:
// [n_rows, vocab] of `dtype` with row strides dstride1, dstride2, which may be z1, z2
// themselves. A label outside [0, vocab) that is not ignore_index has no term (another rank's).
// upstream: NULL, or float per row (row stride upstream_stride, 0 for one value for all): the
// rows where it is 1 are left as they are (the forward pass wrote their gradients).
FASTRDROP_API int fastrdrop_cpu_backward(const void* z1, const void* z2, int64_t stride1,
                                         int64_t stride2, int dtype, int64_t n_rows, int64_t vocab,
                                         const int64_t* target, int64_t ignore_index,
                                         float label_smoothing, float softcap, const float* stats,
                                         const float* grad_parts, const float* upstream,
                                         int64_t upstream_stride, void* dz1, void* dz2,
                                         int64_t dstride1, int64_t dstride2, int num_threads) {
  return dispatch(dtype, softcap > 0.0f, [&](auto tag, auto has_softcap) {
    using Fmt = typename decltype(tag)::type;
    using T = Elem<Fmt>;
    const Options o{vocab, ignore_index, label_smoothing, softcap, target != nullptr,
                    streams(z1, dz1, n_rows, vocab, sizeof(T))};
    if (dz1 != z1 && !upstream) {  // else the forward pass has touched (and advised) them
      advise_huge_pages(dz1, n_rows * dstride1 * int64_t{sizeof(T)});
      advise_huge_pages(dz2, n_rows * dstride2 * int64_t{sizeof(T)});
    }
    backward<Fmt, has_softcap>(static_cast<const T*>(z1), static_cast<const T*>(z2), stride1,
                               stride2, n_rows, target, o, stats, grad_parts, upstream,
                               upstream_stride, static_cast<T*>(dz1), static_cast<T*>(dz2),
                               dstride1, dstride2, num_threads);
  });
}

// partials: float [10, n_rows], each row's partial statistics over its `vocab` entries (a slice
// of a vocabulary split across ranks): m1, m2, s1, s2, t1, t2, sigma1, sigma2, V' (sigma_k and
// V' with smoothing only; else 0 and vocab), and 1 where a position is -inf in one pass only.
FASTRDROP_API int fastrdrop_cpu_partials(const void* z1, const void* z2, int64_t stride1,
                                         int64_t stride2, int dtype, int64_t n_rows, int64_t vocab,
                                         int smoothing, float softcap, float* partials,
                                         int num_threads) {
  const Options o{vocab, 0, smoothing ? 1.0f : 0.0f, softcap, smoothing != 0};
  return dispatch(dtype, softcap > 0.0f, [&](auto tag, auto has_softcap) {
    using Fmt = typename decltype(tag)::type;
    using T = Elem<Fmt>;
    constexpr bool kSoftcap = decltype(has_softcap)::value;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t row = 0; row < n_rows; ++row) {
      const T* r1 = static_cast<const T*>(z1) + row * stride1;
      const T* r2 = static_cast<const T*>(z2) + row * stride2;
      const RowSums u = smoothing ? row_sums<Fmt, kSoftcap, true>(r1, r2, o)
                                  : row_sums<Fmt, kSoftcap, false>(r1, r2, o);
      const double values[10] = {u.m1, u.m2, u.s1, u.s2, u.t1, u.t2, u.sigma1, u.sigma2,
                                 u.n_present, u.lone ? 1.0 : 0.0};
      for (int k = 0; k < 10; ++k) partials[k * n_rows + row] = static_cast<float>(values[k]);
    }
  });
}

}  // extern "C"
