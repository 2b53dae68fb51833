"""The router side: the KV index of every worker's blocks, the JetStream consumer that keeps
it, and snapshot restore. Depends on the wire only, never on the relay."""
