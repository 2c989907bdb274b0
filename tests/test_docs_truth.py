"""The docs say what the code does, checked on every run (fast tier): every flag and default of
docs/configuration.md against the `--help` of its command, every metric the code creates
against the docs (and every series a doc, the dashboard, an HPA or a KEDA rule names against
the code), every chart value the docs name against values.yaml and its schema, every relative
link, and every `eftmesh ...` command of the README's code blocks against the CLI's parsers.

Everything is derived from the parsers, the tables and the code, never from a list kept here,
so a flag or metric added with its doc line is checked with no change to this file; one added
without is a failure that names it."""

from __future__ import annotations

import argparse
import re
import shlex
from functools import cache

import pytest

from tests.docs_truth import (
    DOCS, MARKDOWN, ROOT, anchors, chart_texts, code_blocks, created_instruments, dashboard_exprs, exported_series, flags_in,
    help_default, links, literals, options, parser_of, prometheus_names, schema_has, sections, subcommands,
    table_rows, values, values_has,
)

CONFIGURATION = ROOT / "docs" / "configuration.md"


@cache
def parser(command: str) -> argparse.ArgumentParser:
    return parser_of(command)


def flag_sections() -> dict[str, tuple[list[str], str]]:
    """configuration.md's sections that document a command's flags: heading -> (the commands
    it names, its text). A heading names its command (`eftmesh logit`); a section whose heading
    names none documents the commands its text names."""
    known = subcommands()
    out = {}
    for heading, text in sections(CONFIGURATION).items():
        if not any(len(r) >= 3 and flags_in(r[0]) for r in table_rows(text)):
            continue
        named = [c for c in re.findall(r"eftmesh (\w+)", heading) if c in known]
        named = named or sorted({c for c in re.findall(r"`eftmesh (\w+)", text) if c in known})
        out[heading] = (named, text)
    return out


def test_configuration_md_should_document_the_flags_of_every_command():
    documented = {c for commands, _ in flag_sections().values() for c in commands}
    assert documented == subcommands(), "a command with no flag table in configuration.md"


@pytest.mark.parametrize("heading", sorted(flag_sections()))
def test_every_documented_flag_should_exist_and_every_flag_should_be_documented(heading):
    commands, text = flag_sections()[heading]
    assert commands, f"configuration.md ({heading}) has a flag table but names no `eftmesh COMMAND` it belongs to"
    table = " ".join(r[0] for r in table_rows(text))
    for command in commands:
        opts = options(parser(command))
        undocumented = sorted(o for o in opts if o.startswith("--") and o not in flags_in(text))
        assert not undocumented, f"eftmesh {command}: flags missing from configuration.md ({heading}): {undocumented}"
    for flag in flags_in(table):
        owners = [c for c in commands if flag in options(parser(c))]
        assert owners, f"configuration.md ({heading}) documents {flag}, which no eftmesh {'/'.join(commands)} takes"


def _same(literal: str, action: argparse.Action, said: str) -> bool:
    if literal.startswith("--") or literal == "+":
        return literal in said
    try:
        if float(literal) == float(action.default):
            return True
    except (TypeError, ValueError):
        pass
    return literal == str(action.default) or literal.lower() in said.lower()


def _default_ok(cell: str, command: str, parser_: argparse.ArgumentParser, action: argparse.Action) -> bool:
    said = help_default(parser_, action)
    lits = literals(cell)
    per_command = re.findall(r"`([^`]+)` \(`(\w+)`\)", cell)  # `120` (`generate`), `10` (`info`)
    if per_command:
        lits = [v for v, c in per_command if c == command]
        if not lits:  # this command is not named: no claim about it
            return True
    if lits:
        return all(_same(x, action, said) for x in lits)
    words = cell.lower()
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return words == "off" or words.endswith(" on")  # the switch is off (not given) / "reflection on"
    if words == "required":
        return action.required
    if words in ("off", "none", "plaintext"):
        return action.default in (None, False, "", [], 0) or said.lower().startswith(("off", "none", "no "))
    return words in said.lower() or said.lower() in words


