"""inference-broker."""
