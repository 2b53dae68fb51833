"""Reading vLLM: the ZMQ transports (native ZMTP or libzmq), sequence tracking, replay on a
gap, and the bounded buffer between ingest and the publishers."""
