"""The Triton kernels on a machine without a GPU: each check of `tests/interpreted_kernels.py`
in a child process under TRITON_INTERPRET=1 (skipped where triton is not installed), started
in the background when collection ends (tests/interpreted_runs.py)."""

from __future__ import annotations

import signal

import pytest

from tests.interpreted_runs import Background

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


def test_a_check_that_spins_ends_at_its_cpu_limit_and_says_so(tmp_path):
    """The checks' limit is CPU time (a starved check at the lowest priority is not cut off)."""
    script = tmp_path / "checks.py"
    script.write_text("import sys\nwhile sys.argv[1] == 'spin':\n    pass\n")
    runs = Background(script, cpu_limit_s=1, wall_limit_s=60)
    returncode, stderr = runs.result("spin")
    assert returncode == -signal.SIGXCPU, (returncode, stderr)
    assert "spin used up its 1 s of CPU time" in stderr
    assert runs.result("done") == (0, "")
