"""The embedded default corpus: CPython's documentation topics, on every machine with Python.

`pydoc_data.topics.topics` is the text behind `help("assert")` etc.: a dict of language-reference
chapters. On CPython 3.11.7 it holds 79 topics, about 465 kB of English prose with code examples;
`documents()` keeps the 78 unique ones, cleaned: about 460 kB (~460k byte tokens), no download needed.

>>> docs = documents()
>>> len(docs) > 50 and all(d.strip() for d in docs)
True
>>> docs[0].splitlines()[0]
'The "assert" statement'
"""
import re

# Typographic punctuation -> ASCII, so a byte-level model sees one quote character, not three.
_ASCII = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'",
                        "\u2013": "-", "\u2014": "--", "\u2026": "..."})
# reST heading underlines ("*****", "=====") carry no language and eat a lot of byte tokens.
_UNDERLINE = re.compile(r"^([*=~^+#-])\1{2,}$")


def documents():
    """The cleaned topics, one string per topic, sorted by topic name, duplicates dropped."""
    from pydoc_data.topics import topics

    out, seen = [], set()
    for name in sorted(topics):
        lines = [ln.rstrip() for ln in topics[name].translate(_ASCII).splitlines()]
        doc = "\n".join(ln for ln in lines if not _UNDERLINE.match(ln))
        doc = re.sub(r"\n{3,}", "\n\n", doc).strip() + "\n"
        if doc not in seen:
            seen.add(doc)
            out.append(doc)
    return out


def text():
    """All documents joined by blank lines: one string."""
    return "\n".join(documents())
