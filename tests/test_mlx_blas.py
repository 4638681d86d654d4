"""The shim that gives MLX torch's MKL (llmbook.mlx_blas, chapter 4): its cblas_sgemm must be
the BLAS routine for every layout and transpose MLX may pass. Chapter 4 runs the routes
themselves (a process each), so here only the shim's arithmetic is checked, in-process."""
import ctypes

import numpy as np
import pytest

from llmbook import mlx_blas

ROW, COL, N, T = 101, 102, 111, 112


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    why = mlx_blas.unavailable()
    if why:
        pytest.skip(why)
    import torch  # noqa: F401  libtorch_cpu.so, whose sgemm_ the shim calls, is loaded

    return ctypes.CDLL(str(mlx_blas.build_shim(tmp_path_factory.mktemp("shim"))))


def ptr(a):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


@pytest.mark.parametrize("order", [ROW, COL])
@pytest.mark.parametrize("ta, tb", [(N, N), (N, T), (T, N), (T, T)])
def test_cblas_sgemm(shim, order, ta, tb):
    m, n, k, alpha, beta = 3, 5, 4, 1.5, 0.5
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, m) if ta == T else (m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if tb == T else (k, n), dtype=np.float32)
    c = rng.standard_normal((m, n), dtype=np.float32)
    want = alpha * ((a.T if ta == T else a) @ (b.T if tb == T else b)) + beta * c
    if order == COL:  # the same matrices stored column by column
        a, b, c = (np.asfortranarray(x) for x in (a, b, c))
        lda, ldb, ldc = a.shape[0], b.shape[0], m
    else:
        lda, ldb, ldc = a.shape[1], b.shape[1], n
    f = ctypes.c_float
    shim.cblas_sgemm(order, ta, tb, m, n, k, f(alpha), ptr(a), lda, ptr(b), ldb, f(beta),
                     ptr(c), ldc)
    assert np.allclose(c, want, atol=1e-5)


def test_unavailable_is_a_reason_or_none():
    why = mlx_blas.unavailable()
    assert why is None or (isinstance(why, str) and "\n" not in why)
