/* cblas_sgemm for MLX's Linux wheel, whose libmlx.so multiplies fp32 matrices with a bundled
   reference BLAS, on the Fortran sgemm_ that torch's libtorch_cpu.so exports (the MKL torch
   links in). Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
   MLX calls BLAS from its own stream thread, which gets an OpenMP team of its own, sized here
   from LLMBOOK_MLX_BLAS_THREADS (default 1): beside torch's team in one process, a second team
   of 2 threads on 2 cores makes both engines wait for each other (chapter 4).
   Built by llmbook.mlx_blas; chapter 4 measures it. */
#include <stdlib.h>

enum { ColMajor = 102, NoTrans = 111, Trans = 112 };
extern void sgemm_(const char *, const char *, const int *, const int *, const int *,
                   const float *, const float *, const int *, const float *, const int *,
                   const float *, float *, const int *);
extern void omp_set_num_threads(int);

static __thread int sized;
static char op(int x) { return x == NoTrans ? 'N' : x == Trans ? 'T' : 'C'; }

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  if (!sized) {
    const char *env = getenv("LLMBOOK_MLX_BLAS_THREADS");
    omp_set_num_threads(env ? atoi(env) : 1);
    sized = 1;
  }
  char ca = op(ta), cb = op(tb);
  if (order == ColMajor)
    sgemm_(&ca, &cb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  else
    sgemm_(&cb, &ca, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}
