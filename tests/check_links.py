"""Every relative link in the repository's Markdown files must resolve inside the repository:
the file exists, lies under the repository root, is tracked or about to be (not ignored), and a
`#fragment` names a heading of the Markdown file it points at. Absolute file paths and file://
links are refused: a reader of the repository does not have them.

usage: check_links.py   (from anywhere; checks the files git lists, tracked or not yet added)
"""
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
HTML = re.compile(r"<(?:a|img)\s[^>]*(?:href|src)=\"([^\"]+)\"", re.I)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE = re.compile(r"`[^`\n]*`")


def markdown_files():
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()
    return [ROOT / name for name in listed if (ROOT / name).exists()]


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"`|\*\*|__", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    found, counts = set(), {}
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        base = slug(match.group(1))
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    found.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return found


def links(path):
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = CODE.sub("", text)
    for pattern in (INLINE, REFERENCE, HTML):
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield line, match.group(1)


def check(path):
    problems = []
    for line, target in links(path):
        where = f"{path.relative_to(ROOT)}:{line}: {target}"
        if re.match(r"^(https?|mailto):", target):
            continue
        if target.startswith("file:") or target.startswith("/"):
            problems.append(f"{where}: an absolute path, which readers of the repository do not have")
            continue
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            problems.append(f"{where}: an unknown scheme")
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if resolved != ROOT and ROOT not in resolved.parents:
            problems.append(f"{where}: points outside the repository")
            continue
        if not resolved.exists():
            problems.append(f"{where}: no such file in the repository")
            continue
        ignored = subprocess.run(["git", "check-ignore", "-q", str(resolved)], cwd=ROOT).returncode == 0
        if ignored:
            problems.append(f"{where}: points at an ignored file (not in the repository)")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            problems.append(f"{where}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    return problems


def main():
    files = markdown_files()
    problems, count = [], 0
    for path in files:
        count += sum(1 for _ in links(path))
        problems += check(path)
    if problems:
        print("broken or outside links:\n  " + "\n  ".join(problems))
        sys.exit(1)
    print(f"check-links: {count} links in {len(files)} Markdown files, every relative one inside the repository")


if __name__ == "__main__":
    main()
