// The instruction-set extensions that a build of the native kernel for a given CPU (-march) may
// use, and where a CPU says it has them. A library built with -march=native on one CPU dies of an
// illegal instruction on a CPU that lacks one of them: rdrop.cpp lists those it was built for
// (fastrdrop_cpu_features), features.cpp, compiled without -march, those the CPU has
// (fastrdrop_cpu_detected), and the loader refuses a library built for what the CPU lacks.
#pragma once

#include <cstdint>

#define FASTRDROP_API __attribute__((visibility("default")))

namespace fastrdrop_features {

enum Reg : uint8_t { kEax, kEbx, kEcx, kEdx };
enum State : uint8_t { kNoState, kYmm, kZmm };  // the registers the OS must save (XCR0)

}  // namespace fastrdrop_features

// x86-64: X(macro the compiler defines when it may use the extension, its name in Linux's
// /proc/cpuinfo, cpuid leaf, subleaf, register, bit (as in GCC's and Clang's cpuid.h), the
// registers it needs the OS to save). The extensions a compiler may emit without intrinsics
// (auto-vectorised code, scalar bit operations, AMD's software prefetches) and those the kernel's
// intrinsics use.
#define FASTRDROP_X86_FEATURES(X)                                    \
  X(__SSE3__, "pni", 1, 0, kEcx, 0, kNoState)                        \
  X(__SSSE3__, "ssse3", 1, 0, kEcx, 9, kNoState)                     \
  X(__FMA__, "fma", 1, 0, kEcx, 12, kYmm)                            \
  X(__SSE4_1__, "sse4_1", 1, 0, kEcx, 19, kNoState)                  \
  X(__SSE4_2__, "sse4_2", 1, 0, kEcx, 20, kNoState)                  \
  X(__MOVBE__, "movbe", 1, 0, kEcx, 22, kNoState)                    \
  X(__POPCNT__, "popcnt", 1, 0, kEcx, 23, kNoState)                  \
  X(__AVX__, "avx", 1, 0, kEcx, 28, kYmm)                            \
  X(__F16C__, "f16c", 1, 0, kEcx, 29, kYmm)                          \
  X(__BMI__, "bmi1", 7, 0, kEbx, 3, kNoState)                        \
  X(__AVX2__, "avx2", 7, 0, kEbx, 5, kYmm)                           \
  X(__BMI2__, "bmi2", 7, 0, kEbx, 8, kNoState)                       \
  X(__AVX512F__, "avx512f", 7, 0, kEbx, 16, kZmm)                    \
  X(__AVX512DQ__, "avx512dq", 7, 0, kEbx, 17, kZmm)                  \
  X(__AVX512IFMA__, "avx512ifma", 7, 0, kEbx, 21, kZmm)              \
  X(__AVX512PF__, "avx512pf", 7, 0, kEbx, 26, kZmm)                  \
  X(__AVX512ER__, "avx512er", 7, 0, kEbx, 27, kZmm)                  \
  X(__AVX512CD__, "avx512cd", 7, 0, kEbx, 28, kZmm)                  \
  X(__AVX512BW__, "avx512bw", 7, 0, kEbx, 30, kZmm)                  \
  X(__AVX512VL__, "avx512vl", 7, 0, kEbx, 31, kZmm)                  \
  X(__AVX512VBMI__, "avx512vbmi", 7, 0, kEcx, 1, kZmm)               \
  X(__AVX512VBMI2__, "avx512_vbmi2", 7, 0, kEcx, 6, kZmm)            \
  X(__GFNI__, "gfni", 7, 0, kEcx, 8, kNoState)                       \
  X(__VAES__, "vaes", 7, 0, kEcx, 9, kYmm)                           \
  X(__VPCLMULQDQ__, "vpclmulqdq", 7, 0, kEcx, 10, kYmm)              \
  X(__AVX512VNNI__, "avx512_vnni", 7, 0, kEcx, 11, kZmm)             \
  X(__AVX512BITALG__, "avx512_bitalg", 7, 0, kEcx, 12, kZmm)         \
  X(__AVX512VPOPCNTDQ__, "avx512_vpopcntdq", 7, 0, kEcx, 14, kZmm)   \
  X(__AVX512VP2INTERSECT__, "avx512_vp2intersect", 7, 0, kEdx, 8, kZmm) \
  X(__AVX512FP16__, "avx512_fp16", 7, 0, kEdx, 23, kZmm)             \
  X(__AVXVNNI__, "avx_vnni", 7, 1, kEax, 4, kYmm)                    \
  X(__AVX512BF16__, "avx512_bf16", 7, 1, kEax, 5, kZmm)              \
  X(__LZCNT__, "abm", 0x80000001u, 0, kEcx, 5, kNoState)             \
  X(__SSE4A__, "sse4a", 0x80000001u, 0, kEcx, 6, kNoState)           \
  X(__PRFCHW__, "3dnowprefetch", 0x80000001u, 0, kEcx, 8, kNoState)  \
  X(__XOP__, "xop", 0x80000001u, 0, kEcx, 11, kYmm)                  \
  X(__FMA4__, "fma4", 0x80000001u, 0, kEcx, 16, kYmm)                \
  X(__TBM__, "tbm", 0x80000001u, 0, kEcx, 21, kNoState)

// AArch64: X(macro, its name in the "Features" of Linux's /proc/cpuinfo)
#define FASTRDROP_ARM_FEATURES(X)                          \
  X(__ARM_FEATURE_ATOMICS, "atomics")                      \
  X(__ARM_FEATURE_QRDMX, "asimdrdm")                       \
  X(__ARM_FEATURE_FP16_VECTOR_ARITHMETIC, "asimdhp")       \
  X(__ARM_FEATURE_DOTPROD, "asimddp")                      \
  X(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC, "bf16")          \
  X(__ARM_FEATURE_MATMUL_INT8, "i8mm")                     \
  X(__ARM_FEATURE_SVE, "sve")                              \
  X(__ARM_FEATURE_SVE2, "sve2")

// Names, each followed by a space.
struct FastrdropFeatureNames {
  char text[512] = {};
};
