"""Code HTTP and network filters share (policy, clients of external services)."""
