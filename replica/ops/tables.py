"""Which kernel serves which size, one declared table per operation, and nothing else decides.

A table is a list of entries in order; the first whose bound takes the count serves it. Every
entry cites where its choice was measured: the docs/PERF.md section (by its heading) and the
JSON under docs/perf/ that holds the numbers. The numbers live there, not here: re-measure with
the benchmark named, then change an entry and its citation together.

- `INT4_LINEAR_WIDE` / `INT4_LINEAR_NARROW`: a packed projection by token count, for groups of
  128 or more and for smaller ones (`int4_linear_table`); a `Gemv` entry also serves a dense
  MLP's gate_up with SiLU * up fused (its `gated` tile); a `SplitK` entry may name tiles that
  depend on a Hopper's wgmma (`sm90`), served on sm_90 alone (the A100 is the target).
- `MOE_16BIT`, `MOE_PACKED_DECODE` / `MOE_PACKED_PREFILL` (groups of 128 or more: the fused 4-bit
  experts), `MOE_NARROW_DECODE` / `MOE_NARROW_PREFILL` (smaller groups): the experts by mean
  (token, expert) pairs an expert (`moe_table`); decode steps (CUDA graphs) never take the
  dequantized copy, whose scratch would stay in the graph's pool.
- torch's int4 matmul (replica.ops.tinygemm) has no entry: it would own the layout of a weight
  converted for it, and its prefill is 17x the dequantized copy's (PERF.md, issue 36).
- `MOE_ROUTE`: the MoE's routing by token count: the router's GEMM and a program a token, or
  one launch (replica.kernels.moe_route).
- `ROPE_STORE`: the q/k-norm + RoPE + KV-write kernel's tokens a program by token count.
- `ATTENTION_DECODE`: what decode attention's launch takes on (merging its splits; the q/k norms,
  RoPE and K/V write).

Attention's backend (replica.ops.select picks it) and sampling have no other choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from replica.kernels.int4_gemv import GemvTile
from replica.kernels.int4_splitk import MIN_GROUP, SplitKTile
from replica.kernels.launch import Tile
from replica.kernels.moe_fused import FusedTile

C = TypeVar("C")

ISSUE_24 = "PERF.md '4-bit weights, w4a16 (issue 24)'"
ISSUE_12 = "PERF.md 'Qwen3-30B-A3B (MoE) in our engine (issue 12)'"
ISSUE_4 = "PERF.md 'Replica engine: own Qwen3 forward, slot KV cache, CUDA-graph decode (issue 4)'"
THIRD_PASS = f"{ISSUE_24} > 'Third pass'"
FOURTH_PASS = f"{ISSUE_24} > 'Fourth pass'"
V2 = "PERF.md '4-bit weights, second design (issue 36)'"
V2_SWEEP = f"{V2}; docs/perf/int4-v2-h100.json"
V2_ENGINES = f"{V2} > 'Served'; docs/perf/int4-v2-h100-engines.json"
SERIAL = f"{V2} > 'The serial split-K sum'"
SERIAL_SWEEP = (
    f"{SERIAL}; docs/perf/int4-v2-h100-serial-sweep.json (sweep.dense_us),"
    " docs/perf/int4-v2-h100-served-serial-engines.json"
)


@dataclass(frozen=True)
class Entry(Generic[C]):
    up_to: float  # serves counts up to this one, included (`inclusive`) or not
    choice: C
    measured: str  # the PERF.md section and docs/perf JSON that chose it
    inclusive: bool = True

    def serves(self, count: float) -> bool:
        return count <= self.up_to if self.inclusive else count < self.up_to


@dataclass(frozen=True)
class Table(Generic[C]):
    name: str
    key: str  # what the count counts
    entries: tuple[Entry[C], ...]

    def choose(self, count: float) -> C:
        for entry in self.entries:
            if entry.serves(count):
                return entry.choice
        raise ValueError(f"{self.name}: no entry serves {self.key} {count}")


# The choices.


@dataclass(frozen=True)
class Gemv:
    """`replica.kernels.int4_gemv.w4a16_gemv` with this tile (`gated`: SiLU(gate) * up fused)."""

    tile: GemvTile  # x @ w.T
    gated: GemvTile  # SiLU(gate) * up
    shallow: GemvTile | None = None  # x @ w.T where K holds SHALLOW_GROUPS groups or fewer

    def plain(self, groups: int) -> GemvTile:
        """The tile for x @ w.T whose K holds `groups` quantization groups."""
        return self.shallow if self.shallow and groups <= SHALLOW_GROUPS else self.tile


@dataclass(frozen=True)
class Tiled:
    """`replica.kernels.int4_matmul.w4a16_tiled` (groups under 128)."""

    tile: Tile


@dataclass(frozen=True)
class SplitK:
    """`replica.kernels.int4_splitk.w4a16_splitk` (groups of 128 or more)."""

    tile: SplitKTile
    wide: SplitKTile | None = None  # where the weight has WIDE_ROWS rows or more
    gated: bool = False  # a dense MLP's gate-up with SiLU * up fused (K whole)
    sm90: SplitK | None = None  # a Hopper's tiles (wgmma), where they differ from the A100's

    def for_rows(self, rows: int, arch: int = 80) -> SplitKTile:
        """The tile for a weight of `rows` output features on an sm_<arch> GPU (launch.arch)."""
        chosen = self.sm90 if arch == 90 and self.sm90 else self
        return chosen.wide if chosen.wide and rows >= WIDE_ROWS else chosen.tile


@dataclass(frozen=True)
class Dequantized:
    """A 16-bit copy of the weight (`replica.kernels.int4_dequantize.dequantized`), then the
    16-bit GEMM."""


@dataclass(frozen=True)
class ExpertGemv:
    """`replica.kernels.moe.experts_gemv`: a program a pair, or an expert's bucket."""

    up: GemvTile  # gated
    down: GemvTile
    bucketed: bool
    one_launch: bool = False  # a program a pair, gate-up and down in one launch (moe_pairs)


