"""The inline PTX that makes the 4-bit tiles' weights (replica.kernels.int4_ptx), run on the CPU by
a small emulator of the five instructions it uses, against the dequantize oracle bit for bit:
every nibble value, every zero point, scales of many magnitudes, bf16 and fp16. No GPU runs PTX
here and Triton's interpreter cannot; the GPU checks compare the tiles themselves
(tests/test_int4_gpu.py, benchmarks.int4_checks)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from replica.kernels.int4_ptx import HALVES, packed_math, slabs_ptx
from replica.ops.packed import PackedInt4, dequantize, pack

HALF_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}
U32 = np.uint32


def _halves(word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (word & 0xFFFF).astype(np.uint16), (word >> 16).astype(np.uint16)


def _floats(bits: np.ndarray, half: str) -> torch.Tensor:
    return torch.from_numpy(bits.astype(np.int16)).view(HALF_DTYPES[half]).float()


def _fma_x2(a: np.ndarray, b: np.ndarray, c: np.ndarray, half: str) -> np.ndarray:
    """fma.rn.<half>x2: each half a * b + c exactly (these operands' products and sums fit
    fp32), rounded once to the nearest half."""
    out = []
    for x, y, z in zip(_halves(a), _halves(b), _halves(c), strict=True):
        exact = _floats(x, half) * _floats(y, half) + _floats(z, half)
        out.append(exact.to(HALF_DTYPES[half]).view(torch.int16).numpy().astype(np.uint16))
    return out[0].astype(U32) | out[1].astype(U32) << 16


def _lop3(a: np.ndarray, b: np.ndarray, c: np.ndarray, lut: int) -> np.ndarray:
    """Bit i of the result is bit (a_i << 2 | b_i << 1 | c_i) of the table."""
    out = np.zeros_like(a)
    for index in range(8):
        if lut >> index & 1:
            pick = [x if index >> shift & 1 else ~x for x, shift in ((a, 2), (b, 1), (c, 0))]
            out |= pick[0] & pick[1] & pick[2]
    return out


def _prmt(a: np.ndarray, b: np.ndarray, selector: int) -> np.ndarray:
    """Byte i of the result is byte (selector >> 4i) & 7 of b:a (a's bytes first)."""
    pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    return sum((pool[(selector >> (4 * i)) & 7] << (8 * i)) for i in range(4)).astype(U32)


def run_ptx(text: str, operands: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """The block's instructions over arrays of 32-bit registers; $n from and into `operands`."""
    regs: dict[str, np.ndarray] = {f"${n}": v for n, v in operands.items()}
    shape = next(iter(operands.values())).shape

    def value(token: str) -> np.ndarray:
        if token in regs:
            return regs[token]
        return np.full(shape, int(token, 0), dtype=U32)

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *src = [t.strip() for t in rest.split(",")]
        args = [value(t) for t in src]
        if op == "mov.b32":
            regs[dst] = args[0]
        elif op == "shr.u32":
            regs[dst] = args[0] >> args[1]
        elif op == "lop3.b32":
            regs[dst] = _lop3(args[0], args[1], args[2], int(src[3], 0))
        elif op == "prmt.b32":
            regs[dst] = _prmt(args[0], args[1], int(src[2], 0))
        elif match := re.fullmatch(r"fma\.rn\.(bf16|f16)x2", op):
            regs[dst] = _fma_x2(*args, match.group(1))
        else:
            raise AssertionError(f"the emulator does not know {op!r}")
    return {n: regs[f"${n}"] for n in range(8)}


def _packed_pair(values: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """Two 16-bit values [..., 2] as one register each (element 0 low)."""
    bits = values.to(dtype).view(torch.int16).numpy().astype(np.uint16).astype(U32)
    return bits[..., 0] | bits[..., 1] << 16


def slabs_by_ptx(weight: PackedInt4, half: str) -> torch.Tensor:
    """The [N, K] weights the PTX makes of one packed weight, as int4_ptx.ptx_slabs feeds it:
    each row's words in pairs (w, w + 1) of one group, its zero as -(C + z) and scale."""
    dtype, (_, _, c) = HALF_DTYPES[half], HALVES[half]
    n, words = weight.qweight.shape
    per_group = weight.group_size // 8
    group_of = torch.arange(words) // per_group  # each word's group
    word_pairs = weight.qweight.numpy().astype(np.uint32).reshape(n, words // 2, 2)
    negzero = (-c - weight.zeros.float())[:, group_of].reshape(n, words // 2, 2)
    scale = weight.scales[:, group_of].reshape(n, words // 2, 2)
    operands = {8: word_pairs[..., 0], 9: word_pairs[..., 1]}
    operands |= {10: _packed_pair(negzero, dtype), 11: _packed_pair(scale, dtype)}
    out = run_ptx(slabs_ptx(half), operands)
    nibble_of_output = (0, 4, 1, 5, 2, 6, 3, 7)
    result = torch.empty(n, words // per_group, 8, per_group, dtype=dtype)
    for output, nibble in enumerate(nibble_of_output):
        low = torch.from_numpy((out[output] & 0xFFFF).astype(np.int32)).to(torch.int16)
        high = torch.from_numpy((out[output] >> 16).astype(np.int32)).to(torch.int16)
        both = torch.stack((low, high), -1).view(dtype).reshape(n, -1, per_group)
        result[:, :, nibble] = both  # nibble j of a group's word w: its column jW + w
    return result.flatten(1)


@pytest.mark.parametrize("half", ["bf16", "f16"])
@pytest.mark.parametrize("group", [128, 32])
def test_the_ptx_weights_are_the_oracles_bit_for_bit(half: str, group: int):
    dtype = HALF_DTYPES[half]
    gen = torch.Generator().manual_seed(0)
    n, k = 64, 4 * group
    q = torch.randint(0, 16, (n, k), generator=gen)
    q[0, :16] = torch.arange(16)  # every nibble value
    zeros = torch.randint(0, 16, (n, k // group), generator=gen).to(dtype)
    zeros[:16, 0] = torch.arange(16).to(dtype)  # every zero point
    exponents = torch.randint(-14, 4, (n, k // group), generator=gen).float()
    scales = (torch.rand(n, k // group, generator=gen) + 1) * 2.0**exponents
    weight = PackedInt4(pack(q, group), scales.to(dtype), zeros, group)
    expected = dequantize(weight, dtype)
    assert torch.equal(slabs_by_ptx(weight, half).view(torch.int16), expected.view(torch.int16))


def test_the_emulator_knows_each_instruction():
    """Its lop3 and prmt against values worked by hand."""
    a, b = np.array([0x12345678], U32), np.array([0x9ABCDEF0], U32)
    assert _lop3(a, np.array([0x000F000F], U32), np.array([0x43004300], U32), 0xEA)[0] == 0x43044308
    assert _prmt(a, b, 0x5410)[0] == 0xDEF05678 and _prmt(a, b, 0x7632)[0] == 0x9ABC1234


def test_packed_math_is_off_without_a_gpu():
    """The interpreter runs no PTX: CPU tensors take the plain path."""
    weight = PackedInt4(
        torch.zeros(4, 16, dtype=torch.int32),
        torch.ones(4, 1, dtype=torch.bfloat16),
        torch.zeros(4, 1, dtype=torch.bfloat16),
        128,
    )
    assert not packed_math(torch.zeros(1, 128, dtype=torch.bfloat16), weight)
