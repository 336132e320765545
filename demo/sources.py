"""Real text found on this machine, one collector per domain.

- ``code``: Python standard-library sources (no tests, no site-packages).
- ``legal``: ``/usr/share/common-licenses/*`` and ``/usr/share/doc/*/copyright``.
- ``docs``: the pydoc topics shipped with Python (``pydoc_data.topics``), then
  man pages if any are installed (optional; their troff is stripped to prose).

Out-of-domain text, which no expert trains on and no domain collects, is the
report's test of text from none of the domains: the packages' changelogs
(``/usr/share/doc/*/changelog*.gz``), then, where a system ships none, the
package descriptions of the Python installation (``*.dist-info/METADATA``).

Each collector lists candidates in a seeded order and reads them lazily, so a
cap of a few hundred documents never reads all 20k man pages. Texts are
normalized and cut before deduplication, so no two kept documents are equal.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import random
import re
import sysconfig
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from gatemix.demo.config import DemoConfig

logger = logging.getLogger(__name__)

Document = tuple[str, str]  # (doc_id, text)
Candidate = tuple[str, Callable[[], str]]  # (doc_id, read the raw text)

MAN_PAGES_PER_FAMILY = 5
_SKIPPED_CODE_DIRS = {"test", "tests", "site-packages", "dist-packages", "__pycache__",
                      "idle_test"}


def collect_domain(domain: str, config: DemoConfig) -> list[Document]:
    """Up to ``max_docs_per_domain`` distinct documents of one domain (may be empty)."""
    documents = iter_documents(
        COLLECTORS[domain](config),
        max_docs=config.max_docs_per_domain,
        max_chars=config.max_chars_per_doc,
        min_chars=config.min_chars_per_doc,
    )
    return list(tqdm(documents, desc=f"collect {domain}", unit="doc",
                     total=config.max_docs_per_domain, disable=not config.progress))


def iter_documents(candidates: Iterable[Candidate], *, max_docs: int, max_chars: int,
                   min_chars: int) -> Iterator[Document]:
    """Read candidates in order, yielding normalized, distinct, long-enough texts."""
    kept = 0
    seen_hashes: set[str] = set()
    for doc_id, read in candidates:
        try:
            text = normalize_text(read(), max_chars)
        except (OSError, UnicodeDecodeError, EOFError, zlib.error) as error:
            logger.debug("skipping %s: %s", doc_id, error)
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()
        if len(text) < min_chars or digest in seen_hashes:
            continue
        seen_hashes.add(digest)
        yield doc_id, text
        kept += 1
        if kept >= max_docs:
            return


def normalize_text(text: str, max_chars: int) -> str:
    """Unix newlines, no NULs, no edge blank lines, cut at a line break under ``max_chars``."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = text.strip("\n")
    if len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars)
        text = text[: cut if cut > 0 else max_chars]
    return text.rstrip()


def _read_utf8(path: Path) -> str:
    return path.read_bytes().decode("utf-8")


def _shuffled(items: list, seed: int, domain: str) -> list:
    """A seeded order that does not depend on directory listing order."""
    items = sorted(items)
    random.Random(f"{seed}/{domain}").shuffle(items)
    return items


def _file_candidates(paths: list[Path]) -> list[Candidate]:
    return [(str(path), lambda path=path: _read_utf8(path)) for path in paths]


def stdlib_sources(stdlib_dir: Path) -> list[Path]:
    """Every ``*.py`` under the stdlib, pruning test suites and installed packages."""
    found: list[Path] = []
    for folder, subfolders, files in os.walk(stdlib_dir):
        subfolders[:] = [name for name in subfolders if name not in _SKIPPED_CODE_DIRS]
        found.extend(Path(folder) / name for name in files if name.endswith(".py"))
    return found


def collect_code(config: DemoConfig) -> list[Candidate]:
    stdlib_dir = Path(config.stdlib_dir or sysconfig.get_paths()["stdlib"])
    paths = stdlib_sources(stdlib_dir) if stdlib_dir.is_dir() else []
    return _file_candidates(_shuffled(paths, config.seed, "code"))


def collect_legal(config: DemoConfig) -> list[Candidate]:
    paths: list[Path] = []
    licenses_dir, docs_dir = Path(config.licenses_dir), Path(config.package_docs_dir)
    if licenses_dir.is_dir():
        paths.extend(path for path in licenses_dir.iterdir() if path.is_file())
    if docs_dir.is_dir():
        paths.extend(path for path in docs_dir.glob("*/copyright") if path.is_file())
    return _file_candidates(_shuffled(paths, config.seed, "legal"))


def collect_docs(config: DemoConfig) -> list[Candidate]:
    """All pydoc topics first (they are few and always there), then man pages."""
    from pydoc_data.topics import topics  # a large dict; imported only when collecting

    topic_candidates: list[Candidate] = [
        (f"pydoc_data:{name}", lambda name=name: topics[name])
        for name in _shuffled(list(topics), config.seed, "docs")
    ]
    man_pages = cap_man_families(_shuffled(find_man_pages(config.man_dir), config.seed, "docs"))
    man_candidates: list[Candidate] = [
        (str(path), lambda path=path: strip_troff(_read_man_page(path))) for path in man_pages
    ]
    return topic_candidates + man_candidates


