#!/usr/bin/env python3
"""Fails on a module cycle in any crate of the workspace (`make boundaries`).

Modules are the files under each crate's src/ (`a.rs` or `a/mod.rs` is `a`, `a/b.rs` is `a::b`)
and every inline `mod name { ... }` inside them. A module depends on another when its code names
it: `crate::a::b` paths (in `use` trees too, `use crate::{a, b::{c}}`), `super::` and `self::`
paths, and a child module named bare (`child::Item`). What a module takes from its own ancestors (the
crate root, a folder's mod.rs, through `super::` or `crate::`) is not an edge: a folder's mod.rs
holds what the files below it share, and a test module uses the module it tests.
Each binary (src/main.rs, src/bin/NAME.rs) is its own crate over the modules it declares.

A strongly connected group of two or more modules is a cycle: it is printed with one loop through
it, and the check fails, unless the group is in KNOWN_CYCLES. A known cycle that no longer exists
fails too, so the list only ever shrinks.
"""

from __future__ import annotations

import re
import sys
from collections import deque
from pathlib import Path

CRATES = ["common", "sidecar", "webhook", "tests"]

# Cycles that exist today and are to be removed, each as (crate root, set of modules).
KNOWN_CYCLES: list[tuple[str, frozenset[str]]] = [
    # The JSON-patch helper `inject::add` and the mesh detection sit in each other's rooms; the
    # split of inject.rs into a folder moves `add` below both and removes this entry.
    ("webhook/src/lib.rs", frozenset({"inject", "mesh", "listen_ports"})),
]

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_comments_and_strings(text: str) -> str:
    """Blanks out comments, string and char literals, keeping braces and line structure."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            out.append(" ")
        elif (m := re.match(r'b?r(#*)"', text[i:])) and (i == 0 or not re.match(r"\w", text[i - 1])):
            end = text.find('"' + m.group(1), i + m.end())
            i = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and (m := re.match(r"'(\\.[^']*|[^\\'])'", text[i:])):
            i += m.end()
            out.append("' '")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def expand_use_tree(tree: str) -> list[str]:
    """`a::{b, c::{d, self}}` -> ["a::b", "a::c::d", "a::c"]."""
    tree = re.sub(r"\s+", "", tree)
    brace = tree.find("{")
    if brace < 0:
        path = re.sub(r"\bas\w+$", "", tree)
        return [path[: -len("::self")] if path.endswith("::self") else path]
    prefix, body = tree[:brace], tree[brace + 1 : tree.rfind("}")]
    parts, depth, start = [], 0, 0
    for i, c in enumerate(body):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    paths = []
    for part in filter(None, parts):
        for sub in expand_use_tree(part):
            paths.append(prefix.rstrip(":") if sub == "self" else prefix + sub)
    return paths


def parent(module: str) -> str:
    return module.rsplit("::", 1)[0] if "::" in module else ""


def is_ancestor(ancestor: str, module: str) -> bool:
    """True for the module itself, its parent, the parent's parent... up to the crate root."""
    return ancestor == module or ancestor == "" or module.startswith(ancestor + "::")


