"""The relay's own surface: Prometheus metrics and the system port (/live, /health, /metrics)."""