@dataclass(frozen=True)
class ExpertTiles:
    """`replica.kernels.moe.experts_tiled`, or `experts_dequantized` (packed experts as a
    16-bit copy, at most DEQUANTIZED_BYTES at a time)."""

    up: Tile
    down: Tile
    dequantized: bool = False


@dataclass(frozen=True)
class FusedExperts:
    """`replica.kernels.moe_fused.experts_fused` (groups of 128 or more)."""

    tile: FusedTile


@dataclass(frozen=True)
class RopeBlock:
    tokens: int  # tokens a program
    warps: int


DEQUANTIZED_BYTES = 1 << 30  # the most 16-bit expert weights dequantized at once

# 4-bit linear.

GEMV_1 = Gemv(GemvTile(8, 8, 4), gated=GemvTile(16, 4, 4))
GEMV_2 = Gemv(GemvTile(32, 1, 4, 2), gated=GemvTile(32, 2, 4, 2))
GEMV_4 = Gemv(GemvTile(32, 1, 4, 4), gated=GemvTile(32, 1, 4, 4))
GEMV_1_SWEEP = f"{THIRD_PASS}; docs/perf/int4-h200/kernel-sweep-rows-in-registers.json"
# One token, groups of 128 or more: four sets of rows sharing x; 16 groups a step where K is
# deep (the 4B's o and down: 32 and 76 groups), 4 with twice the rows where it is shallow (its
# qkv: 20 groups, which 16 a step would cover in 2 steps, 12 of their 32 groups masked)
SHALLOW_GROUPS = 20
GEMV_1_WIDE = Gemv(GemvTile(8, 16, 4), gated=GemvTile(16, 4, 4), shallow=GemvTile(16, 4, 4))
ONE_TOKEN_SWEEP = (
    f"{V2} > 'One token: four sets of rows'; docs/perf/int4-v2-h100-gemv-rows4.json,"
    " docs/perf/int4-v2-h100-gemv-step.json"
)
GEMV_SWEEP = f"{FOURTH_PASS}; docs/perf/int4-h200/kernel-sweep-multi-token-gemv.json"
DEQUANTIZED_SWEEP = (
    f"{THIRD_PASS}, prefill; docs/perf/int4-h200/dense-moe-gemv-4-pairs-an-expert.json"
)
TILE_16 = Tile(16, 32, 128, 4, 4)
# At 64 tokens a weight this wide (the 4B's gate_up: 19,456 rows) fills the card with 64-row
# blocks and K whole; 128-row blocks and K split in two measured 17-21% faster there, and slower
# on the narrower projections (o: 2,560 rows, where K is then split 11 ways)
WIDE_ROWS = 16384
WIDE_SWEEP = (
    f"{V2} > '128-row split-K blocks for wide weights'; docs/perf/int4-v2-h100-splitk-joined.json,"
    " docs/perf/int4-v2-h100-one-token.json (sweep.dense_us)"
)

