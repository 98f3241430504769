"""benchmarks.int4_peers' ratio: our served paths over the faster peer, gate_up as the MLP runs it."""

from __future__ import annotations

import torch

from benchmarks.int4_peers import peer_ratio
from replica.ops.feed_forward import TorchMLP
from replica.ops.mlp import DenseMLP
from replica.ops.packed import linear


def rows(tokens: int, gemlite: float | str) -> list[dict]:
    plain = {"tokens": tokens, "served": 10.0, "tinygemm": 8.0, "gemlite": gemlite}
    gate_up = {
        **plain,
        "shape": "gate_up",
        "served": 30.0,  # without SiLU: not what the MLP runs
        "served_mlp": 20.0,
        "tinygemm_mlp": 24.0,
        "gemlite_mlp": gemlite,
    }
    return [{**plain, "shape": "qkv"}, gate_up]


def test_gate_up_counts_silu_on_both_sides_and_a_failed_peer_drops_out():
    # ours 10 + 20, tinygemm 8 + 24; GemLite failed (a string): not a peer
    assert peer_ratio(rows(1, "failed: graph capture")) == {"1": round(30 / 32, 3)}
    # GemLite faster: 2 + 2
    assert peer_ratio(rows(8, 2.0)) == {"8": 7.5}
    assert peer_ratio(rows(3, 2.0)) == {}  # no ratio token count


def test_the_mlp_gated_half_is_silu_of_gate_times_up():
    x, gate_up = torch.randn(3, 16), torch.randn(2 * 8, 16)
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    mlp = TorchMLP(linear)
    torch.testing.assert_close(mlp.gated(x, gate_up), torch.nn.functional.silu(gate) * up)
    down = torch.randn(16, 8)
    assert torch.equal(
        mlp(x, DenseMLP(gate_up=gate_up, down=down)), linear(mlp.gated(x, gate_up), down)
    )
