"""The wire: what vLLM sends and what kvrelay publishes, as typed msgspec Structs, and the
subjects and names both sides agree on. Depends on nothing else in kvrelay."""
