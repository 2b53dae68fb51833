"""Real parts for the demo, tests and benchmark: a nats-server process and a synthetic vLLM
publisher speaking vLLM's exact wire format."""
