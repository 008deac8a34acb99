"""What automlprune knows about layers: the table of layer types, forward hooks, channel
gates and masks, and channel reordering."""
