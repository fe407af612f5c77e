"""Policy code shared by filters (Envoy's extensions/filters/common)."""
