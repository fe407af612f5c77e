"""Tests for ``hbonex pki ...`` run in-process through hbonex.cli.main.main."""

from __future__ import annotations

import argparse
import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.trial import unittest

from hbonex.cli import main as cli
from hbonex.tls.pki import load_pki_dir, not_after, not_before
from hbonex.tls.spiffe import SpiffeId

SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"


class CLITestCase(unittest.TestCase):
    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = cli.main(list(argv))
        return code, out.getvalue(), err.getvalue()


class PKIInitTests(CLITestCase):
    def test_init(self) -> None:
        d = self.mktemp()
        code, out, err = self.run_cli("pki", "init", d, "--trust-domain", "example.org")
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"wrote {Path(d) / 'ca.pem'}", out)
        self.assertIn("trust domain example.org", out)
        self.assertIn(f"wrote {Path(d) / 'ca-key.pem'}", out)
        self.assertEqual(stat.S_IMODE((Path(d) / "ca-key.pem").stat().st_mode), 0o600)
        ca = x509.load_pem_x509_certificate((Path(d) / "ca.pem").read_bytes())
        self.assertIn("hbonex CA example.org", ca.subject.rfc4514_string())

    def test_days(self) -> None:
        d = self.mktemp()
        code, _, _ = self.run_cli("pki", "init", d, "--days", "7")
        self.assertEqual(code, 0)
        ca = x509.load_pem_x509_certificate((Path(d) / "ca.pem").read_bytes())
        lifetime = not_after(ca) - not_before(ca)
        self.assertEqual(lifetime.days, 7)

    def test_refuses_overwrite_then_force(self) -> None:
        d = self.mktemp()
        self.assertEqual(self.run_cli("pki", "init", d)[0], 0)
        before = (Path(d) / "ca.pem").read_bytes()
        code, out, err = self.run_cli("pki", "init", d)
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(
            err,
            f"hbonex: error: {Path(d) / 'ca.pem'}: already exists; refusing to replace the CA"
            " (use --force)\n",
        )
        self.assertEqual((Path(d) / "ca.pem").read_bytes(), before)
        code, _, _ = self.run_cli("pki", "init", d, "--force")
        self.assertEqual(code, 0)
        self.assertNotEqual((Path(d) / "ca.pem").read_bytes(), before)

    def test_bad_trust_domain(self) -> None:
        code, _, err = self.run_cli("pki", "init", self.mktemp(), "--trust-domain", "A_B")
        self.assertEqual(code, 2)
        self.assertTrue(err.startswith("hbonex: error: "), err)
        self.assertIn("invalid trust domain 'A_B'", err)


class PKIInitGitTests(CLITestCase):
    """
    ``pki init`` inside a git work tree warns that the CA key could be committed, unless git
    ignores it.
    """

    def setUp(self) -> None:
        if shutil.which("git") is None:
            raise unittest.SkipTest("needs git")
        self.tree = Path(self.mktemp()).absolute()
        self.tree.mkdir()
        subprocess.run(["git", "init", "-q", str(self.tree)], check=True, timeout=60)

    def test_warns_in_a_work_tree(self) -> None:
        code, out, err = self.run_cli("pki", "init", str(self.tree / "pki"))
        self.assertEqual(code, 0)
        self.assertIn("wrote", out)
        self.assertEqual(
            err,
            f"hbonex: warning: {self.tree / 'pki' / 'ca-key.pem'} is inside the git work tree "
            f"{self.tree} and not ignored; keep it out of commits (add its directory to "
            ".gitignore)\n",
        )

    def test_quiet_when_ignored(self) -> None:
        (self.tree / ".gitignore").write_text("pki/\n")
        code, _, err = self.run_cli("pki", "init", str(self.tree / "pki"))
        self.assertEqual((code, err), (0, ""))

    def test_quiet_outside_a_work_tree(self) -> None:
        # self.mktemp() is under _trial_temp, inside the checkout: use the system's temp dir.
        outside = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, outside)
        if any((p / ".git").exists() for p in [outside, *outside.parents]):
            raise unittest.SkipTest(f"{outside} is inside a git work tree")
        code, _, err = self.run_cli("pki", "init", str(outside / "pki"))
        self.assertEqual((code, err), (0, ""))


