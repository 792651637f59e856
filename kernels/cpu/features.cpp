// Which of the extensions in features.h this CPU has. Compiled without -march (CMakeLists.txt),
// for the architecture's baseline: the loader calls it first, on any CPU of the architecture,
// before anything built for the building machine's CPU runs.

#include "features.h"

using namespace fastrdrop_features;

namespace {

#if defined(__x86_64__)
struct Location {
  const char* name;
  uint32_t leaf, subleaf;
  Reg reg;
  int bit;
  State state;
};

#define FASTRDROP_LOCATION(macro, name, leaf, subleaf, reg, bit, state) \
  {name, leaf, subleaf, reg, bit, state},
constexpr Location kLocations[] = {FASTRDROP_X86_FEATURES(FASTRDROP_LOCATION)};

void cpuid(uint32_t leaf, uint32_t subleaf, uint32_t (&r)[4]) {
  __asm__("cpuid" : "=a"(r[kEax]), "=b"(r[kEbx]), "=c"(r[kEcx]), "=d"(r[kEdx])
          : "a"(leaf), "c"(subleaf));
}

// The extensions that this CPU has and whose registers the OS saves, from cpuid and XCR0, as
// the compiler's -march=native saw them (/proc/cpuinfo names only the flags its kernel knows).
void detect(FastrdropFeatureNames& out) {
  uint32_t r[4];
  cpuid(0, 0, r);
  const uint32_t max_leaf = r[kEax];
  cpuid(0x80000000u, 0, r);
  const uint32_t max_extended = r[kEax];
  cpuid(1, 0, r);
  uint64_t xcr0 = 0;
  if (r[kEcx] >> 27 & 1) {  // OSXSAVE: xgetbv may run
    uint32_t low, high;
    __asm__("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
    xcr0 = (uint64_t{high} << 32) | low;
  }
  const bool ymm = (xcr0 & 0x6) == 0x6;           // SSE and AVX state
  const bool zmm = ymm && (xcr0 & 0xE0) == 0xE0;  // opmask, upper ZMM0-15, ZMM16-31
  uint32_t max_subleaf7 = 0;
  if (max_leaf >= 7) {
    cpuid(7, 0, r);
    max_subleaf7 = r[kEax];
  }
  int at = 0;
  for (const Location& f : kLocations) {
    const bool listed = (f.leaf >= 0x80000000u ? f.leaf <= max_extended : f.leaf <= max_leaf) &&
                        (f.leaf != 7 || f.subleaf <= max_subleaf7);
    if (!listed) continue;
    cpuid(f.leaf, f.subleaf, r);
    const bool saved = f.state == kNoState || (f.state == kYmm ? ymm : zmm);
    if (!(r[f.reg] >> f.bit & 1) || !saved) continue;
    for (const char* c = f.name; *c; ++c) out.text[at++] = *c;
    out.text[at++] = ' ';
  }
}
#endif

}  // namespace

extern "C" {

// Of the extensions that fastrdrop_cpu_features may name, those this CPU has and its OS
// enables, in the same form; NULL where the library cannot tell (not x86-64).
FASTRDROP_API const char* fastrdrop_cpu_detected() {
#if defined(__x86_64__)
  static FastrdropFeatureNames detected;
  static const bool done = (detect(detected), true);
  (void)done;
  return detected.text;
#else
  return nullptr;
#endif
}

}  // extern "C"