# From 2 to 64 tokens the split-K tiles make their weights in packed 16-bit PTX: up to 24%
# faster a projection (o at 32 tokens: even), the 4B's 8-row step 0.742 of bf16's against 0.822
# (the outputs bit for bit the same)
PTX = f"{V2} > 'Nibbles to weights in packed 16-bit PTX'"
PTX_SWEEP = (
    f"{PTX}; docs/perf/int4-v2-h100-ptx-sweep.json (sweep.dense_us),"
    " docs/perf/int4-v2-h100-ptx-engines.json"
)

Int4Linear = Gemv | Tiled | SplitK | Dequantized

INT4_LINEAR_WIDE: Table[Int4Linear] = Table(
    "4-bit linear, groups of 128 or more",
    "tokens",
    (
        Entry(1, GEMV_1_WIDE, ONE_TOKEN_SWEEP),
        Entry(16, SplitK(SplitKTile(16, 128, 4, 3, ptx=True)), f"{SERIAL_SWEEP}, {PTX_SWEEP}"),
        Entry(32, SplitK(SplitKTile(32, 128, 4, 3, ptx=True)), f"{SERIAL_SWEEP}, {PTX_SWEEP}"),
        Entry(
            64,
            SplitK(SplitKTile(64, 64, 4, 3, ptx=True), wide=SplitKTile(64, 128, 4, 3, ptx=True)),
            f"{WIDE_SWEEP}, {PTX_SWEEP}",
        ),
        Entry(math.inf, Dequantized(), DEQUANTIZED_SWEEP),
    ),
)
INT4_LINEAR_NARROW: Table[Int4Linear] = Table(
    "4-bit linear, groups of 16 to 64",
    "tokens",
    (
        Entry(1, GEMV_1, GEMV_1_SWEEP),
        Entry(2, GEMV_2, GEMV_SWEEP),
        Entry(4, GEMV_4, GEMV_SWEEP),
        Entry(
            15,
            Tiled(TILE_16),
            f"{ISSUE_24} > 'Second pass'; docs/perf/int4-h200/gemv-tiles-in-graph.json",
        ),
        Entry(math.inf, Dequantized(), DEQUANTIZED_SWEEP),
    ),
)


def int4_linear_table(group_size: int) -> Table[Int4Linear]:
    """The split-K tile needs groups of 128 or more (MIN_GROUP: 16 words, a dot's K)."""
    return INT4_LINEAR_WIDE if group_size >= MIN_GROUP else INT4_LINEAR_NARROW


# Fused experts, by mean pairs an expert.

