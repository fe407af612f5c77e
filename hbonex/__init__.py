"""hbonex: HBONE tunnels (TCP in HTTP CONNECT over mutual TLS) for Twisted, assembled like Envoy."""

__version__ = "0.1.0"