@pytest.mark.parametrize("heading", sorted(flag_sections()))
def test_every_documented_default_should_equal_what_help_says(heading):
    commands, text = flag_sections()[heading]
    wrong = []
    for row in table_rows(text):
        if len(row) < 3 or not flags_in(row[0]):
            continue
        default = row[1]
        for flag in flags_in(row[0])[:1]:  # one default for the row's flags (e.g. --tls-cert, --tls-key)
            for command in commands:
                p = parser(command)
                action = options(p).get(flag)
                if action is not None and not _default_ok(default, command, p, action):
                    wrong.append(f"eftmesh {command} {flag}: docs say {default!r}, --help says "
                                 f"{help_default(p, action)!r} (default {action.default!r})")
    assert not wrong, "configuration.md defaults that differ from --help:\n" + "\n".join(wrong)


# --- metrics ---------------------------------------------------------------------------------------


def documented_metrics() -> dict[str, str]:
    """Metric name -> where, from every doc table whose first column names an instrument and
    whose row says its kind or describes a series (configuration.md's Metrics, deployment.md's
    autoscaling table)."""
    out = {}
    for path in DOCS:
        for heading, text in sections(path).items():
            for row in table_rows(text):
                names = [x for x in literals(row[0]) if re.fullmatch(r"(eftmesh|gen_ai)(\.[a-z_0-9]+)+", x)]
                for name in names:
                    out[name] = f"{path.name} ({heading})"
    return out


def test_every_metric_the_code_creates_should_be_documented():
    missing = sorted(set(created_instruments()) - set(documented_metrics()))
    assert not missing, f"metrics created in services/ but in no doc table: {missing}"


def test_every_metric_a_doc_table_names_should_be_created():
    made = created_instruments()
    ghosts = {n: where for n, where in documented_metrics().items() if n not in made}
    assert not ghosts, f"metrics the docs name that no code creates: {ghosts}"


def _labels() -> set[str]:
    """Attribute names, as Prometheus labels (eftmesh.role -> eftmesh_role): not series."""
    text = " ".join(p.read_text() for p in DOCS)
    code = " ".join(p.read_text() for p in (ROOT / "services").rglob("*.py"))
    names = set(re.findall(r"\"((?:eftmesh|gen_ai|rpc|error)\.[a-z_.]+)\"", code)) | set(re.findall(r"`((?:eftmesh|gen_ai)\.[a-z_.]+)`", text))
    return {n.replace(".", "_") for n in names} - {n.replace(".", "_") for n in created_instruments()}


def series_references() -> dict[str, set[str]]:
    """Series names (eftmesh_..., gen_ai_...) that the docs, the dashboard's queries, the HPA
    and KEDA templates and the values name -> where."""
    refs: dict[str, set[str]] = {}
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in MARKDOWN}
    sources |= chart_texts()
    sources["dashboard queries"] = "\n".join(dashboard_exprs())
    aliases = set()
    for where, text in sources.items():
        aliases |= set(re.findall(r"as:\s*([a-z_0-9]+)", text))  # prometheus-adapter renames
        for name in re.findall(r"(?<![\w./-])((?:eftmesh|gen_ai)_[a-z0-9_]+)", text):
            refs.setdefault(name, set()).add(where)
    skip = _labels() | aliases
    return {n: w for n, w in refs.items() if n not in skip and not n.startswith("eftmesh_lab")}


def test_every_series_the_docs_dashboard_and_autoscalers_name_should_be_exported():
    exported = set().union(*(prometheus_names(i) for i in created_instruments().values()))
    ghosts = {n: sorted(w) for n, w in series_references().items() if n not in exported}
    assert not ghosts, f"series named that no instrument exports: {ghosts}"


def test_the_series_names_derived_here_should_be_the_exporter_s_own():
    derived = set().union(*(prometheus_names(i) for i in created_instruments().values()))
    assert exported_series() <= derived


def test_the_dashboard_and_autoscalers_should_read_series_the_code_exports():
    # the check above would pass vacuously if the readers found nothing: they find these
    names = " ".join(dashboard_exprs()) + " ".join(chart_texts().values())
    exported = set().union(*(prometheus_names(i) for i in created_instruments().values()))
    assert any(n in names for n in exported)
    assert "eftmesh_logit_kv_tokens_used" in chart_texts()["helm/eftmesh/templates/logit-scaledobject.yaml"]


