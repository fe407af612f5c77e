"""The ``hbonex`` command line tool.

Each subcommand is registered by a function ``add_subcommand(subparsers) -> None`` that adds its
parser and calls ``set_defaults(func=handler)``, where ``handler(args) -> int`` returns the exit
code. Handlers report user errors by raising :class:`CLIError` (or PKIError / SpiffeIdError),
which :func:`main` prints as ``hbonex: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from hbonex import __version__
from hbonex.tls.pki import (
    CA_CERT,
    CA_KEY,
    PKIError,
    ca_trust_domain,
    format_time,
    init_ca,
    issue,
    load_material,
    not_after,
    renew,
)
from hbonex.tls.spiffe import SpiffeIdError

__all__ = ["CLIError", "add_subcommand", "main"]

AddSubcommand = Callable[[Any], None]

EXIT_USAGE = 2


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


# Errors main() turns into "hbonex: error: MESSAGE". Other modules may append their own
# (e.g. a config error class) when they register a subcommand.
USER_ERRORS: list[type[BaseException]] = [CLIError, PKIError, SpiffeIdError]


# --- hbonex pki ---------------------------------------------------------------------------


def _san_summary(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no SANs"
    parts = list(san.get_values_for_type(x509.UniformResourceIdentifier))
    parts += [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
    parts += [f"IP:{a}" for a in san.get_values_for_type(x509.IPAddress)]
    return ", ".join(parts)


def _git_work_tree(path: Path) -> Path | None:
    """The git work tree ``path`` is in (a ``.git`` directory or file above it), or None."""
    for parent in [path, *path.parents]:
        if (parent / ".git").exists():
            return parent
    return None


def _warn_if_committable(key_path: Path) -> None:
    """
    A CA key inside a git work tree is one ``git add -A`` away from a commit: say so, unless
    git says the path is ignored.
    """
    key_path = key_path.absolute()
    tree = _git_work_tree(key_path.parent)
    if tree is None:
        return
    try:
        ignored = subprocess.run(
            ["git", "-C", str(tree), "check-ignore", "-q", str(key_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10,
        ).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ignored = False  # no git to ask: warn
    if not ignored:
        print(f"hbonex: warning: {key_path} is inside the git work tree {tree} and not "
              "ignored; keep it out of commits (add its directory to .gitignore)",
              file=sys.stderr)


def _cmd_pki_init(args: argparse.Namespace) -> int:
    init_ca(args.dir, trust_domain=args.trust_domain, days=args.days, force=args.force)
    d = Path(args.dir)
    # The CA is self-signed, so it is its own bundle: this checks the pair we just wrote.
    material = load_material(d / CA_CERT, d / CA_KEY, d / CA_CERT)
    expires = format_time(not_after(material.certificate))
    print(f"wrote {d / CA_CERT} (CA for trust domain {args.trust_domain}, expires {expires})")
    print(f"wrote {d / CA_KEY} (CA private key, mode 0600)")
    _warn_if_committable(d / CA_KEY)
    return 0


def _cmd_pki_issue(args: argparse.Namespace) -> int:
    # Default: the CA's own trust domain, so a typo'd or foreign SPIFFE ID is refused.
    trust_domain = args.trust_domain or ca_trust_domain(args.dir)
    cert_path, key_path = issue(
        args.dir, args.name, spiffe=args.spiffe, dns=args.dns, ip=args.ip, days=args.days,
        force=args.force, trust_domain=trust_domain,
    )
    # Re-load through the same checks a server would apply, and report what is really in it.
    material = load_material(cert_path, key_path, Path(args.dir) / CA_CERT)
    expires = format_time(not_after(material.certificate))
    print(f"wrote {cert_path} ({_san_summary(material.certificate)}; expires {expires})")
    print(f"wrote {key_path} (private key, mode 0600)")
    return 0


def _cmd_pki_renew(args: argparse.Namespace) -> int:
    cert_path, key_path = renew(args.dir, args.name, days=args.days)
    material = load_material(cert_path, key_path, Path(args.dir) / CA_CERT)
    expires = format_time(not_after(material.certificate))
    serial = format(material.certificate.serial_number, "x")
    print(f"wrote {cert_path} ({_san_summary(material.certificate)}; serial {serial}; "
          f"expires {expires})")
    print(f"wrote {key_path} (private key, mode 0600)")
    return 0


def add_subcommand(subparsers: Any) -> None:
    """Register ``hbonex pki init|issue|renew``."""
    pki = subparsers.add_parser(
        "pki",
        help="manage a small EC P-256 CA and issue SPIFFE certificates",
        description="Create a CA and issue leaf certificates carrying SPIFFE IDs.",
    )
    pki_sub = pki.add_subparsers(dest="pki_command", metavar="COMMAND")
    pki.set_defaults(func=lambda args: _usage(pki))

    init = pki_sub.add_parser(
        "init",
        help="create DIR/ca.pem and DIR/ca-key.pem",
        description="Create a new CA in DIR (DIR/ca.pem, DIR/ca-key.pem).",
    )
    init.add_argument("dir", metavar="DIR", help="PKI directory (created if missing)")
    init.add_argument(
        "--trust-domain",
        default="cluster.local",
        metavar="TD",
        help="SPIFFE trust domain named in the CA (cluster.local)",
    )
    init.add_argument("--days", type=int, default=3650, metavar="N", help="validity (3650)")
    init.add_argument("--force", action="store_true", help="overwrite an existing CA")
    init.set_defaults(func=_cmd_pki_init)

    iss = pki_sub.add_parser(
        "issue",
        help="issue DIR/NAME/cert.pem and key.pem signed by DIR's CA",
        description="Issue a leaf certificate for NAME, signed by the CA in DIR.",
    )
    iss.add_argument("dir", metavar="DIR", help="PKI directory holding ca.pem and ca-key.pem")
    iss.add_argument("name", metavar="NAME", help="identity name; files go to DIR/NAME/")
    iss.add_argument(
        "--spiffe",
        required=True,
        metavar="URI",
        help="SPIFFE ID, e.g. spiffe://cluster.local/ns/default/sa/server",
    )
    iss.add_argument(
        "--dns", action="append", default=[], metavar="NAME", help="DNS SAN (repeatable)"
    )
    iss.add_argument(
        "--ip", action="append", default=[], metavar="ADDR", help="IP SAN (repeatable)"
    )
    iss.add_argument("--days", type=int, default=365, metavar="N", help="validity (365)")
    iss.add_argument(
        "--trust-domain",
        default=None,
        metavar="TD",
        help="the trust domain the SPIFFE ID must be in (default: the CA's)",
    )
    iss.add_argument("--force", action="store_true", help="replace an existing NAME")
    iss.set_defaults(func=_cmd_pki_issue)

    ren = pki_sub.add_parser(
        "renew",
        help="re-issue DIR/NAME in place (new key and serial, same SPIFFE ID, DNS names, IPs)",
        description="Re-issue the leaf certificate of NAME in place, signed by the CA in DIR, "
        "keeping its SANs: a running hbone-server or hbone-client picks it up for new "
        "handshakes.",
    )
    ren.add_argument("dir", metavar="DIR", help="PKI directory holding ca.pem and ca-key.pem")
    ren.add_argument("name", metavar="NAME", help="identity name (DIR/NAME/cert.pem)")
    ren.add_argument("--days", type=int, default=None, metavar="N",
                     help="validity (default: the old certificate's)")
    ren.set_defaults(func=_cmd_pki_renew)


# --- registry -----------------------------------------------------------------------------

_COMMANDS: list[AddSubcommand] = [add_subcommand]


def _all_commands() -> list[AddSubcommand]:
    commands = list(_COMMANDS)
    # Imported here, not at module level: `hbonex pki` stays cheap and import cycles with
    # hbonex.cli.main cannot bite.
    from hbonex.cli import config_cmd as config_cli
    from hbonex.cli import demo

    commands.append(demo.add_subcommand)
    commands.append(config_cli.add_subcommand)
    return commands


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: a command is required", file=sys.stderr)
    return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hbonex",
        description="HBONE (HTTP CONNECT over mutual TLS) tunnels for Twisted.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _all_commands():
        register(subparsers)
    parser.set_defaults(func=lambda args: _usage(parser))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # argparse exits on --help/--version/usage errors; return the code so in-process
        # callers (tests, embedding) are not torn down.
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    try:
        result: int = args.func(args)
    except tuple(USER_ERRORS) as e:
        print(f"hbonex: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    raise SystemExit(main())
