"""Connections: listeners and filter chains, internal listeners, relays, the overload manager."""
