"""
Upstream: clusters and their types, the HBONE tunnel pool, and the upstream HTTP/1.1 and HTTP/2
pools.
"""
