"""The ops layer: every kernel a forward runs, and the one place that chooses which
(replica.ops.select per device, replica.ops.tables per size)."""

from replica.ops.select import ATTENTION_BACKENDS, Ops, select_attention, select_ops

__all__ = ["ATTENTION_BACKENDS", "Ops", "select_attention", "select_ops"]
