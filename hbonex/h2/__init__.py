"""
HTTP/2: the connection both tunnel ends share, its streams as transports, settings and flood
defences.
"""
