"""HTTP filters (inside an http_connection_manager), one module each."""
