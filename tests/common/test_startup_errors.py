"""Bad TLS or token files stop the real entry points with one line and exit code 2, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)


def assert_refused(proc: subprocess.CompletedProcess[str], flag: str, path: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "refusing to start" in proc.stderr
    assert flag in proc.stderr and path in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("flag", "contents"), [("--tls-cert", None), ("--tls-key", b"not a key\n")])
def test_logit_refuses_a_bad_tls_file(tiny_family: dict[str, Path], tmp_path: Path, flag: str, contents: bytes | None) -> None:
    files = {"--tls-cert": "/nonexistent", "--tls-key": "/nonexistent"}
    if contents is not None:  # the cert is fine as far as reading goes, the key is not PEM
        files = {"--tls-cert": str(tmp_path / "cert.pem"), "--tls-key": str(tmp_path / "key.pem")}
        Path(files["--tls-cert"]).write_bytes(b"-----BEGIN CERTIFICATE-----\n")
        Path(files["--tls-key"]).write_bytes(contents)
    proc = run("eftmesh.logit", "--model", str(tiny_family["base-small"]), "--role", "x", "--port", "0",
               *(x for kv in files.items() for x in kv))
    assert_refused(proc, flag, files[flag])


def test_combiner_refuses_an_empty_token_file(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# no tokens yet\n\n")
    proc = run("eftmesh.combiner", "--tokenizer", str(tiny_family["base-small"]), "--port", "0",
               "--upstream", "base-large=127.0.0.1:1", "--upstream", "base-small=127.0.0.1:1",
               "--upstream", "ft-small=127.0.0.1:1", "--auth-tokens-file", str(tokens))
    assert_refused(proc, "--auth-tokens-file", str(tokens))


def test_combiner_refuses_a_missing_token_file(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    missing = str(tmp_path / "absent")
    proc = run("eftmesh.combiner", "--tokenizer", str(tiny_family["base-small"]), "--port", "0",
               "--upstream", "base-large=127.0.0.1:1", "--upstream", "base-small=127.0.0.1:1",
               "--upstream", "ft-small=127.0.0.1:1", "--auth-tokens-file", missing)
    assert_refused(proc, "--auth-tokens-file", missing)


def test_combiner_refuses_a_missing_upstream_ca(tiny_family: dict[str, Path]) -> None:
    proc = run("eftmesh.combiner", "--tokenizer", str(tiny_family["base-small"]), "--port", "0",
               "--upstream", "base-large=127.0.0.1:1", "--upstream", "base-small=127.0.0.1:1",
               "--upstream", "ft-small=127.0.0.1:1", "--upstream-ca", "/nonexistent/ca.pem")
    assert_refused(proc, "--upstream-ca", "/nonexistent/ca.pem")
