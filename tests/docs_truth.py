"""Readers of the docs and of the code they describe, for tests/test_docs_truth.py: the CLI's
argparse parsers (captured, never run), the flag tables of docs/configuration.md, the metrics
the code creates and their Prometheus names, markdown links and headings, chart values."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [ROOT / "README.md", *DOCS, *sorted((ROOT / "load_tests").glob("*.md")), *sorted((ROOT / "bench").glob("*.md"))]
CHART = ROOT / "helm" / "eftmesh"


# --- the CLI's parsers -------------------------------------------------------------------------


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
    raise _Captured(self)


def parser_of(command: str) -> argparse.ArgumentParser:
    """The parser `eftmesh COMMAND` parses its flags with, taken from the real entry point
    (`eftmesh.cli.main`) at its first parse, so nothing runs."""
    from eftmesh import cli

    with mock.patch.object(argparse.ArgumentParser, "parse_args", _capture), \
            mock.patch("logging.basicConfig"), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.main([command])
        except _Captured as c:
            parser = c.parser
        else:
            raise AssertionError(f"eftmesh {command} parsed nothing")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser


def subcommands() -> set[str]:
    from eftmesh import cli

    with mock.patch.object(argparse.ArgumentParser, "parse_args", _capture), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.main(["generate"])
        except _Captured as c:
            top = c.parser
    (sub,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Option string -> action, help and suppressed ones left out."""
    return {s: a for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
            for s in a.option_strings}


def help_default(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """What `--help` says the default is: the text of its "(default: ...)", or "on by
    default"/"off by default", else the action's default."""
    text = parser._get_formatter()._expand_help(action) if action.help else ""
    text = " ".join(text.split())
    at = text.rfind("(default:")
    if at >= 0:
        return text[at + len("(default:"):].rstrip(". ").removesuffix(")").strip()
    for word in ("on", "off"):
        if f"{word} by default" in text:
            return word
    return str(action.default)


# --- markdown ------------------------------------------------------------------------------------


def sections(path: Path) -> dict[str, str]:
    """"## heading" -> its text (up to the next ## heading)."""
    out, name, lines = {}, "", []
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            out[name] = "\n".join(lines)
            name, lines = line[3:].strip(), []
        else:
            lines.append(line)
    out[name] = "\n".join(lines)
    return out


def table_rows(text: str) -> Iterator[list[str]]:
    """The body rows of every markdown table in `text`, as cells."""
    header = False
    for line in text.splitlines():
        if not line.startswith("|"):
            header = False
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if set("".join(cells)) <= set("-: "):
            header = True
            continue
        if header:
            yield cells


def literals(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def flags_in(text: str) -> list[str]:
    return re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.add(anchor(line.lstrip("#")))
    return out


def links(path: Path) -> Iterator[tuple[int, str]]:
    fenced = False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            yield n, target


def code_blocks(path: Path) -> Iterator[str]:
    block: list[str] | None = None
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if block is None:
                block = [] if line.strip() in ("```", "```sh", "```bash", "```console", "```shell") else None
                if block is None:  # another language: skip to its end
                    block = ["\x00"]
            else:
                if block[:1] != ["\x00"]:
                    yield "\n".join(block)
                block = None
        elif block is not None:
            block.append(line)


# --- metrics ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instrument:
    name: str
    kind: str
    unit: str


def created_instruments() -> dict[str, Instrument]:
    """Every instrument `services/` creates (`m.create_<kind>("name", ..., unit=...)`)."""
    out = {}
    for path in (ROOT / "services").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"\.create_(\w+)\(\s*\"([^\"]+)\"", text):
            call = text[m.end(): text.find("\n\n", m.end()) if "\n\n" in text[m.end():] else len(text)]
            unit = re.search(r"unit=\"([^\"]*)\"", call[:400])
            out[m.group(2)] = Instrument(m.group(2), m.group(1), unit.group(1) if unit else "")
    return out


_UNITS = {"s": "seconds", "By": "bytes", "ms": "milliseconds", "1": ""}


def prometheus_names(inst: Instrument) -> set[str]:
    """The series an instrument shows as in Prometheus (the exporter's rules: dots to
    underscores, the unit's name appended unless it is an annotation such as {token}, _total
    on counters, _bucket/_sum/_count on histograms; the bare base too, as dashboards match on
    prefixes)."""
    base = inst.name.replace(".", "_")
    unit = "" if inst.unit.startswith("{") else _UNITS.get(inst.unit, inst.unit)
    full = f"{base}_{unit}" if unit and not base.endswith(unit) else base
    names = {base, full}
    if "counter" in inst.kind and "up_down" not in inst.kind:
        names.add(f"{full}_total")
    if inst.kind == "histogram":
        names |= {f"{full}_{s}" for s in ("bucket", "sum", "count")}
    return names


def chart_texts() -> dict[str, str]:
    """The chart's files that may name a series: templates (HPA, KEDA), values, the dashboard."""
    files = [*CHART.glob("templates/*.yaml"), *CHART.glob("values*.yaml"), *CHART.glob("dashboards/*.json")]
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


def dashboard_exprs() -> list[str]:
    out = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "expr" and isinstance(v, str):
                    out.append(v)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for p in CHART.glob("dashboards/*.json"):
        walk(json.loads(p.read_text()))
    return out


# --- chart values ----------------------------------------------------------------------------------


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def schema_has(path: list[str]) -> bool:
    """Whether values.schema.json describes the value at `path`."""
    root = schema()

    def deref(node: dict) -> dict:
        while isinstance(node, dict) and "$ref" in node:
            target = root
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part]
            node = target
        return node

    node = deref(root)
    for key in path:
        props = node.get("properties", {})
        if key in props:
            node = deref(props[key])
        elif isinstance(node.get("additionalProperties"), dict):
            node = deref(node["additionalProperties"])
        else:
            return False
    return True


def values_has(path: list[str]) -> bool:
    """Whether values.yaml sets the value at `path` (null counts: it is documented there)."""
    node: object = values()
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def exported_series() -> set[str]:
    """The series names the real Prometheus exporter writes for both services' instruments,
    each recorded once (to check `prometheus_names` against)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import REGISTRY, generate_latest

    from eftmesh.common import metrics

    provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
    try:
        m = provider.get_meter("docs-truth")
        for obj in (metrics.CombinerMetrics(m), metrics.LogitMetrics(m, "r", *(lambda: 1,) * 4)):
            for inst in vars(obj).values():
                if hasattr(inst, "record"):
                    inst.record(0.5, {})
                elif hasattr(inst, "add"):
                    inst.add(1, {})
        text = generate_latest(REGISTRY).decode()
    finally:
        provider.shutdown()  # takes its collector out of the global registry
    return set(re.findall(r"^((?:eftmesh|gen_ai)_[a-z0-9_]+)", text, re.M))
