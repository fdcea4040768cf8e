#!/usr/bin/env python3
"""The defaults docs/ and README.md name are the code's (`make docs-test`).

Two sources of truth in the code:
- every command-line flag with a default (`#[arg(long, env = "WIPROXY_…", default_value… = V)]` on
  a field): a docs table row whose first cell is the flag or its variable must show V as its
  default, and a "`--flag` (V…)" mention must carry V;
- the named constants below (ports, limits, timeouts, caps): each sentence of the docs that states
  one, found by its pattern, must give the constant's value, and each pattern must still find at
  least one sentence (a reworded doc fails here until its pattern follows).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

CRATES = {"common": "common/src", "sidecar": "sidecar/src", "webhook": "webhook/src"}
UNITS = {"": 1, "KiB": 1024, "MiB": 1024 * 1024, "s": 1}

# (crate, constant, unit the docs use, patterns whose group 1 is the value in that unit)
CONSTANTS: list[tuple[str, str, str, list[str]]] = [
    ("common", "DEFAULT_PORT", "", [
        r"`wiproxy\.io/port` \| `(\d+)`",
        r"http://127\.0\.0\.1:(\d+)/orders",
        r"The sidecar's ports \((\d+) and admin \d+\)",
        r"the proxy port \((\d+)\b",
    ]),
    ("common", "ADMIN_PORT", "", [
        r"`wiproxy\.io/admin-port` \| `(\d+)`",
        r"the admin port \((\d+)\b",
        r"admin port \(`wiproxy-admin`, (\d+) by default\)",
        r"port (\d+) or `wiproxy\.io/admin-port`",
        r"each sidecar on `:(\d+)/metrics`",
        r"The sidecar's ports \(\d+ and admin (\d+)\)",
        r"port-forward pod/POD (\d+)",
    ]),
    ("common", "MAX_UPSTREAMS", "", [r"more than (\d+) upstreams", r"A pod has at most (\d+)"]),
    ("webhook", "MAX_UPSTREAMS_LEN", "KiB", [r"comma-separated\. At most (\d+) KiB"]),
    ("webhook", "MAX_ADDED_VARIABLES", "", [r"At most (\d+) variables in all"]),
    ("webhook", "MAX_DEPTH", "", [r"nested more than (\d+) levels"]),
    ("webhook", "MAX_BODY_BYTES", "MiB", [r"at most (\d+) MiB \(413"]),
    ("webhook", "REVIEW_BUDGET_BYTES", "MiB", [r"at most (\d+) MiB of bodies between them"]),
    ("webhook", "FEDERATION_TOKEN_SECONDS", "", [r"`expirationSeconds: (\d+)`"]),
    ("webhook", "ADMIN_CONNECTIONS", "", [r"\| connections at once \| [^|\n]*\| (\d+) \|"]),
    ("webhook", "ADMIN_TIMEOUT", "s", [r"\| TLS handshake and request headers \| [^|\n]*\| (\d+) s \|"]),
    ("sidecar", "REPLAYABLE_BODY", "MiB", [r"\(up to (\d+) MiB\)", r"retried once \(for bodies up to (\d+) MiB\)"]),
    ("sidecar", "FORCED_REFETCH_INTERVAL", "s", [r"at most once per audience every (\d+) s"]),
]


def rust_sources(crate: str) -> str:
    return "\n".join(p.read_text() for p in sorted(Path(CRATES[crate]).rglob("*.rs")))


def constant_value(source: str, name: str, crate: str) -> int:
    """Evaluates `const NAME: T = EXPR;` where EXPR is integer arithmetic, a Duration from
    seconds or milliseconds, or another such constant."""
    match = re.search(rf"\bconst {name}: [^=]+= ([^;]+);", source)
    if not match:
        raise LookupError(f"constant {name} is not in {CRATES[crate]}: update tests/check_docs_defaults.py")
    expression = match.group(1)
    expression = re.sub(r"Duration::from_secs\((\d+)\)", r"\1", expression)
    expression = re.sub(r"Duration::from_millis\((\d+)\)", r"(\1 / 1000)", expression)
    for other in set(re.findall(r"\b[A-Z][A-Z0-9_]+\b", expression)):
        expression = re.sub(rf"\b{other}\b", str(constant_value(source, other, crate)), expression)
    expression = expression.replace("_", "")
    if not re.fullmatch(r"[\d\s*+/()-]+", expression):
        raise ValueError(f"constant {name} = {match.group(1)}: not plain arithmetic")
    return int(eval(expression))  # digits and operators only, checked above


def flag_defaults() -> dict[str, str]:
    """`--flag` and `WIPROXY_…` -> default text, for every clap argument with a default."""
    defaults: dict[str, str] = {}
    for crate in CRATES:
        source = rust_sources(crate)
        for match in re.finditer(r"#\[arg\(([^\]]*)\)\]\s*(?:///[^\n]*\n\s*)*pub (\w+):", source):
            attributes, field = match.groups()
            value = re.search(r'default_value(?:_t)? = ("[^"]*"|[\w:]+(?:\(\))?)', attributes)
            if not value or "hide_default_value" in attributes:
                continue
            text = value.group(1)
            constant = text.rsplit("::", 1)[-1]
            if text.startswith('"'):
                text = text[1:-1]
            elif re.fullmatch(r"[A-Z][A-Z0-9_]*", constant):
                # A named constant of the same crate: a string's literal, or a number's value.
                literal = re.search(rf'\bconst {constant}: &(?:\'static )?str = "([^"]*)";', source)
                text = literal.group(1) if literal else str(constant_value(source, constant, crate))
            elif "::" in text:
                if text.endswith(")"):
                    continue
                # A clap ValueEnum variant: its kebab-case name.
                text = re.sub(r"(?<!^)(?=[A-Z])", "-", text.rsplit("::", 1)[1]).lower()
            flag = "--" + field.replace("_", "-")
            env = re.search(r'env = "([A-Z0-9_]+)"', attributes)
            for key in (flag, env.group(1) if env else None):
                if key is None:
                    continue
                if key in defaults and defaults[key] != text:
                    # The same flag on two commands with different defaults: no single truth.
                    defaults[key] = ""
                else:
                    defaults.setdefault(key, text)
    return {k: v for k, v in defaults.items() if v != ""}


def doc_files() -> list[Path]:
    return sorted(Path("docs").glob("*.md")) + [Path("README.md")]


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def main() -> int:
    errors: list[str] = []
    docs = {path: path.read_text() for path in doc_files()}
    checked = 0

    defaults = flag_defaults()
    for path, text in docs.items():
        for match in re.finditer(r"^\| `([-A-Z0-9_a-z]+)` \| `([^`]*)` \|", text, re.M):
            key, shown = match.groups()
            if key in defaults:
                checked += 1
                if shown != defaults[key]:
                    errors.append(f"{path}:{line_of(text, match.start())}: {key} defaults to "
                                  f"{defaults[key]!r} in the code, the docs say {shown!r}")
        for match in re.finditer(r"`(--[a-z-]+)` \((\d+)(?: s)?\)", text):
            key, shown = match.groups()
            if key in defaults:
                checked += 1
                if shown != defaults[key]:
                    errors.append(f"{path}:{line_of(text, match.start())}: {key} defaults to "
                                  f"{defaults[key]} in the code, the docs say {shown}")

    for crate, name, unit, patterns in CONSTANTS:
        try:
            value = constant_value(rust_sources(crate), name, crate)
        except (LookupError, ValueError) as error:
            errors.append(str(error))
            continue
        for pattern in patterns:
            found = 0
            for path, text in docs.items():
                for match in re.finditer(pattern, text):
                    found += 1
                    checked += 1
                    shown = int(match.group(1)) * UNITS[unit]
                    if shown != value:
                        errors.append(f"{path}:{line_of(text, match.start())}: {name} is {value // UNITS[unit]}"
                                      f"{' ' + unit if unit else ''} in {CRATES[crate]}, the docs say "
                                      f"{match.group(0)!r}")
            if not found:
                errors.append(f"no sentence of docs/ or README.md matches {pattern!r} ({name}): the docs were "
                              "reworded, so the pattern in tests/check_docs_defaults.py follows them")

    for error in errors:
        print(error)
    if errors:
        print(f"docs versus code: {len(errors)} stale or unchecked defaults")
        return 1
    print(f"docs versus code: {checked} stated defaults match the code "
          f"({len(defaults)} flag defaults, {len(CONSTANTS)} constants)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
