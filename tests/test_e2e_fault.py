"""
``envoy.filters.http.fault`` in a real hbone-server: an abort rate and a delay within
statistical bounds (the process's generator seeded through HBONEX_TEST_RANDOM_SEED), header
controlled faults on a route of their own, and the fault stats on the admin endpoint.
"""

from __future__ import annotations

import time

from twisted.internet import defer, reactor
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from hbonex.filters.common.percent import SEED_ENVIRONMENT
from tests.support import e2e, wait_until
from tests.test_e2e_hcm import HcmCase

FAULT_FILTER = """\
http_filters:
- name: envoy.filters.http.fault
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
    delay: {fixed_delay: 0.3s, percentage: {numerator: 50}}
    abort: {http_status: 503, percentage: {numerator: 30}}
    headers: [{name: x-no-fault, present_match: true, invert_match: true}]
- name: envoy.filters.http.router
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""

HEADER_ROUTE = """\
- match: {prefix: /hdr}
  route: {cluster: backend, prefix_rewrite: /api}
  typed_per_filter_config:
    envoy.filters.http.fault:
      "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
      abort: {header_abort: {}, percentage: {numerator: 100}}
      delay: {header_delay: {}, percentage: {numerator: 100}}
"""

ACCESS_LOG = """\
access_log:
- name: envoy.access_loggers.file
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
    path: WORKDIR/access.log
    log_format:
      text_format: "%REQ(X-TEST-ID)% %RESPONSE_FLAGS% %RESPONSE_CODE%\\n"
"""

ADMIN_LINE = r"admin listening on 127\.0\.0\.1:(?P<port>\d+)"


class FaultTests(HcmCase):
    async def get(self, url: str, *headers: tuple[str, str]) -> tuple[int, bytes, float]:
        agent = Agent(reactor)
        started = time.monotonic()
        response = await agent.request(
            b"GET", url.encode(), Headers({k: [v] for k, v in headers}))
        body = await readBody(response)
        return response.code, body, time.monotonic() - started

    @e2e
    async def test_abort_rate_delays_and_header_faults(self) -> None:
        proxy = await self.setup_hcm(http_filters=FAULT_FILTER, extra_routes=HEADER_ROUTE,
                                     hcm_extra=ACCESS_LOG,
                                     extra_args=["--admin", "127.0.0.1:0"],
                                     env={SEED_ENVIRONMENT: "1234"})
        [admin] = await proxy.wait_for_count(ADMIN_LINE, 1)
        base = f"http://127.0.0.1:{proxy.port}"
        n = 120
        results = await defer.gatherResults([
            defer.ensureDeferred(self.get(f"{base}/api/n?size=10", ("x-test-id", str(i))))
            for i in range(n)])
        aborted = sum(code == 503 for code, _, _ in results)
        served = sum(code == 200 for code, _, _ in results)
        self.assertEqual(aborted + served, n)
        # 30 % of 120: 36, sd ~5.0; within 4 sd.
        self.assertTrue(16 <= aborted <= 56, aborted)
        self.assertTrue(all(body == b"fault filter abort" for code, body, _ in results
                            if code == 503))
        # Half are delayed 0.3 s (sd ~5.5 of 60); each of those took at least that long.
        log_file = self.workdir / "access.log"
        await wait_until(lambda: log_file.exists() and len(log_file.read_text().splitlines())
                         >= n, f"{n} access log lines")
        flags = {}
        for line in log_file.read_text().splitlines():
            test_id, flag_text, code = line.split()
            flags[int(test_id)] = set(flag_text.split(","))
            self.assertEqual("FI" in flags[int(test_id)], code == "503", line)
        delayed = [i for i, f in flags.items() if "DI" in f]
        self.assertTrue(38 <= len(delayed) <= 82, len(delayed))
        self.assertTrue(all(results[i][2] >= 0.3 for i in delayed))
        self.assertEqual(len(self.backend.seen), served)
        # Not matching the filter's headers: never faulted.
        for _ in range(10):
            code, _, _ = await self.get(f"{base}/api/n?size=10", ("x-no-fault", "1"))
            self.assertEqual(code, 200)
        # The route's own HTTPFault: header-controlled, deterministic.
        code, body, _ = await self.get(f"{base}/hdr/n?size=10",
                                       ("x-envoy-fault-abort-request", "418"))
        self.assertEqual((code, body), (418, b"fault filter abort"))
        code, _, elapsed = await self.get(f"{base}/hdr/n?size=10",
                                          ("x-envoy-fault-delay-request", "400"))
        self.assertEqual(code, 200)
        self.assertGreaterEqual(elapsed, 0.4)
        code, _, _ = await self.get(f"{base}/hdr/n?size=10")
        self.assertEqual(code, 200)
        # Envoy's stats, on the admin endpoint.
        _, text, _ = await self.get(f"http://127.0.0.1:{admin['port']}/stats?filter=fault")
        stats = dict(line.split(": ") for line in text.decode().splitlines())
        self.assertEqual(int(stats["http.ingress.fault.aborts_injected"]), aborted + 1)
        self.assertEqual(int(stats["http.ingress.fault.delays_injected"]), len(delayed) + 1)
        self.assertEqual(int(stats["http.ingress.fault.active_faults"]), 0)
        self.assertEqual(int(stats["http.ingress.fault.faults_overflow"]), 0)
