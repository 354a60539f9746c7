/* The fused CPU kernels of the memory-efficient dense block: every exported function, declared
   once for each element type.

   This is the one list of their signatures. kernels.c includes it, so the compiler checks each
   definition against it, and densenet/ops/cpu.py parses it into the ctypes signatures (argtypes
   and restype) it calls them with. That parser is deliberately small and strict - it refuses
   what it does not know rather than guess - so the prototypes keep to its grammar:

     * each prototype ends with ';' and sits inside DENSENET_KERNELS, one per function;
     * the return type is void, or int (a status: 0, or nonzero when scratch memory could not be
       allocated);
     * parameters are named, of type long or int, or a pointer (const allowed): T *, A * or
       double * - every pointer is passed as an address;
     * a name is its kernel's name followed by _##S.

   Matrices are row-major with a leading dimension (m rows, c columns, row stride ld*), so the
   kernels read and write column slices of a larger buffer in place; nt is the number of OpenMP
   threads. */
#ifndef DENSENET_KERNELS_H
#define DENSENET_KERNELS_H

#include <stdint.h>

/* T: the element type as stored; A: the type the arithmetic is done in, and of the per-column
   vectors (scale, shift, mean, a, b, coef, cst); S: the suffix of the names. */
#define DENSENET_KERNELS(T, A, S)                                                                 \
    void bn_relu_##S(long m, long c, const T *x, long ldx, const A *scale, const A *shift, T *z,  \
                     long ldz, int nt);                                                           \
    int col_stats_acc_##S(long m, long c, const T *x, long ldx, double *state, int nt);           \
    void copy_cols_##S(long m, long c, const T *src, long lds, T *dst, long ldd, int nt);         \
    int bn_relu_grad_##S(long m, long c, const T *x, long ldx, const T *g, long ldg,              \
                         const A *scale, const A *shift, const A *mean, T *dx, long lddx,         \
                         int assign, T *z, long ldz, double *sums, int nt);                       \
    void bn_grad_apply_##S(long m, long c, const T *x, long ldx, const T *g, long ldg,            \
                           const A *scale, const A *shift, const A *mean, const A *a,             \
                           const A *b, T *out, long ldo, int nt);                                 \
    void col_affine_add_##S(long m, long c, const T *x, long ldx, const A *coef, const A *cst,    \
                            const T *src, long lds, T *dst, long ldd, int nt);                    \
    int bn_relu_maxpool_##S(long n, long h, long w, long c, const T *x, const A *scale,           \
                            const A *shift, long kh, long kw, long sh, long sw, long ph,          \
                            long pw, long oh, long ow, T *out, int nt);                           \
    int bn_relu_maxpool_grad_##S(long n, long h, long w, long c, const T *x, const A *scale,      \
                                 const A *shift, const A *mean, long kh, long kw, long sh,        \
                                 long sw, long ph, long pw, long oh, long ow, const T *gout,      \
                                 T *dx, double *sums, int nt);

/* The element types: float32, float64, and bfloat16 (stored as its 16 bits, computed in float). */
DENSENET_KERNELS(float, float, f32)
DENSENET_KERNELS(double, double, f64)
DENSENET_KERNELS(uint16_t, float, bf16)

#endif