class PKIIssueTests(CLITestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.assertEqual(self.run_cli("pki", "init", str(self.dir))[0], 0)

    def test_issue(self) -> None:
        code, out, err = self.run_cli(
            "pki", "issue", str(self.dir), "server",
            "--spiffe", SERVER_ID,
            "--dns", "localhost", "--dns", "server.example",
            "--ip", "127.0.0.1", "--ip", "::1",
            "--days", "30",
        )  # fmt: skip
        self.assertEqual((code, err), (0, ""))
        cert_p, key_p = self.dir / "server" / "cert.pem", self.dir / "server" / "key.pem"
        self.assertIn(f"wrote {cert_p} ({SERVER_ID}, DNS:localhost, DNS:server.example", out)
        self.assertIn("IP:127.0.0.1, IP:::1", out)
        self.assertIn(f"wrote {key_p}", out)
        self.assertEqual(stat.S_IMODE(key_p.stat().st_mode), 0o600)
        m = load_pki_dir(self.dir / "server")
        self.assertEqual(m.spiffe_id, SpiffeId.parse(SERVER_ID))
        san = m.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(
            san.value.get_values_for_type(x509.DNSName), ["localhost", "server.example"]
        )
        lifetime = not_after(m.certificate) - not_before(m.certificate)
        self.assertEqual(lifetime.days, 30)

    def test_bad_spiffe(self) -> None:
        code, out, err = self.run_cli(
            "pki", "issue", str(self.dir), "x", "--spiffe", "spiffe://cluster.local/ns/../x"
        )
        self.assertEqual((code, out), (2, ""))
        self.assertIn(f"hbonex: error: {self.dir / 'x' / 'cert.pem'}: invalid SPIFFE ID", err)
        self.assertFalse((self.dir / "x").exists())

    def test_bad_ip(self) -> None:
        code, _, err = self.run_cli(
            "pki", "issue", str(self.dir), "x", "--spiffe", SERVER_ID, "--ip", "localhost"
        )
        self.assertEqual(code, 2)
        self.assertIn("invalid IP address 'localhost'", err)

    def test_missing_ca_names_file(self) -> None:
        empty = self.mktemp()
        code, _, err = self.run_cli("pki", "issue", empty, "x", "--spiffe", SERVER_ID)
        self.assertEqual(code, 2)
        self.assertEqual(err, f"hbonex: error: {Path(empty) / 'ca.pem'}: no such file\n")

    def test_corrupt_ca_key_names_file(self) -> None:
        (self.dir / "ca-key.pem").write_bytes(b"not a key")
        code, _, err = self.run_cli("pki", "issue", str(self.dir), "x", "--spiffe", SERVER_ID)
        self.assertEqual(code, 2)
        self.assertIn(f"{self.dir / 'ca-key.pem'}: not a PEM private key", err)

    def test_refuses_overwrite_then_force(self) -> None:
        self.assertEqual(self.run_cli("pki", "issue", str(self.dir), "x", "--spiffe",
                                      SERVER_ID)[0], 0)
        before = (self.dir / "x" / "key.pem").read_bytes()
        code, out, err = self.run_cli("pki", "issue", str(self.dir), "x", "--spiffe", SERVER_ID)
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(
            err,
            f"hbonex: error: {self.dir / 'x' / 'cert.pem'}: already exists; refusing to replace "
            "identity 'x' (use --force)\n",
        )
        self.assertEqual((self.dir / "x" / "key.pem").read_bytes(), before)
        code, _, err = self.run_cli("pki", "issue", str(self.dir), "x", "--spiffe", SERVER_ID,
                                    "--force")
        self.assertEqual((code, err), (0, ""))
        self.assertNotEqual((self.dir / "x" / "key.pem").read_bytes(), before)

    def test_other_trust_domain_needs_the_flag(self) -> None:
        other = "spiffe://other.domain/ns/default/sa/server"
        code, out, err = self.run_cli("pki", "issue", str(self.dir), "x", "--spiffe", other)
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(
            err,
            f"hbonex: error: {self.dir / 'x' / 'cert.pem'}: {other} is not in trust domain "
            "cluster.local; pass --trust-domain other.domain to issue it anyway\n",
        )
        self.assertFalse((self.dir / "x").exists())
        code, _, err = self.run_cli("pki", "issue", str(self.dir), "x", "--spiffe", other,
                                    "--trust-domain", "other.domain")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(str(load_pki_dir(self.dir / "x").spiffe_id), other)

    def test_spiffe_required(self) -> None:
        code, _, err = self.run_cli("pki", "issue", str(self.dir), "x")
        self.assertEqual(code, 2)
        self.assertIn("--spiffe", err)


class ParserTests(CLITestCase):
    def test_no_command(self) -> None:
        code, _, err = self.run_cli()
        self.assertEqual(code, 2)
        self.assertIn("usage: hbonex", err)
        code, _, err = self.run_cli("pki")
        self.assertEqual(code, 2)
        self.assertIn("usage: hbonex pki", err)

    def test_help_and_version(self) -> None:
        code, out, _ = self.run_cli("--help")
        self.assertEqual(code, 0)
        self.assertIn("pki", out)
        code, out, _ = self.run_cli("pki", "issue", "--help")
        self.assertEqual(code, 0)
        self.assertIn("--spiffe", out)
        code, out, _ = self.run_cli("--version")
        self.assertEqual((code, out.strip()), (0, "hbonex 0.1.0"))

    def test_unknown_command(self) -> None:
        code, _, err = self.run_cli("frobnicate")
        self.assertEqual(code, 2)
        self.assertIn("invalid choice", err)

    def test_extra_subcommand_registration(self) -> None:
        """The registry pattern other modules use: add_subcommand(subparsers) + func."""
        seen: list[str] = []

        def hello(args: argparse.Namespace) -> int:
            seen.append(args.who)
            return 3

        def add(subparsers: Any) -> None:
            p = subparsers.add_parser("hello")
            p.add_argument("who")
            p.set_defaults(func=hello)

        self.patch(cli, "_COMMANDS", [*cli._COMMANDS, add])
        code, _, _ = self.run_cli("hello", "world")
        self.assertEqual((code, seen), (3, ["world"]))
        # pki is still there.
        self.assertEqual(self.run_cli("pki", "init", self.mktemp())[0], 0)

    def test_cli_error(self) -> None:
        def add(subparsers: Any) -> None:
            p = subparsers.add_parser("boom")

            def fail(args: object) -> int:
                raise cli.CLIError("config.yaml: line 3: bad")

            p.set_defaults(func=fail)

        self.patch(cli, "_COMMANDS", [*cli._COMMANDS, add])
        code, _, err = self.run_cli("boom")
        self.assertEqual((code, err), (2, "hbonex: error: config.yaml: line 3: bad\n"))


class ModuleEntryPointTests(unittest.TestCase):
    def test_python_dash_m(self) -> None:
        d = Path(self.mktemp()).absolute()
        env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parent.parent.parent)}
        result = subprocess.run(
            [sys.executable, "-m", "hbonex", "pki", "init", str(d)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue((d / "ca.pem").exists())
        result = subprocess.run(
            [sys.executable, "-m", "hbonex", "pki", "init", str(d)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        self.assertEqual(result.returncode, 2)
        self.assertIn(f"hbonex: error: {d / 'ca.pem'}: already exists", result.stderr)
