"""The Triton kernels on a machine without a GPU: each check of `tests/interpreted_kernels.py`
in a child process under TRITON_INTERPRET=1 (skipped where triton is not installed), started
in the background when collection ends (tests/interpreted_runs.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")


@pytest.mark.parametrize(
    "check",
    [
        "moe_int4",  # the longest first: it starts the background's work
        "prefill",
        "decode",
        "decode_roped",
        "elementwise",
        "moe",
        "int4_linear",
        "sampling",
        "int4_splitk",
        "one_token_gemv",
        "moe_fused",
        "spread_routing",
        "fused_routing",
    ],
)
def test_kernel_matches_its_reference_in_the_interpreter(check: str, interpreted_runs):
    returncode, stderr = interpreted_runs.result(check)
    assert returncode == 0, stderr[-3000:]
