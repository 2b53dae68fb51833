"""Connecting and publishing to NATS: the options (options.py), a publisher's connection
(link.py) and the one module that touches nats-py's internals (outbox.py)."""
