/* The selective scan on CPU, fused: the state of W channels lives in the lanes of a vector and every
 * time step is one pass over N such vectors, with no per-op overhead and nothing of size
 * (batch, D, L, N) in memory (the backward keeps one channel vector's L states and decays, which stay
 * in cache). The elementwise work around the recurrence (delta's bias and softplus, the D term, the z
 * gate and their gradients) is done in the same pass. Built by nas/ops/cpu_kernels.py, called by
 * nas/ops/scan_cpu.py.
 */
#include "vec_math.h"

#define REAL float
#define W WF
#define VEC vf
#define EXP2V exp2_vf
#define SIGMOIDV sigmoid_vf
#define SOFTPLUSV softplus_vf
#ifdef TRANSPOSE16_F32
#define TRANSPOSE16 TRANSPOSE16_F32
#endif
#define NAME(x) x##_f32
#include "scan_cpu_body.h"
#undef REAL
#undef W
#undef VEC
#undef EXP2V
#undef SIGMOIDV
#undef SOFTPLUSV
#undef NAME
#undef TRANSPOSE16

#define REAL double
#define W WD
#define VEC vd
#define EXP2V exp2_vd
#define SIGMOIDV sigmoid_vd
#define SOFTPLUSV softplus_vd
#define NAME(x) x##_f64
#include "scan_cpu_body.h"

/* the lane count of each type, for the caller's channel blocks */
int lanes_f32(void) { return WF; }
int lanes_f64(void) { return WD; }
