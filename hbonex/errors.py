"""
Errors with enough context to act on.
"""

from __future__ import annotations


class ConfigError(Exception):
    """
    Bad configuration: names the YAML path (or CLI option), what is wrong and what fits there.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class UpstreamError(Exception):
    """
    A tunnel or upstream connection could not be made; ``status`` is the HTTP status a tunnel
    server answers with (403 policy, 503 unreachable, ...).  ``unprocessed``: the peer never
    processed the request (beyond its GOAWAY's last stream id, or REFUSED_STREAM), so it is
    safe to retry on another connection (RFC 9113 §8.7).  ``flag``: Envoy's response flag for
    it when not the usual ``UF`` (``UH`` no endpoints, ``UO`` overflow, ``DENY`` policy).
    """

    def __init__(
        self, status: int, reason: str, retryable: bool = False, unprocessed: bool = False,
        flag: str = "",
    ) -> None:
        self.status = status
        self.reason = reason
        self.retryable = retryable
        self.unprocessed = unprocessed
        self.flag = flag
        super().__init__(f"{status} {reason}")


def status_and_reason(error: BaseException | None) -> tuple[int, str]:
    """
    What a tunnel failure answers with: an UpstreamError's own status, otherwise 503.
    """
    if isinstance(error, UpstreamError):
        return error.status, error.reason
    return 503, str(error)