DECODE_TILES = ExpertTiles(Tile(16, 32, 128, 4, 4), Tile(16, 64, 128, 4, 4))
WIDER_DECODE_TILES = ExpertTiles(Tile(32, 32, 128, 4, 4), Tile(32, 64, 128, 4, 4))
PREFILL_TILES = ExpertTiles(Tile(128, 128, 64, 8, 3), Tile(256, 128, 64, 8, 3))
MOE_TUNED = f"{ISSUE_12} (`python -m benchmarks.tune_moe`); docs/perf/moe-h100.json"
EXPERT_GEMV = f"{FOURTH_PASS}; docs/perf/int4-h200/layers-bf16-int4-default-paths.json"


def _tiles(dequantized: bool) -> tuple[Entry[ExpertGemv | ExpertTiles], ...]:
    def tiles(t: ExpertTiles) -> ExpertTiles:
        return ExpertTiles(t.up, t.down, dequantized)

    return (
        Entry(8, tiles(DECODE_TILES), MOE_TUNED),
        Entry(24, tiles(WIDER_DECODE_TILES), MOE_TUNED),
        Entry(math.inf, tiles(PREFILL_TILES), MOE_TUNED),
    )


MOE_16BIT: Table[ExpertGemv | ExpertTiles] = Table(
    "16-bit experts", "pairs an expert", _tiles(dequantized=False)
)
_EXPERT_GEMV = (
    Entry(1, ExpertGemv(GEMV_1.gated, GEMV_1.tile, bucketed=False), EXPERT_GEMV),
    Entry(2, ExpertGemv(GEMV_2.gated, GEMV_2.tile, bucketed=True), EXPERT_GEMV),
    Entry(4, ExpertGemv(GEMV_4.gated, GEMV_4.tile, bucketed=True), EXPERT_GEMV),
)
MOE_NARROW_DECODE: Table[ExpertGemv | ExpertTiles] = Table(
    "4-bit experts, groups under 128, decode",
    "pairs an expert",
    _EXPERT_GEMV + _tiles(dequantized=False),
)
MOE_NARROW_PREFILL: Table[ExpertGemv | ExpertTiles] = Table(
    "4-bit experts, groups under 128, prefill",
    "pairs an expert",
    (
        *_EXPERT_GEMV,
        Entry(8, ExpertTiles(DECODE_TILES.up, DECODE_TILES.down), EXPERT_GEMV, inclusive=False),
        *_tiles(dequantized=True),
    ),
)


MoeChoice = ExpertGemv | ExpertTiles | FusedExperts
FUSED_16 = FusedTile(16, 64, 128, 4, 3)
FUSED_SWEEP = f"{V2_SWEEP} (sweep.moe_us); {V2_ENGINES}"
# A program a pair takes 16-row down tiles; beyond half a pair an expert, 2 warps (mma.sync,
# without the waits Triton puts after each wgmma) beat 4
EXPERT_TILES = (
    f"{V2} > 'Expert tiles: 16-row down, 2 warps'; docs/perf/int4-v2-h100-expert-tiles.json"
)
EXPERT_PAIRS = ExpertGemv(GemvTile(16, 4, 4), GemvTile(16, 8, 4), bucketed=False)
FUSED_16_W2 = FusedTile(16, 64, 128, 2, 3)
FUSED_32_W2 = FusedTile(32, 64, 128, 2, 3)
# With weights made in packed 16-bit PTX the 4-warp 16-row tile is the fastest from a quarter
# pair an expert to 4 (a 64-row step of the 30B: 178 against 201 us a layer, plain 2 warps)
FUSED_16_PTX = replace(FUSED_16, ptx=True)
PTX_EXPERTS = (
    f"{PTX}; docs/perf/int4-v2-h100-ptx-sweep.json (sweep.moe_us),"
    " docs/perf/int4-v2-h100-route-moe.json"
)
MOE_PACKED_DECODE: Table[MoeChoice] = Table(
    "4-bit experts, groups of 128 or more, decode",
    "pairs an expert",
    (
        # below a quarter pair an expert (1 and 2 tokens of the 30B) a program a pair wins
        Entry(0.25, EXPERT_PAIRS, EXPERT_TILES, inclusive=False),
        Entry(4, FusedExperts(FUSED_16_PTX), PTX_EXPERTS),
        Entry(8, FusedExperts(FUSED_16_W2), EXPERT_TILES),
        Entry(math.inf, FusedExperts(FUSED_32_W2), EXPERT_TILES),
    ),
)
MOE_PACKED_PREFILL: Table[MoeChoice] = Table(
    "4-bit experts, groups of 128 or more, prefill",
    "pairs an expert",
    (
        *MOE_PACKED_DECODE.entries[:3],
        # at 64 pairs 0.45 of the dequantized copy + the 16-bit GEMM (the copy alone takes 1.2x
        # the fused kernel), 0.96 at 256, 1.5x it at 1,024
        Entry(256, FusedExperts(FUSED_32_W2), EXPERT_TILES),
        Entry(math.inf, ExpertTiles(PREFILL_TILES.up, PREFILL_TILES.down, True), FUSED_SWEEP),
    ),
)


