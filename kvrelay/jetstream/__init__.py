"""The JetStream output: stream set-up, the windowed publisher, its acks, and snapshots."""