# --- chart values ----------------------------------------------------------------------------------


# `logit.proto`, `tls.crt`: files and Secret keys, not values
_FILE_SUFFIXES = {"py", "md", "json", "yaml", "proto", "crt", "key", "pem", "txt", "gguf", "png", "sh"}


def chart_value_references() -> dict[str, set[str]]:
    """Dotted chart values the docs name in backticks, fully qualified from a top-level key
    of values.yaml (`combiner.connectTimeout`, `logit.deletionCost.intervalSeconds`)."""
    top = set(values())
    out: dict[str, set[str]] = {}
    for path in MARKDOWN:
        for lit in re.findall(r"`([A-Za-z][\w.-]*)(?::[^`]*)?`", path.read_text()):
            parts = lit.split(".")
            if len(parts) >= 2 and parts[0] in top and all(parts) and parts[-1] not in _FILE_SUFFIXES:
                out.setdefault(lit, set()).add(path.name)
    return out


def test_every_chart_value_the_docs_name_should_exist_in_values_and_the_schema():
    refs = chart_value_references()
    assert len(refs) > 10, refs  # the reader finds them
    bad = {v: sorted(w) for v, w in refs.items()
           if not (values_has(v.split(".")) and schema_has(v.split(".")))}
    assert not bad, f"chart values the docs name that values.yaml or values.schema.json lacks: {bad}"


# --- links ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_should_resolve_to_a_file_and_heading(path):
    broken = []
    for line, target in links(path):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, frag = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{path.name}:{line}: {target} (no such file)")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            broken.append(f"{path.name}:{line}: {target} (no such heading in {dest.name})")
    assert not broken, "\n".join(broken)


# --- commands in the README and the docs ------------------------------------------------------------


def doc_commands() -> list[str]:
    """Every `eftmesh ...` (and `make run ARGS="..."`, which is `eftmesh up ...`) command line
    in the shell blocks of the README and the docs (continuations joined, comments dropped),
    as "FILE: LINE"."""
    out = []
    for path in MARKDOWN:
        for block in code_blocks(path):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = re.sub(r"\s+#\s.*$", "", line).strip()
                words = line.split()
                if words and (words[0] == "eftmesh" or words[0].endswith("/eftmesh") or words[:2] == ["make", "run"]):
                    out.append(f"{path.relative_to(ROOT)}: {line}")
    return out


def _argv(command: str) -> list[str]:
    """A command line as the shell would pass it to `eftmesh`, up to a | ; or &, each $VAR /
    ${...} a stand-in value ($'...' quoting read as '...'); `make run ARGS=...` as `up ...`."""
    line = re.sub(r"\$'", "'", command)
    line = re.sub(r"\$\{[^}]*\}|\$[A-Za-z_]\w*", "1", line)
    lex = shlex.shlex(line, posix=True, punctuation_chars="|;&")
    lex.whitespace_split = True
    argv = []
    for word in lex:
        if set(word) <= set("|;&"):
            break
        argv.append(word)
    if argv[:2] == ["make", "run"]:
        return ["up", *(w for a in argv[2:] if a.startswith("ARGS=") for w in shlex.split(a[len("ARGS="):]))]
    return argv[1:]


def test_the_docs_should_show_eftmesh_commands():
    readme = [c for c in doc_commands() if c.startswith("README.md: ")]
    assert len(readme) >= 5, readme  # the reader finds them


@pytest.mark.parametrize("command", doc_commands())
def test_every_eftmesh_command_in_the_readme_and_docs_should_parse(command):
    argv = _argv(command.split(": ", 1)[1])
    sub, rest = argv[0], argv[1:]
    assert sub in subcommands(), f"{command}: no subcommand {sub!r}"
    # spelled out: argparse would take an abbreviation (--temperatur) the docs should not show
    inexact = [a.split("=")[0] for a in rest if a.startswith("--") and a.split("=")[0] not in options(parser(sub))]
    assert not inexact, f"{command}: eftmesh {sub} has no flags {inexact}"
    try:
        parser(sub).parse_args(rest)
    except SystemExit as e:
        pytest.fail(f"{command}: eftmesh {sub} refuses its flags (exit {e.code})")
