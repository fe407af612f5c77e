"""
Mutual TLS and identities: contexts, transport sockets, SPIFFE IDs, the dev PKI, certificate
reloading.
"""
