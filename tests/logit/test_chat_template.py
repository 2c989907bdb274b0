"""The logit service's chat template: its tokenizer's, or --chat-template's, reported in Info
(the combiner renders chat messages with it); a bad --chat-template file is a refusal to start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from conftest import start_logit
from eftmesh.logit.server import read_chat_template
from eftmesh.v1 import logit_pb2, logit_pb2_grpc

MODELS = Path(__file__).resolve().parents[2] / "models" / "demo"
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _info(ls) -> logit_pb2.LogitServiceInfoResponse:
    with grpc.insecure_channel(f"127.0.0.1:{ls.server.port}") as ch:
        return logit_pb2_grpc.LogitServiceStub(ch).Info(logit_pb2.LogitServiceInfoRequest(), timeout=10)


@pytest.mark.e2e
def test_info_reports_the_tokenizers_template_or_the_flags(tmp_path) -> None:
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATE)
    tuned, base, replaced = (start_logit(MODELS / "ft-small", "ft-small"), start_logit(MODELS / "base-small", "base-small"),
                             start_logit(MODELS / "base-small", "base-chat", chat_template_file=str(f)))
    try:
        assert _info(tuned).chat_template == (MODELS / "ft-small" / "chat_template.jinja").read_text()
        assert _info(base).chat_template == ""  # a base model ships none
        assert _info(replaced).chat_template == TEMPLATE
    finally:
        for ls in (tuned, base, replaced):
            ls.server.stop(0).wait()


def test_a_bad_template_file_names_the_flag(tmp_path) -> None:
    with pytest.raises(ValueError, match="--chat-template .*cannot read"):
        read_chat_template(str(tmp_path / "missing.jinja"))
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m }")
    with pytest.raises(ValueError, match="--chat-template .*not a Jinja template: line 1"):
        read_chat_template(str(bad))
    ok = tmp_path / "ok.jinja"
    ok.write_text(TEMPLATE)
    assert read_chat_template(str(ok)) == TEMPLATE


@pytest.mark.e2e
def test_the_service_refuses_to_start_with_a_bad_template_file(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "eftmesh.cli", "logit", "--model", str(MODELS / "base-small"),
                           "--role", "base-small", "--host", "127.0.0.1", "--port", "0",
                           "--chat-template", str(tmp_path / "missing.jinja")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if "refusing to start" in ln]
    assert len(lines) == 1 and "--chat-template" in lines[0] and "missing.jinja" in lines[0], proc.stderr
