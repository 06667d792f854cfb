/* The causal depthwise conv1d of the Mamba mixers with its SiLU, forward and backward, on CPU: PyTorch's
 * depthwise conv backward is several times slower than the pass over memory it needs. Built by
 * nas/ops/cpu_kernels.py, called by nas/ops/causal_conv.py.
 */
#include "vec_math.h"

#define REAL float
#define W WF
#define VEC vf
#define SIGMOIDV sigmoid_vf
#define NAME(x) x##_f32
#include "causal_conv_body.h"
#undef REAL
#undef W
#undef VEC
#undef SIGMOIDV
#undef NAME

#define REAL double
#define W WD
#define VEC vd
#define SIGMOIDV sigmoid_vd
#define NAME(x) x##_f64
#include "causal_conv_body.h"
