"""fedhash.hashing: the hash function and everything about codes. Never imports flwr."""
