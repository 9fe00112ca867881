"""fedhash server package."""
