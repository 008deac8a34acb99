"""automlprune: search per-layer channel widths and bit widths of trained PyTorch CNNs under a
budget (MACs, parameters, bytes or latency) and hand back the physically smaller network."""

__version__ = "0.1.0"
