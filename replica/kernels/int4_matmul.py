"""The w4a16 tile kernel on CUDA: tokens [M, K] times a packed 4-bit weight [N, K] with matrix
units, each weight tile dequantized in registers exactly as the PyTorch oracle does, accumulated
in fp32, split over K when the output has too few blocks to keep every SM reading (fp32 partial
sums added in a fixed order: deterministic).

It serves groups smaller than 128 (replica.kernels.int4_splitk takes 128 or more): a tile of
BLOCK_K columns at a time through `int4_tile`. Which serves which token count is
replica.ops.tables' to say.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from replica.kernels.int4_dequantize import Int4Weight, block_depth, int4_tile
from replica.kernels.launch import Tile, split_k

SPLIT_K_TOKENS = 64  # more tokens than this fill the GPU without splitting K


@triton.jit
def _w4a16_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,  # [SPLIT_K, M, N] fp32 partial sums, or [M, N] in x's dtype when SPLIT_K is 1
    m,
    n,
    depth,
    stride_x,
    GROUP: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tokens = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    features = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    token_live, feature_live = tokens < m, features < n
    dtype = x_ptr.dtype.element_ty
    span = depth // SPLIT_K
    x_tokens = x_ptr + tokens[:, None] * stride_x
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(split * span, (split + 1) * span, BLOCK_K):
        x = tl.load(x_tokens + k + tl.arange(0, BLOCK_K)[None, :], token_live[:, None], other=0.0)
        w = int4_tile(
            qweight_ptr, scales_ptr, zeros_ptr, features, feature_live, k, depth,
            GROUP, BLOCK_K, BLOCK_N, dtype,
        )  # fmt: skip
        acc += tl.dot(x, tl.trans(w))
    dst = out_ptr + (split * m + tokens[:, None]) * n + features[None, :]
    live = token_live[:, None] & feature_live[None, :]
    if SPLIT_K == 1:
        tl.store(dst, acc.to(dtype), mask=live)
    else:
        tl.store(dst, acc, mask=live)


def w4a16_tiled(x: Tensor, weight: Int4Weight, tile: Tile) -> Tensor:
    """x [M, K] @ dequantize(weight).T -> [M, N] in x's dtype, through the tile kernel, BLOCK_K
    columns a step."""
    m, depth = x.shape
    n = weight.shape[-2]
    if x.stride(-1) != 1:
        x = x.contiguous()
    group = weight.group_size
    block_k = block_depth(tile.depth, depth, group)
    grid_n, grid_m = triton.cdiv(n, tile.features), triton.cdiv(m, tile.tokens)
    split = 1 if m > SPLIT_K_TOKENS else split_k(grid_n * grid_m, depth // block_k, x.device)
    dtype = x.dtype if split == 1 else torch.float32
    out = torch.empty(split, m, n, dtype=dtype, device=x.device)
    _w4a16_kernel[(grid_n, grid_m, split)](
        x,
        weight.qweight,
        weight.scales,
        weight.zeros,
        out,
        m,
        n,
        depth,
        x.stride(0),
        GROUP=group,
        SPLIT_K=split,
        BLOCK_M=tile.tokens,
        BLOCK_N=tile.features,
        BLOCK_K=block_k,
        num_warps=tile.warps,
        num_stages=tile.stages,
    )
    return out[0] if split == 1 else out.sum(0).to(x.dtype)
