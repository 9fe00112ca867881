"""fedhash client package."""
