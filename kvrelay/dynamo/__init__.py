"""The `--format dynamo` output: NVIDIA Dynamo's wire, the translation, the core-NATS
publisher, its confirmation markers and Dynamo's discovery records."""
