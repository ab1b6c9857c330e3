"""One BLAS thread for the answer layer's small scikit-learn models (topic classifier, answerability)."""

from __future__ import annotations


def one_thread():
    """A context manager that limits BLAS/OpenMP pools to one thread while it is open."""
    # A few hundred rows fit in about a second on one core; two BLAS threads on a shared 2-core machine were
    # erratic and slower, so these classifiers always run single-threaded.
    return _controller().limit(limits=1)


_CONTROLLER = None


def _controller():
    """One ThreadpoolController per process: building one scans the loaded libraries (/proc/self/maps), 2.6 ms per
    call measured, which a served answer paid twice."""
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER
