"""
header_mutation and cors end to end: a real ``twistd hbone-server --config`` whose connection
manager runs both filters (Istio's waypoint has cors in every chain), a twisted.web backend
that reports the request headers it got, and curl as the client.
"""

from __future__ import annotations

import json
from typing import Any

from tests.support import e2e
from tests.test_e2e_hcm import HcmCase

_HM = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3"
_CORS = "type.googleapis.com/envoy.extensions.filters.http.cors.v3"

FILTERS = f"""\
http_filters:
- name: hm
  typed_config:
    "@type": {_HM}.HeaderMutation
    mutations:
      request_mutations:
      - append: {{header: {{key: x-added, value: one}}}}
      - append:
          header: {{key: x-over, value: new}}
          append_action: OVERWRITE_IF_EXISTS_OR_ADD
      - remove: x-remove-me
      - append: {{header: {{key: x-copy, value: "%REQ(x-in)%"}}}}
      - append:
          header: {{key: x-level, value: filter}}
          append_action: OVERWRITE_IF_EXISTS_OR_ADD
      response_mutations:
      - append: {{header: {{key: x-resp-added, value: "%RESP(x-path-seen)%"}}}}
      - remove: x-body-sha256
- name: envoy.filters.http.cors
  typed_config:
    "@type": {_CORS}.Cors
- name: envoy.filters.http.router
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""

ROUTES = f"""\
- match: {{prefix: /override}}
  route: {{cluster: backend, prefix_rewrite: /api}}
  typed_per_filter_config:
    hm:
      "@type": {_HM}.HeaderMutationPerRoute
      mutations:
        request_mutations:
        - append:
            header: {{key: x-level, value: route}}
            append_action: OVERWRITE_IF_EXISTS_OR_ADD
        response_mutations:
        - append: {{header: {{key: x-route-resp, value: "yes"}}}}
- match: {{prefix: /cors}}
  route: {{cluster: backend, prefix_rewrite: /api}}
  typed_per_filter_config:
    envoy.filters.http.cors:
      "@type": {_CORS}.CorsPolicy
      allow_origin_string_match: [{{exact: "https://app.example"}}]
      allow_methods: GET,PUT
      allow_headers: x-custom
      expose_headers: x-exposed
      max_age: "300"
"""


class HeaderMutationCorsTests(HcmCase):
    async def _setup(self) -> str:
        proxy = await self.setup_hcm(http_filters=FILTERS, extra_routes=ROUTES)
        echo = self.backend

        def render_get(request: Any) -> bytes:
            # The request headers as the backend got them.
            seen = {k.decode().lower(): [v.decode() for v in vs]
                    for k, vs in request.requestHeaders.getAllRawHeaders()}
            request.setHeader(b"x-body-sha256", b"should-be-removed")
            request.setHeader(b"x-path-seen", request.uri)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(seen).encode()

        echo.render_GET = render_get  # type: ignore[method-assign]
        return f"http://127.0.0.1:{proxy.port}"

    async def get(self, url: str, *args: str) -> tuple[str, str, str]:
        """(status, body, response headers lower-cased)."""
        headers = self.workdir / "h"
        body = self.workdir / "b"
        status = await self.curl("-D", str(headers), "-o", str(body), "-w", "%{http_code}",
                                 *args, url)
        return status, body.read_text(), headers.read_text().lower()

    @e2e
    async def test_header_mutation(self) -> None:
        base = await self._setup()
        status, body, head = await self.get(
            f"{base}/api/x", "-H", "x-remove-me: 1", "-H", "x-over: old", "-H", "x-in: copied",
            "-H", "x-added: zero")
        self.assertEqual(status, "200")
        seen = json.loads(body)
        self.assertEqual(seen["x-added"], ["zero", "one"])
        self.assertEqual(seen["x-over"], ["new"])
        self.assertNotIn("x-remove-me", seen)
        self.assertEqual(seen["x-copy"], ["copied"])
        self.assertEqual(seen["x-level"], ["filter"])
        self.assertIn("x-resp-added: /api/x", head)
        self.assertNotIn("x-body-sha256", head)
        self.assertNotIn("x-route-resp", head)
        # The route's HeaderMutationPerRoute runs after the filter's own mutations.
        status, body, head = await self.get(f"{base}/override/y")
        self.assertEqual(status, "200")
        self.assertEqual(json.loads(body)["x-level"], ["route"])
        self.assertIn("x-route-resp: yes", head)
        self.assertIn("x-resp-added: /api/y", head)

    @e2e
    async def test_cors(self) -> None:
        base = await self._setup()
        before = len(self.backend.seen)
        status, body, head = await self.get(
            f"{base}/cors/z", "-X", "OPTIONS", "-H", "Origin: https://app.example",
            "-H", "Access-Control-Request-Method: PUT")
        self.assertEqual(status, "200")
        self.assertEqual(len(self.backend.seen), before)  # answered by the proxy
        for line in ("access-control-allow-origin: https://app.example",
                     "access-control-allow-methods: get,put",
                     "access-control-allow-headers: x-custom",
                     "access-control-max-age: 300"):
            self.assertIn(line, head)
        # The actual request reaches the backend and its response gets the CORS headers.
        status, _, head = await self.get(f"{base}/cors/z", "-H", "Origin: https://app.example")
        self.assertEqual(status, "200")
        self.assertEqual(len(self.backend.seen), before + 1)
        self.assertIn("access-control-allow-origin: https://app.example", head)
        self.assertIn("access-control-expose-headers: x-exposed", head)
        # Another origin: no CORS header at all, and its preflight goes to the backend.
        status, _, head = await self.get(f"{base}/cors/z", "-H", "Origin: https://evil.example")
        self.assertEqual(status, "200")
        self.assertNotIn("access-control-", head)
        await self.get(f"{base}/cors/z", "-X", "OPTIONS", "-H", "Origin: https://evil.example",
                       "-H", "Access-Control-Request-Method: PUT")
        self.assertEqual(self.backend.seen[-1][0], b"OPTIONS")
        # No policy on the route: nothing either.
        _, _, head = await self.get(f"{base}/api/w", "-H", "Origin: https://app.example")
        self.assertNotIn("access-control-", head)
