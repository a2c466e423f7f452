"""Write the docs' benchmark figures from the result files under benchmarks/results/.

Every figure that README.md and docs/ quote from a benchmark sits in a region between two marker
comments, ``<!-- publish:NAME -->`` and ``<!-- /publish:NAME -->``; the prose around the regions
is written by hand. The function registered as ``NAME`` in ``doc_tables.py`` renders the region
from the newest result file(s) of its benchmark (``result_files.py`` finds them), and every region
ends with the files it read (path, commit, tree state, device, time, command), so no figure is
published without a file behind it.

    python benchmarks/publish.py           rewrite every region in place
    python benchmarks/publish.py --check   exit 1 naming each doc and region that differs

A table for a new benchmark is one function in ``doc_tables.py``: ``@region("name")``, read files
with ``results.newest(...)`` (or ``results.runs(...)``), return the markdown; then put the two
markers where the table belongs. ``tests/test_publish.py`` fails while a committed doc differs from what
this script writes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from doc_tables import REGIONS  # noqa: E402
from result_files import PublishError, ResultFile, Results  # noqa: E402,F401  (PublishError: for callers)

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/*.md", "benchmarks/README.md")  # globs under the repository root
# A marker is a line of its own (a mention inside prose or backticks is not one).
MARKERS = re.compile(r"^<!-- publish:(?P<name>[\w-]+) -->\n(?P<body>.*?)^<!-- /publish:(?P=name) -->$", re.S | re.M)
OPENING = re.compile(r"^<!-- (/?)publish:([\w-]+) -->$", re.M)


def sources_line(files: list[ResultFile]) -> str:
    lines = ["Written by `benchmarks/publish.py` from:", ""]
    for f in files:
        d = f.data
        tree = {True: "dirty tree", False: "clean tree"}.get(d.get("dirty"), "tree state unknown")
        commit = (d.get("git_commit") or "no commit")[:7]
        lines.append(f"- `{f.path}` (commit {commit}, {tree}, {d.get('device')}, {d.get('when', '')[:16]} UTC): "
                     f"`{d.get('command')}`")
    return "\n".join(lines)


def render_region(name: str, results: Results) -> str:
    """The region's text between its markers: the rendered figures, then the files they came from."""
    if name not in REGIONS:
        raise PublishError(f"no renderer for region '{name}' in benchmarks/doc_tables.py")
    results.read = []
    try:
        body = REGIONS[name](results).strip("\n")
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:  # a file's fields unlike the renderer's
        files = ", ".join(str(f.path) for f in results.read) or "no file yet"
        raise PublishError(f"its renderer does not fit the file ({type(e).__name__}: {e}; read: {files})") from None
    if not results.read:
        raise PublishError(f"region '{name}' read no result file: a figure needs a file behind it")
    return f"{body}\n\n{sources_line(results.read)}\n"


def render_doc(text: str, doc: str, results: Results) -> tuple[str, list[str]]:
    """``text`` with every region rewritten, and the names of the regions whose text changed."""
    _check_markers(text, doc)
    changed = []

    def rewrite(match: re.Match) -> str:
        name = match["name"]
        try:
            body = render_region(name, results)
        except PublishError as e:
            raise PublishError(f"{doc}: region '{name}': {e}") from None
        if body != match["body"]:
            changed.append(name)
        return f"<!-- publish:{name} -->\n{body}<!-- /publish:{name} -->"

    return MARKERS.sub(rewrite, text), changed


def _check_markers(text: str, doc: str) -> None:
    """Every opening marker has its closing one before the next opens, and no region is in the doc twice."""
    open_name, seen = None, set()
    for m in OPENING.finditer(text):
        where = f"{doc}:{text.count(chr(10), 0, m.start()) + 1}"
        closing, name = m.group(1) == "/", m.group(2)
        if closing and name != open_name:
            raise PublishError(f"{where}: {m.group(0)} closes no open region")
        if not closing and open_name is not None:
            raise PublishError(f"{where}: region '{open_name}' is not closed (<!-- /publish:{open_name} -->) "
                               f"before {m.group(0)}")
        if not closing and name in seen:
            raise PublishError(f"{where}: region '{name}' is in this doc twice")
        open_name = None if closing else name
        seen.add(name)
    if open_name is not None:
        raise PublishError(f"{doc}: region '{open_name}' is not closed with <!-- /publish:{open_name} -->")


def doc_paths(repo: Path = REPO) -> list[Path]:
    return sorted({p for pattern in DOCS for p in repo.glob(pattern)})


def publish(repo: Path = REPO, results: Results | None = None, write: bool = False) -> list[str]:
    """Render every doc's regions; write them when ``write``. Returns the problems, one line each
    (a region that differs from what is committed, a missing file, a broken marker, a renderer
    whose region is in no doc). Nothing is written while any region cannot be rendered."""
    results = results or Results.load(repo / "benchmarks" / "results")
    problems, rewritten, used, failed = [], {}, set(), False
    for path in doc_paths(repo):
        doc = str(path.relative_to(repo))
        text = path.read_text()
        used |= {m["name"] for m in MARKERS.finditer(text)}
        try:
            new, changed = render_doc(text, doc, results)
        except PublishError as e:
            problems.append(str(e))
            failed = True
            continue
        problems += [f"{doc}: region '{name}' differs from what benchmarks/publish.py writes" for name in changed]
        if new != text:
            rewritten[path] = new
    problems += [f"region '{name}' has a renderer in benchmarks/doc_tables.py but is in no doc "
                 f"({', '.join(DOCS)})" for name in sorted(set(REGIONS) - used)]
    if write and not failed:
        for path, new in rewritten.items():
            path.write_text(new)
    return problems


# -- the command line ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when a doc differs")
    args = ap.parse_args(argv)
    try:
        results = Results.load(REPO / "benchmarks" / "results")
        problems = publish(REPO, results, write=not args.check)
    except PublishError as e:
        problems, results = [str(e)], None
    for name in results.unpublished() if results else []:  # a new benchmark's table may be due
        print(f"publish: note: no region reads {name}.json", file=sys.stderr)
    if not args.check:
        problems = [p for p in problems if "differs" not in p]  # just rewritten
    for p in problems:
        print(f"publish: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