def moe_table(group_size: int | None, decode: bool) -> Table[MoeChoice]:
    """`group_size`: the packed experts' (None: 16-bit); the fused kernel needs 128 or more."""
    if group_size is None:
        return MOE_16BIT
    if group_size >= MIN_GROUP:
        return MOE_PACKED_DECODE if decode else MOE_PACKED_PREFILL
    return MOE_NARROW_DECODE if decode else MOE_NARROW_PREFILL


@dataclass(frozen=True)
class Route:
    """The MoE's routing: `fused` in one launch (the router's GEMM, softmax, top-k and buckets;
    16-bit activations, at most moe_route.FUSED_MAX_TOKENS tokens), else three; `normed` (a
    decode step's, fused): the layer's add + RMSNorm before the MoE in that launch too."""

    fused: bool
    normed: bool = False


# The routing alone at 1 to 8 tokens: 6.0-8.5 us in one launch against 10.2-10.4 in three;
# even at 16 (10.5), slower beyond (the last program's top-k grows with the tokens: 57 at 64)
ROUTE_SWEEP = (
    f"{V2} > 'Routing the MoE in one launch'; docs/perf/int4-v2-h100-route-moe.json,"
    " docs/perf/int4-v2-h100-route-prefetch-engines.json"
)
MOE_ROUTE: Table[Route] = Table(
    "MoE routing",
    "tokens",
    (Entry(8, Route(fused=True), ROUTE_SWEEP), Entry(math.inf, Route(fused=False), MOE_TUNED)),
)


def route_table() -> Table[Route]:
    """Read when called, so a benchmark's patched table serves."""
    return MOE_ROUTE


# Decode attention.


@dataclass(frozen=True)
class DecodeLaunch:
    """What decode attention's split kernel also does (replica.kernels.decode_attention):
    `merged`, its splits merged by the one that finishes last (a ticket per row and KV head),
    else by a second kernel; `roped`, the q/k norms, RoPE and K/V write from the projection,
    else the layer's rope_store kernel before it."""

    merged: bool
    roped: bool


ATTENTION_DECODE: Table[DecodeLaunch] = Table(
    "decode attention's launches",
    "rows",
    (
        Entry(
            math.inf,
            DecodeLaunch(merged=False, roped=False),
            f"{ISSUE_4}; docs/perf/engine-h200.json",
        ),
    ),
)


def decode_table() -> Table[DecodeLaunch]:
    """Read when called, so a benchmark's patched table serves."""
    return ATTENTION_DECODE


# The layer's elementwise kernels.

ROPE_STORE: Table[RopeBlock] = Table(
    "q/k norms + RoPE + KV write",
    "tokens",
    (
        Entry(256, RopeBlock(1, 1), f"{ISSUE_4}; docs/perf/engine-h200.json"),
        Entry(math.inf, RopeBlock(16, 4), f"{ISSUE_4}; docs/perf/engine-h200.json"),
    ),
)
