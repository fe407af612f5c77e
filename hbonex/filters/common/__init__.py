"""Code filters share (Envoy's extensions/filters/common): policy, token buckets, clients
of external services."""
