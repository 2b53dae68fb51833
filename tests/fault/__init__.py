"""Faults injected into a running relay, each accounted for from what JetStream stored."""
