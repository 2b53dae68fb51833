"""kvrelay: relay vLLM KV-cache events from ZMQ to NATS JetStream, in order and without gaps."""

__version__ = "0.1.0"
