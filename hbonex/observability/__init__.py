"""
Operations: stats, Istio's metrics, the admin endpoint, access logs and their formatter, the
process log.
"""
