"""Named compositions: `--composition NAME=SPEC`, one table for both APIs.

A request may pick its composition by name: gRPC's `Composition.name`, the HTTP API's `model`.
The names are

- each `--composition NAME=SPEC` the combiner was started with,
- `default`: the combiner's default composition (--default-base, --default-delta),
- each role alone (plain decoding of that model), e.g. `base-large`.

SPEC grammar (spaces anywhere between the parts are allowed):

    spec   := BASE delta*
    delta  := ('+' | '-') [WEIGHT '*'] '(' TUNED '-' REFERENCE ')'

WEIGHT is a decimal number (1 when left out; a leading '-' negates it). Role names may contain
'-': inside the parentheses write `TUNED - REFERENCE` with spaces, or without spaces when only
one split names two of the combiner's roles. Examples:

    helpful=base-large+1.0*(ft-small-base-small)           EFT up-scaling
    amplified=ft-small + 1.5*(base-large - base-small)     the paper's amplified scale delta
    mix=base-small+0.7*(ft-small-base-small)+0.3*(ft-small-alt-base-small)
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping

from eftmesh.common.errors import NotFound, quote
from eftmesh.core.mixing import Composition, Delta

DEFAULT_NAME = "default"
# What a name may look like: it travels as an HTTP model id and in metric attributes.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?"
_DELTA = rf"([+-])\s*(?:({_NUMBER})\s*\*\s*)?\(([^()]*)\)"
_SPEC = re.compile(rf"\s*([^()*+\s]+)\s*((?:{_DELTA}\s*)*)")


def _split_pair(inside: str, roles: Collection[str]) -> tuple[str, str]:
    """'TUNED - REFERENCE' (spaced) or 'TUNED-REFERENCE' split where both sides are roles."""
    spaced = [p.strip() for p in re.split(r"\s+-\s+", inside.strip())]
    if len(spaced) == 2 and all(spaced):
        return spaced[0], spaced[1]
    text = inside.strip()
    splits = [(text[:i], text[i + 1:]) for i, ch in enumerate(text) if ch == "-"
              and text[:i] in roles and text[i + 1:] in roles]
    if len(splits) != 1:
        raise ValueError(f"cannot tell the tuned role from the reference in ({inside}): "
                         f"write (TUNED - REFERENCE) with spaces, each one of {', '.join(sorted(roles))}")
    return splits[0]


def parse_spec(spec: str, roles: Collection[str]) -> Composition:
    """The composition SPEC describes; ValueError naming what is wrong."""
    m = _SPEC.fullmatch(spec)
    if m is None:
        raise ValueError(f"{spec!r} is not BASE[+WEIGHT*(TUNED-REFERENCE)...], "
                         "e.g. base-large+1.0*(ft-small-base-small)")
    base, deltas = m.group(1), []
    for sign, weight, inside in re.findall(_DELTA, m.group(2)):
        w = float(weight) if weight else 1.0
        if not math.isfinite(w):
            raise ValueError(f"weight {weight!r} in {spec!r} is not finite")
        tuned, ref = _split_pair(inside, roles)
        deltas.append(Delta(tuned, ref, -w if sign == "-" else w))
    comp = Composition(base, tuple(deltas))
    unknown = [r for r in comp.roles if r not in roles]
    if unknown:
        raise ValueError(f"{spec!r} names role(s) with no --upstream: {', '.join(unknown)}")
    return comp


def parse_named(text: str, roles: Collection[str]) -> tuple[str, Composition]:
    """`NAME=SPEC` from the command line; ValueError naming what is wrong."""
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep:
        raise ValueError(f"expected NAME=SPEC, got {text!r}")
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"composition name {name!r}: letters, digits, '.', '_', ':', '-', at most 64, "
                         "starting with a letter or digit")
    if name == DEFAULT_NAME:
        raise ValueError(f"{DEFAULT_NAME!r} names the default composition (--default-base, --default-delta)")
    if name in roles:
        raise ValueError(f"composition name {name!r} is a role's name: a role alone is already a model")
    return name, parse_spec(spec, roles)


def check(name: str, named: Collection[str], roles: Collection[str]) -> None:
    """NotFound, listing the names this combiner knows, unless `name` is one of them."""
    if name != DEFAULT_NAME and name not in named and name not in roles:
        raise NotFound(f"unknown composition or model {quote(name)}; this combiner serves "
                       f"{', '.join(model_names(named, roles))}")


def resolve(name: str, default: Composition, named: Mapping[str, Composition], roles: Collection[str]) -> Composition:
    """The composition a request names; NotFound listing the names this combiner knows."""
    check(name, named, roles)
    if name == DEFAULT_NAME:
        return default
    return named[name] if name in named else Composition(name)


def model_names(named: Collection[str], roles: Collection[str]) -> list[str]:
    """Every name a request may use: `default`, the named compositions, then each role."""
    return [DEFAULT_NAME, *named, *sorted(roles)]

