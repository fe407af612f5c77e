from twisted.application.service import ServiceMaker

hbone_client = ServiceMaker(
    "hbonex client", "hbonex.cli.client_tap", "Forward TCP through HBONE tunnels (HTTP CONNECT "
    "over mTLS).", "hbone-client",
)
