"""
HBONE tunnels: CONNECT parsing and policy, the tunnel client (origination) and the tunnel server
(termination).
"""
