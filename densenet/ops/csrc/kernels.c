/* Fused CPU kernels for the memory-efficient dense block (see densenet/ops/cpu.py for what each
   computes). Built by cpu.py on first use with
       cc -O3 -march=native -ffp-contract=off -fopenmp -fPIC -shared kernels.c
   and called through ctypes with the signatures declared in kernels.h. Each kernel's body is in
   kernels_body.h, written once and compiled here for each element type. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "kernels.h"

/* Scratch allocation that never asks for 0 bytes, so that NULL always means out of memory. The
   functions that allocate return 0, or 1 when an allocation failed (then nothing is merged into
   their accumulators; inside a parallel region the thread whose allocation failed skips its
   work and sets the shared flag), and free all they allocated either way. */
static inline void *scratch_malloc(size_t n) { return malloc(n ? n : 1); }
static inline void *scratch_calloc(size_t n, size_t size) { return calloc(n ? n : 1, size ? size : 1); }

/* Element loads and stores: float and double as they are; bfloat16 (stored as uint16_t) widened
   to float on load and rounded to nearest even on store, NaN to 0x7fc0, as PyTorch rounds. */
#define LD_f32(v) (v)
#define ST_f32(v) (v)
#define LD_f64(v) (v)
#define ST_f64(v) (v)
#define LD_bf16(v) bf16_to_float(v)
#define ST_bf16(v) float_to_bf16(v)
/* (branch-free, through a union: so that GCC vectorises the loops that use them) */
typedef union { uint32_t u; float f; } bits32;
static inline float bf16_to_float(uint16_t h) {
    bits32 v;
    v.u = (uint32_t)h << 16;
    return v.f;
}
static inline uint16_t float_to_bf16(float f) {
    bits32 v;
    v.f = f;
    uint32_t rounded = (v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? 0x7fc0u : rounded);
}

/* f ## _ ## S, with S expanded first (hence the two levels) */
#define PASTE_(a, b) a##_##b
#define PASTE(a, b) PASTE_(a, b)
#define NAME(f) PASTE(f, S)
#define LD(v) PASTE(LD, S)(v)
#define ST(v) PASTE(ST, S)(v)

/* the same element types as kernels.h instantiates */
#define T float
#define A float
#define S f32
#include "kernels_body.h"
#undef T
#undef A
#undef S

#define T double
#define A double
#define S f64
#include "kernels_body.h"
#undef T
#undef A
#undef S

#define T uint16_t
#define A float
#define S bf16
#include "kernels_body.h"
#undef T
#undef A
#undef S
