import re

from pydoc_data.topics import topics

from fusegrad.data import corpus

WORDS = re.compile(r"[A-Za-z0-9_]+")


def test_documents_are_the_pydoc_topics_cleaned():
    """Cleaning drops heading underlines and maps punctuation: each document keeps its topic's words."""
    docs = corpus.documents()
    topic_words = {tuple(WORDS.findall(t)) for t in topics.values()}
    assert len(docs) == len(set(topics.values())) > 50  # one per distinct topic text
    assert sum(map(len, docs)) > 200_000
    for doc in docs:
        assert tuple(WORDS.findall(doc)) in topic_words
        assert not any(re.fullmatch(r"([*=~^+#-])\1{2,}", ln) for ln in doc.splitlines())
        assert not re.search("[\u201c\u201d\u2018\u2019\u2013\u2014]", doc)  # typographic punctuation made ASCII
        assert "\n\n\n" not in doc and doc.endswith("\n")
    assert corpus.text() == "\n".join(docs)
