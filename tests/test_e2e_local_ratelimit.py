"""
``envoy.filters.http.local_ratelimit`` in a real hbone-server: 429 (flag RL, x-ratelimit
headers) once the bucket is empty, served again after the fill interval; a route's own
LocalRateLimit with a descriptor from the route's rate_limits; Envoy's stats on the admin
endpoint.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor, task
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from tests.support import e2e, wait_until
from tests.test_e2e_hcm import HcmCase

LRL_TYPE = ("type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3."
            "LocalRateLimit")
FILTERS = f"""\
http_filters:
- name: envoy.filters.http.local_ratelimit
  typed_config:
    "@type": {LRL_TYPE}
    stat_prefix: e2e_rl
    token_bucket: {{max_tokens: 3, tokens_per_fill: 3, fill_interval: 0.5s}}
    filter_enabled: {{default_value: {{numerator: 100}}}}
    filter_enforced: {{default_value: {{numerator: 100}}}}
    enable_x_ratelimit_headers: DRAFT_VERSION_03
    response_headers_to_add:
    - header: {{key: x-local-rate-limit, value: "true"}}
- name: envoy.filters.http.router
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""
ROUTES = f"""\
- match: {{prefix: /users}}
  route:
    cluster: backend
    prefix_rewrite: /api
    rate_limits:
    - actions: [{{request_headers: {{header_name: x-user, descriptor_key: user}}}}]
  typed_per_filter_config:
    envoy.filters.http.local_ratelimit:
      "@type": {LRL_TYPE}
      stat_prefix: e2e_users
      token_bucket: {{max_tokens: 1000, fill_interval: 60s}}
      filter_enabled: {{default_value: {{numerator: 100}}}}
      filter_enforced: {{default_value: {{numerator: 100}}}}
      descriptors:
      - entries: [{{key: user, value: alice}}]
        token_bucket: {{max_tokens: 1, fill_interval: 60s}}
"""
ACCESS_LOG = """\
access_log:
- name: envoy.access_loggers.file
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
    path: WORKDIR/access.log
    log_format:
      text_format: "%RESPONSE_CODE% %RESPONSE_FLAGS%\\n"
"""
ADMIN_LINE = r"admin listening on 127\.0\.0\.1:(?P<port>\d+)"


class LocalRateLimitTests(HcmCase):
    async def get(self, url: str, *headers: tuple[str, str]) -> tuple[int, Any, bytes]:
        response = await Agent(reactor).request(
            b"GET", url.encode(), Headers({k: [v] for k, v in headers}))
        return response.code, response.headers, await readBody(response)

    @e2e
    async def test_limited_then_recovers(self) -> None:
        proxy = await self.setup_hcm(http_filters=FILTERS, extra_routes=ROUTES,
                                     hcm_extra=ACCESS_LOG,
                                     extra_args=["--admin", "127.0.0.1:0"])
        [admin] = await proxy.wait_for_count(ADMIN_LINE, 1)
        url = f"http://127.0.0.1:{proxy.port}/api/n?size=10"
        # Requests until the bucket is empty: at least its 3 tokens are served first (a
        # fill may land in between: more then).
        served = 0
        for _ in range(50):
            code, headers, body = await self.get(url)
            if code == 429:
                break
            self.assertEqual(code, 200)
            served += 1
        self.assertEqual(code, 429, "the bucket never ran out")
        self.assertGreaterEqual(served, 3)
        self.assertEqual(body, b"local_rate_limited")
        self.assertEqual(headers.getRawHeaders(b"x-local-rate-limit"), [b"true"])
        self.assertEqual(headers.getRawHeaders(b"x-ratelimit-limit"), [b"3"])
        self.assertEqual(headers.getRawHeaders(b"x-ratelimit-remaining"), [b"0"])
        self.assertEqual(len(self.backend.seen), served)  # the 429 never went upstream
        # After the fill interval (0.5 s) the same request is served again.
        deadline = reactor.seconds() + 10  # type: ignore[attr-defined]
        while (await self.get(url))[0] != 200:
            self.assertLess(reactor.seconds(), deadline,  # type: ignore[attr-defined]
                            "still limited 10 s later")
            await task.deferLater(reactor, 0.05, lambda: None)
        # The route's own LocalRateLimit: alice's descriptor has one token a minute.
        users = f"http://127.0.0.1:{proxy.port}/users/n?size=10"
        codes = [(await self.get(users, ("x-user", "alice")))[0] for _ in range(3)]
        self.assertEqual(codes, [200, 429, 429])
        codes = [(await self.get(users, ("x-user", "bob")))[0] for _ in range(3)]
        self.assertEqual(codes, [200, 200, 200])
        # Envoy's stats and the RL flag.
        _, _, text = await self.get(
            f"http://127.0.0.1:{admin['port']}/stats?filter=http_local_rate_limit")
        stats = {k: int(v) for k, v in
                 (line.split(": ") for line in text.decode().splitlines())}
        limited = stats["e2e_rl.http_local_rate_limit.rate_limited"]
        self.assertGreaterEqual(limited, 1)
        self.assertEqual(stats["e2e_rl.http_local_rate_limit.enforced"], limited)
        self.assertEqual(stats["e2e_rl.http_local_rate_limit.enabled"],
                         stats["e2e_rl.http_local_rate_limit.ok"] + limited)
        self.assertEqual(stats["e2e_users.http_local_rate_limit.rate_limited"], 2)
        self.assertEqual(stats["e2e_users.http_local_rate_limit.ok"], 4)
        log_file = self.workdir / "access.log"

        def lines() -> list[str]:
            return log_file.read_text().splitlines() if log_file.exists() else []

        await wait_until(lambda: lines().count("429 RL") >= limited + 2,
                         lambda: f"{limited + 2} '429 RL' lines in {lines()}")
        self.assertEqual(len([line for line in lines() if line.startswith("429")]),
                         limited + 2)
