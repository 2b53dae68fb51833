"""kvrelay's throughput benchmark: real relay processes, synthetic vLLM publishers, a checking
consumer, and the raw limits of the parts, measured in the same run (`python -m bench`)."""
