"""One BLAS thread for the answer layer's small scikit-learn models (topic classifier, answerability)."""

from __future__ import annotations


def one_thread():
    """A context manager that limits BLAS/OpenMP pools to one thread while it is open."""
    # A few hundred rows fit in about a second on one core; two BLAS threads on a shared 2-core machine were
    # erratic and slower, so these classifiers always run single-threaded.
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)