def find_man_pages(man_dir: str) -> list[Path]:
    """English man pages ``man1..man9/*.gz``; none if the folder is missing or empty."""
    if not man_dir or not Path(man_dir).is_dir():
        return []
    return [path for path in Path(man_dir).glob("man[1-9]/*.gz") if path.is_file()]


def cap_man_families(paths: list[Path], per_family: int = MAN_PAGES_PER_FAMILY) -> list[Path]:
    """Keep the first few pages of each ``family_subcommand`` family, in order.

    Some packages install thousands of near-identical pages (gcloud has ~16k);
    without a cap they would be most of the docs domain.
    """
    kept: list[Path] = []
    per_family_count: dict[str, int] = {}
    for path in paths:
        family = path.name.split("_")[0].split(".")[0]
        per_family_count[family] = per_family_count.get(family, 0) + 1
        if per_family_count[family] <= per_family:
            kept.append(path)
    return kept


def _read_man_page(path: Path) -> str:
    with gzip.open(path, "rb") as handle:
        return handle.read().decode("utf-8")


_TROFF_GLYPHS = {"aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'",
                 "em": "--", "en": "-", "hy": "-", "bu": "*", "co": "(c)", "rg": "(R)",
                 "mu": "x", "->": "->", "<-": "<-", "ga": "`", "ti": "~", "ha": "^"}
_TROFF_INLINE = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # string registers
    (re.compile(r"\\s[+-]?\d+"), ""),  # size changes
    (re.compile(r"\\[&%c|^,/]"), ""),  # zero-width, hyphenation and italic marks
]
_PARAGRAPH_MACROS = {"PP", "P", "LP", "TP", "br", "sp", "Pp", "IP"}
_TEXT_MACROS = {"SH", "SS", "B", "I", "SM", "SB", "Nm", "Nd", "Sh", "Ss"}
_ALTERNATING_MACROS = {"BR", "RB", "BI", "IB", "IR", "RI"}


def strip_troff(source: str) -> str:
    """Man-page troff -> readable prose: comments and layout requests dropped,
    font and glyph escapes resolved. Good enough for training text, not a renderer."""
    lines: list[str] = []
    for line in source.splitlines():
        if line.startswith((".\\\"", "'\\\"", '.\\"')) or line.strip() in {".", "'"}:
            continue
        if line.startswith((".", "'")):
            name, _, args = line[1:].strip().partition(" ")
            args = args.replace('"', "").strip()
            if name in _PARAGRAPH_MACROS:
                lines.append("")
                if name == "IP" and args:
                    lines.append(args.split(" ")[0])
            elif name in _TEXT_MACROS and args:
                lines.append(args)
            elif name in _ALTERNATING_MACROS and args:
                lines.append("".join(args.split()))
            continue
        lines.append(line)
    text = _resolve_escapes("\n".join(lines))
    return re.sub(r"\n{3,}", "\n\n", text)


def _resolve_escapes(text: str) -> str:
    text = re.sub(r"\\\((..)", lambda m: _TROFF_GLYPHS.get(m.group(1), ""), text)
    text = re.sub(r"\\\[(\w+)\]", lambda m: _TROFF_GLYPHS.get(m.group(1), ""), text)
    for pattern, replacement in _TROFF_INLINE:
        text = pattern.sub(replacement, text)
    return text.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\~", " ")


def _read_gzip_text(path: Path) -> str:
    with gzip.open(path, "rb") as handle:
        return handle.read().decode("utf-8")


def collect_out_of_domain(config: DemoConfig) -> list[Document]:
    """Up to ``ood_max_docs`` distinct documents of no domain: changelogs, then package metadata."""
    if config.ood_max_docs == 0:
        return []
    docs_dir = Path(config.ood_docs_dir)
    changelogs = ([path for path in docs_dir.glob("*/changelog*.gz") if path.is_file()]
                  if config.ood_docs_dir and docs_dir.is_dir() else [])
    site_packages = Path(sysconfig.get_paths()["purelib"])
    metadata = [path for path in site_packages.glob("*.dist-info/METADATA") if path.is_file()]
    candidates: list[Candidate] = [
        (str(path), lambda path=path: _read_gzip_text(path))
        for path in _shuffled(changelogs, config.seed, "out_of_domain")
    ] + _file_candidates(_shuffled(metadata, config.seed, "out_of_domain/metadata"))
    documents = iter_documents(candidates, max_docs=config.ood_max_docs,
                               max_chars=config.max_chars_per_doc,
                               min_chars=config.min_chars_per_doc)
    return list(tqdm(documents, desc="collect out-of-domain text", unit="doc",
                     total=config.ood_max_docs, disable=not config.progress))


COLLECTORS: dict[str, Callable[[DemoConfig], list[Candidate]]] = {
    "code": collect_code,
    "legal": collect_legal,
    "docs": collect_docs,
}
