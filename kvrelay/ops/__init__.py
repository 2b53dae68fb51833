"""What an operator runs: the CLI, `check`/`discover`, `tail`, `stats`, the demo, and the
generators of the schemas and the settings table."""
