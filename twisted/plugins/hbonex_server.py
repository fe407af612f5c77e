from twisted.application.service import ServiceMaker

hbone_server = ServiceMaker(
    "hbonex server", "hbonex.cli.server_tap", "Terminate HBONE tunnels (HTTP CONNECT over mTLS).",
    "hbone-server",
)
