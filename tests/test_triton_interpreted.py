"""The Triton kernels on a machine without a GPU: each check of `tests/interpreted_kernels.py`
in a child process under TRITON_INTERPRET=1 (skipped where triton is not installed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "check",
    [
        "prefill",
        "decode",
        "elementwise",
        "moe",
        "moe_int4",
        "int4_linear",
        "sampling",
        "int4_splitk",
        "one_token_gemv",
        "moe_fused",
        "spread_routing",
    ],
)
def test_kernel_matches_its_reference_in_the_interpreter(check: str):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    script = ROOT / "tests" / "interpreted_kernels.py"
    result = subprocess.run(
        [sys.executable, str(script), check], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
