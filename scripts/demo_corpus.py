"""Text that every Debian + Python machine carries, split into domains for the demo models.

Three domains, chosen so that experts have something to specialise on:

- ``python``: the Python standard library's own source files (code);
- ``licenses``: licence and copyright texts under ``/usr/share/common-licenses`` and
  ``/usr/share/doc/*/copyright`` (legal prose);
- ``docs``: the Python reference documentation that ships inside ``pydoc_data.topics`` (technical prose).

Every domain is split by document into train / calibration / held-out parts with a fixed seed, so
the committed calibration and held-out samples never overlap the training documents.

    python scripts/demo_corpus.py --out /tmp/corpus   # writes <domain>.{train,calib,heldout}.txt
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("python", "licenses", "docs")
DOC_SEPARATOR = "\n\n"


@dataclass
class DomainSplit:
    """Documents of one domain, split three ways."""

    train: list[str]
    calib: list[str]
    heldout: list[str]


def _read(path: Path, max_chars: int) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    text = text.strip()
    if len(text) < 400:
        return None
    return text[:max_chars]


def _python_documents() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__")
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        if any(part in skip for part in path.relative_to(stdlib).parts):
            continue
        text = _read(path, 12_000)
        if text is not None:
            docs.append(text)
    return docs


def _license_documents() -> list[str]:
    paths = sorted(Path("/usr/share/common-licenses").glob("*")) + sorted(Path("/usr/share/doc").glob("*/copyright"))
    seen: set[str] = set()
    docs = []
    for path in paths:
        if not path.is_file():
            continue
        text = _read(path, 15_000)
        if text is None:
            continue
        digest = hashlib.sha1(text.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            docs.append(text)
    return docs


def _docs_documents() -> list[str]:
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        # Long topics are split at blank-line runs so the split has more than a handful of units.
        chunk: list[str] = []
        for paragraph in topics[name].split("\n\n"):
            chunk.append(paragraph)
            if sum(len(p) for p in chunk) > 3_000:
                docs.append("\n\n".join(chunk).strip())
                chunk = []
        if chunk and sum(len(p) for p in chunk) > 400:
            docs.append("\n\n".join(chunk).strip())
    return docs


def collect(seed: int = 0, calib_chars: int = 80_000, heldout_chars: int = 40_000) -> dict[str, DomainSplit]:
    """Collect and split every domain. Calibration and held-out parts are capped in characters."""
    sources = {"python": _python_documents, "licenses": _license_documents, "docs": _docs_documents}
    splits = {}
    for name in DOMAINS:
        docs = sources[name]()
        if len(docs) < 20:
            raise RuntimeError(f"domain {name!r} has only {len(docs)} documents on this machine")
        random.Random(f"{seed}-{name}").shuffle(docs)
        heldout, rest = _take_chars(docs, heldout_chars)
        calib, train = _take_chars(rest, calib_chars)
        splits[name] = DomainSplit(train=train, calib=calib, heldout=heldout)
    return splits


def _take_chars(docs: list[str], max_chars: int) -> tuple[list[str], list[str]]:
    """Take whole documents from the front until ``max_chars`` (the last one truncated)."""
    taken, total = [], 0
    for i, doc in enumerate(docs):
        if total >= max_chars:
            return taken, docs[i:]
        piece = doc[: max_chars - total]
        taken.append(piece)
        total += len(piece)
    return taken, []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, split in collect(args.seed).items():
        for part in ("train", "calib", "heldout"):
            docs = getattr(split, part)
            (args.out / f"{name}.{part}.txt").write_text(DOC_SEPARATOR.join(docs), encoding="utf-8")
            print(f"{name:9s} {part:8s} {len(docs):5d} docs {sum(map(len, docs)):>10,d} chars")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
