"""The torch backend keeps freed memory for reuse: a second large buffer costs no fresh pages (glibc only)."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import torch
    import torch.nn.functional as F
    from mlx_lora.backends.torch.allocator import keep_freed_memory
    if sys.argv[1] == "tuned":
        assert keep_freed_memory() and keep_freed_memory()  # a second call is a no-op that still says True
    targets = torch.zeros(120, dtype=torch.long)

    def step():  # the loss end of a training step: logits of 120 positions x the 0.5B's vocabulary (~70 MiB)
        logits = torch.ones(120, 151936, requires_grad=True)
        F.cross_entropy(logits * 2, targets).backward()

    for _ in range(4):  # the heap grows (and its free blocks settle) until it holds a step's pattern
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_a_freed_buffer_is_reused_instead_of_faulted_in_again():
    default, tuned = _faults("default"), _faults("tuned")
    # glibc's defaults unmap every freed 70 MiB block: each step touches ~6 x 17,800 fresh 4 KiB pages (855 thousand
    # in 8 steps). Kept, a block is faulted in once, when the heap first grows to hold it: 1-5 blocks over the 8
    # steps, depending on how the heap's free blocks happened to fit (measured: 18-89 thousand pages).
    assert default > 400_000, default
    assert tuned < default / 4, (tuned, default)
