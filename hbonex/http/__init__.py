"""
The HTTP layer: header maps, the per-request HTTP filter chain (Envoy's filter manager),
stream facts and filter state.
"""
