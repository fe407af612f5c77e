"""
README.md, run as written: every ```sh block, in order, in a fresh copy of the checkout, the way
a new user would type them (a failing quick start is a failing test, not a surprise).

What differs from a new user's machine, and why:

* **Ports.** 15008, 9000 and 8080 become free ports (tests run in parallel); a server command
  relying on the default ``--listen`` gets ``--listen 127.0.0.1:PORT``, a client command relying
  on the default ``--server`` gets ``--server 127.0.0.1:PORT``.
* **Dependencies.** ``python3`` is this interpreter; ``python3 -m venv DIR`` makes a real venv
  whose site-packages also see this environment's (one ``.pth`` line), and its ``pip install``
  installs hbonex from the copy for real but with ``--no-deps``: the dependencies are the ones
  the rest of the suite runs on, and downloading ~15 MB of them on every run would make the
  suite slow and the test flaky.  pip still builds the package with the build backend
  pyproject.toml names: this environment's when it has it (then offline), else fetched by pip
  (a small download, cached).  ``DIR/bin/twistd`` is the same entry point as Twisted's own.
* **The test suite.** The block that runs the whole suite installs as written but runs one
  small module: the whole suite contains this test.
* **Terminals.** Long-running commands (``twistd -n``, ``cmd &``) run in the background until
  their block ends; the next command waits until they listen.  The dev PKI goes to a temporary
  ``$XDG_STATE_HOME`` (one of the places the README names).

Afterwards ``git status`` in the copy may show only the files the README writes with ``>``: no
``twistd.pid``, no CA key, nothing else to commit by mistake.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from functools import partial
from pathlib import Path
from typing import Callable

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent
#: The README's fixed ports, replaced by free ones.
FIXED_PORTS = {"server": 15008, "forward": 9000, "target": 8080}
#: Bounded waits, in seconds.
INSTALL_TIMEOUT = 300.0  # pip may fetch the build backend
COMMAND_TIMEOUT = 120.0
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
#: What some commands must print, beyond exiting with status 0.
EXPECTED_OUTPUT = [
    (r"\bhbonex demo\b", r"result\s+OK"),
    (r"^curl\b", r"Directory listing for /"),
    (r"\bhbonex config check\b", r": OK \("),
    (r"-m twisted\.trial\b", r"\bPASSED\b"),
]
#: What a command's output must not contain (its text, why).
UNEXPECTED_OUTPUT = [
    (r"\bhbonex pki init\b", r"warning", "pki/ should be in .gitignore"),
    (r"", r"Traceback", "a traceback"),
]


def shell_commands(markdown: str) -> list[list[str]]:
    """The README's ```sh blocks as lists of commands (continuations joined, no comments)."""
    blocks = []
    for block in re.findall(r"^```sh\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL):
        lines = block.replace("\\\n", " ").splitlines()
        blocks.append([" ".join(line.split()) for line in lines
                       if line.strip() and not line.lstrip().startswith("#")])
    return blocks


def substitute(command: str, ports: dict[str, int]) -> str:
    """The command with free ports (see the module docstring)."""
    for name, fixed in FIXED_PORTS.items():
        command = re.sub(rf"(?<![\d.]){fixed}(?!\d)", str(ports[name]), command)
    server = f"127.0.0.1:{ports['server']}"
    if not re.search(r"(\s--config|\s-c)(=|\s)", command):
        if not re.search(r"\s--listen(=|\s)", command):
            command = re.sub(r"(?<=\s)(hbone-server|render server)(?=\s|$)",
                             rf"\1 --listen {server}", command, count=1)
        if not re.search(r"\s--server(=|\s)", command):
            command = re.sub(r"(?<=\s)(hbone-client|render client)(?=\s|$)",
                             rf"\1 --server {server}", command, count=1)
    # The whole suite would run this test again.
    return re.sub(r"(-m twisted\.trial)( -j\s*\d+)? tests(?=\s|$)", r"\1 tests.test_spiffe",
                  command)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def all_accept(ports: list[int]) -> bool:
    return all(accepts(port) for port in ports)


def wait_until(condition: Callable[[], bool], timeout: float, failed: Callable[[], str]) -> None:
    """Check ``condition`` every 50 ms until it holds; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {failed()}")
        time.sleep(0.05)


def build_backend_offline() -> bool:
    """Whether this environment can build hbonex itself (pyproject.toml's build-system)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        setuptools = tuple(int(x) for x in version("setuptools").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    # setuptools >= 70.1 has bdist_wheel itself; older ones need the wheel package.
    wheel = setuptools >= (70, 1) or importlib.util.find_spec("wheel") is not None
    return setuptools >= (68, 0) and wheel


def site_dirs() -> list[str]:
    """Where this environment's packages are (for the README's venvs to see them too)."""
    paths = sysconfig.get_paths()
    found = dict.fromkeys(p for p in (paths["purelib"], paths["platlib"]) if os.path.isdir(p))
    found.update(dict.fromkeys(p for p in sys.path if os.path.isdir(p)
                               and os.path.basename(p) in ("site-packages", "dist-packages")))
    return list(found)


MAKE_VENV = """\
import os, subprocess, sys
args = sys.argv[1:]
subprocess.run([sys.executable, "-m", "venv", "--without-pip", *args], check=True)
target = [a for a in args if not a.startswith("-")][-1]
bin_dir = os.path.join(target, "bin")
purelib = subprocess.run(
    [os.path.join(bin_dir, "python"), "-c",
     "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
    check=True, capture_output=True, text=True).stdout.strip()
with open(os.path.join(purelib, "_hbonex_readme_test.pth"), "w") as f:
    f.write({sites!r})
def script(name, text):
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
here = '"$(dirname "$0")"'
script("pip", f'''#!/bin/sh
if [ "$1" = install ]; then
    shift
    exec {{here}}/python -m pip install --no-deps {pip_install} "$@"
fi
exec {{here}}/python -m pip "$@"
''')
# Twisted's console script: sys.path[0] is bin/, not the working directory.
script("_twistd.py", "from twisted.scripts.twistd import run\\nrun()\\n")
script("twistd", f'#!/bin/sh\\nexec {{here}}/python {{here}}/_twistd.py "$@"\\n')
"""


class Process:
    """A command in its own session, its output in a file; ``stop`` ends the whole group."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.command = command
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                ["bash", "-c", command], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def describe(self) -> str:
        return f"`{self.command}`:\n{self.output()[-4000:]}"

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            self.proc.wait()
            raise AssertionError(f"still running after {timeout:g}s: {self.describe()}")
        finally:
            self.kill_group()  # anything it left behind

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.kill_group(signal.SIGTERM)
        return self.wait(STOP_TIMEOUT)


def listening(process: Process) -> bool:
    """Whether a twistd process has logged a listening listener."""
    return bool(re.search(r"listener \S+ listening on", process.output()))


class ReadmeTests(unittest.TestCase):
    def setUp(self) -> None:
        for tool in ("git", "bash", "sh"):
            if shutil.which(tool) is None:
                raise unittest.SkipTest(f"needs {tool}")
        if not (ROOT / ".git").exists():
            raise unittest.SkipTest("needs a git checkout (to copy what a clone has)")
        if importlib.util.find_spec("pip") is None:
            raise unittest.SkipTest("needs pip in this environment")
        self.tmp = Path(self.mktemp()).absolute()
        self.copy = self.tmp / "clone"
        self.logs = self.tmp / "logs"
        self.logs.mkdir(parents=True)
        self.processes: list[Process] = []
        self.addCleanup(self.kill_all)

    def kill_all(self) -> None:
        for p in self.processes:
            p.kill_group()
            p.proc.wait()

    def make_copy(self) -> None:
        """What a fresh clone of the working tree would have (tracked and new files)."""
        listed = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
             "--exclude-standard"], check=True, capture_output=True, timeout=60,
        ).stdout.decode().split("\0")
        for name in filter(None, listed):
            source = ROOT / name
            if source.is_file():  # not deleted in the working tree
                (self.copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, self.copy / name)
        for args in (["init", "-q"], ["add", "-A"]):
            subprocess.run(["git", *args], cwd=self.copy, check=True, timeout=60,
                           capture_output=True)

    def environment(self) -> dict[str, str]:
        shims = self.tmp / "shims"
        shims.mkdir()
        pip_install = "--no-build-isolation --no-index" if build_backend_offline() else ""
        (shims / "make_venv.py").write_text(
            MAKE_VENV.format(sites="".join(f"{p}\n" for p in site_dirs()),
                             pip_install=pip_install))
        python = getattr(sys, "_base_executable", None) or sys.executable
        python3 = shims / "python3"
        python3.write_text(
            "#!/bin/sh\n"
            'if [ "$1" = -m ] && [ "$2" = venv ]; then\n'
            f'    shift 2; exec "{python}" "{shims / "make_venv.py"}" "$@"\n'
            "fi\n"
            f'exec "{python}" "$@"\n'
        )
        python3.chmod(0o755)
        # As on a new user's machine: the venv's commands are not on PATH (even if this
        # machine has a twistd of its own elsewhere).
        for name in ("twistd", "hbonex"):
            (shims / name).write_text(f"#!/bin/sh\necho '{name}: command not found' >&2\n"
                                      "exit 127\n")
            (shims / name).chmod(0o755)
        if shutil.which("curl") is None:
            # curl URL, for machines without curl.
            (shims / "curl").write_text(
                f'#!/bin/sh\nexec "{python}" -c "import sys, urllib.request; sys.stdout.write('
                'urllib.request.urlopen(sys.argv[-1], timeout=30).read().decode())" "$@"\n')
            (shims / "curl").chmod(0o755)
        keep = ("HOME", "LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE", "SSL_CERT_DIR",
                "REQUESTS_CA_BUNDLE")
        env = {k: v for k, v in os.environ.items()
               if k in keep or k.startswith("PIP_") or k.lower().endswith("_proxy")}
        env.update({
            # No venv of ours on PATH: bare `twistd` or `hbonex` would not be found.
            "PATH": os.pathsep.join([str(shims), "/usr/local/bin", "/usr/bin", "/bin"]),
            "XDG_STATE_HOME": str(self.tmp / "state"),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_INPUT": "1",
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def start(self, command: str, env: dict[str, str]) -> Process:
        process = Process(command, self.copy, env, self.logs / f"{len(self.processes)}.log")
        self.processes.append(process)
        return process

    def check_output(self, command: str, output: str) -> None:
        for pattern, wanted in EXPECTED_OUTPUT:
            if re.search(pattern, command):
                self.assertRegex(output, wanted, f"`{command}`")
        for pattern, unwanted, why in UNEXPECTED_OUTPUT:
            if re.search(pattern, command) and re.search(unwanted, output):
                self.fail(f"{why}: `{command}`:\n{output[-4000:]}")

    def wait_ready(self, process: Process, ready: Callable[[], bool]) -> None:
        """Until ``ready()`` (e.g. the process listens); failing if the process exits first."""
        wait_until(lambda: process.proc.poll() is not None or ready(), READY_TIMEOUT,
                   process.describe)
        self.assertIsNone(process.proc.poll(), f"exited: {process.describe()}")

    def run_block(self, commands: list[str], env: dict[str, str], ports: dict[str, int]) -> None:
        background = []
        for command in commands:
            if re.search(r"(^|\s|/)twistd\s", command):
                self.assertRegex(command, r"twistd -n ", "README twistd commands run with -n")
                process = self.start(f"exec {command}", env)
                background.append(process)
                self.wait_ready(process, partial(listening, process))
            elif command.endswith("&"):
                command = command[:-1].strip()
                self.assertNotRegex(command, r"&&|;|\|", "one simple command before &")
                process = self.start(f"exec {command}", env)
                background.append(process)
                mine = [p for p in ports.values() if re.search(rf"(?<!\d){p}(?!\d)", command)]
                self.assertTrue(mine, f"`{command}` names none of the ports {ports}")
                self.wait_ready(process, partial(all_accept, mine))
            else:
                process = self.start(command, env)
                timeout = INSTALL_TIMEOUT if "pip install" in command else COMMAND_TIMEOUT
                code = process.wait(timeout)
                self.assertEqual(code, 0, process.describe())
                self.check_output(command, process.output())
        for process in reversed(background):  # as one would end them: last started first
            self.assertIsNone(process.proc.poll(), f"exited early: {process.describe()}")
            code = process.stop()
            self.check_output(process.command, process.output())
            if "twistd" in process.command:
                self.assertIn(code, (0, -signal.SIGTERM), process.describe())

    def test_readme(self) -> None:
        self.make_copy()
        env = self.environment()
        ports = dict(zip(FIXED_PORTS, free_ports(len(FIXED_PORTS)), strict=True))
        blocks = shell_commands((self.copy / "README.md").read_text())
        self.assertGreaterEqual(len(blocks), 4, "the README's shell blocks")
        written = set()
        for block in blocks:
            commands = [substitute(c, ports) for c in block]
            written.update(re.findall(r">\s*(\S+)", " ".join(commands)))
            self.run_block(commands, env, ports)
        for name in written:
            self.assertTrue((self.copy / name).stat().st_size, f"{name} is empty")
        self.assertTrue((self.tmp / "state" / "hbonex" / "dev-pki" / "ca.pem").exists(),
                        "the dev PKI is where the README says")
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"], cwd=self.copy,
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout.splitlines()
        untracked = {line[3:] for line in status if line.startswith("?? ")}
        self.assertEqual(untracked - written, set(), "files the README leaves to commit")
