"""Code filters share (Envoy's extensions/filters/common): the RBAC policy engine, token
buckets, clients of external services."""
