"""The one wall around nats-py: everything that touches its internals lives here."""
