"""The lab's attacks, one module each, each with one entry point that reads only what the server has
(:class:`simulations.leakage.victim.Observation`, the global model it sent, and for a crafted model the
server's own auxiliary data)."""
