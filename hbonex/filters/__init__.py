"""
Built-in filters: network filters (``network/``), listener filters (``listener/``) and
HTTP filters (``http/``).
"""
