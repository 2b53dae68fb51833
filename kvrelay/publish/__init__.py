"""What both outputs share: reading a frame, malformed drops, NATS refusals, the drain wait."""
