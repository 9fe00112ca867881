"""fedhash simulations package."""