class Crate:
    def __init__(self, root: Path):
        self.root = root
        self.modules: dict[str, str] = {}  # module path ("" is the crate root) -> stripped source
        self.edges: dict[str, set[str]] = {}
        self.load("", root)

    def load(self, module: str, path: Path) -> None:
        text = strip_comments_and_strings(path.read_text())
        self.split_inline(module, text, path)

    def split_inline(self, module: str, text: str, path: Path) -> None:
        """Records `module` with its own text, and its children: inline or in files."""
        own: list[str] = []
        i = 0
        for m in re.finditer(rf"\bmod\s+({IDENT})\s*([;{{])", text):
            if m.start() < i:
                continue
            own.append(text[i : m.start()])
            child = f"{module}::{m.group(1)}" if module else m.group(1)
            if m.group(2) == ";":
                self.load(child, self.child_file(module, m.group(1), path))
                i = m.end()
            else:
                depth, j = 1, m.end()
                while j < len(text) and depth:
                    depth += {"{": 1, "}": -1}.get(text[j], 0)
                    j += 1
                self.split_inline(child, text[m.end() : j - 1], path)
                i = j
        own.append(text[i:])
        self.modules[module] = "".join(own)

    def child_file(self, module: str, name: str, path: Path) -> Path:
        directory = path.parent if path.name in ("lib.rs", "main.rs", "mod.rs") else path.with_suffix("")
        if path.parent.name == "bin" and path.name not in ("lib.rs", "main.rs", "mod.rs"):
            directory = path.parent / path.stem
        for candidate in (directory / f"{name}.rs", directory / name / "mod.rs"):
            if candidate.exists():
                return candidate
        raise SystemExit(f"{path}: mod {name}; has no file {directory / name}.rs")

    def resolve(self, segments: list[str]) -> str | None:
        """The deepest known module a path from the crate root names."""
        found = None
        for k in range(len(segments) + 1):
            name = "::".join(segments[:k])
            if name in self.modules:
                found = name
            else:
                break
        return found

    def build(self) -> None:
        for module, text in self.modules.items():
            here = module.split("::") if module else []
            children = {m.rsplit("::", 1)[-1] for m in self.modules if m and parent(m) == module}
            paths: list[list[str]] = []
            for use in re.finditer(r"\buse\s+([^;]+);", text):
                paths.extend(p.split("::") for p in expand_use_tree(use.group(1)))
            for m in re.finditer(rf"(?<![\w:])((?:crate|super|self|{IDENT})(?:::(?:{IDENT}|\*))+)", text):
                paths.append(m.group(1).split("::"))
            targets = set()
            for segments in paths:
                first = segments[0]
                if first == "crate":
                    target = self.resolve(segments[1:])
                elif first in ("super", "self"):
                    base = list(here)
                    while segments and segments[0] in ("super", "self"):
                        if segments.pop(0) == "super":
                            base = base[:-1]
                    target = self.resolve(base + segments)
                elif first in children:
                    target = self.resolve(here + segments)
                else:
                    target = None
                if target is not None and not is_ancestor(target, module):
                    targets.add(target)
            self.edges[module] = targets


def cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected groups of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(frozenset(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def one_loop(edges: dict[str, set[str]], group: frozenset[str]) -> list[str]:
    """A shortest loop through the group's first module, staying inside the group."""
    start = min(group)
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(edges[v] & group):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return list(reversed(path)) + [start]
            if w not in previous:
                previous[w] = v
                queue.append(w)
    return [start]


def name(module: str) -> str:
    return module or "crate"


def main(repository: Path) -> int:
    roots: list[Path] = []
    for crate in CRATES:
        src = repository / crate / "src"
        roots += [p for p in (src / "lib.rs", src / "main.rs") if p.exists()]
        roots += sorted((src / "bin").glob("*.rs")) if (src / "bin").is_dir() else []
    known = {(root, group) for root, group in KNOWN_CYCLES}
    seen: set[tuple[str, frozenset[str]]] = set()
    # Known cycles inside a larger new one: that one fails already, and names them.
    swallowed: set[tuple[str, frozenset[str]]] = set()
    failed = False
    modules = 0
    for root in roots:
        crate = Crate(root)
        crate.build()
        modules += len(crate.modules)
        label = str(root.relative_to(repository))
        for group in cycles(crate.edges):
            loop = " -> ".join(name(m) for m in one_loop(crate.edges, group))
            if (label, group) in known:
                seen.add((label, group))
                print(f"{label}: known cycle, to be removed: {loop}")
            else:
                failed = True
                swallowed |= {(root, old) for root, old in known if root == label and old < group}
                print(f"{label}: module cycle: {loop}  (modules {', '.join(sorted(name(m) for m in group))})")
    for label, group in sorted(known - seen - swallowed, key=str):
        failed = True
        print(f"{label}: the known cycle of {', '.join(sorted(group))} no longer exists: "
              "delete it from KNOWN_CYCLES in tests/check_module_cycles.py")
    if failed:
        print("module cycles: a shared constant, enum or helper moves down to where both sides can use it")
        return 1
    print(f"no module cycle: {len(roots)} crate roots, {modules} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
