"""Wikipedia dump text to plain prose: the articles of a dump file, and wiki markup reduced to
paragraphs (what the ``enwiki-2016`` asset is prepared from)."""

from __future__ import annotations

import html
import os
import re
from collections.abc import Iterator


# Sections from which everything to the end of the article is apparatus, not prose.
_REFERENCE_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "works cited",
}
_DROPPED_LINKS = {"file", "image", "category", "media"}
_INTERWIKI = {"wikt", "wiktionary", "s", "wikisource", "q", "wikiquote", "w", "wp", "wikipedia",
              "commons", "species", "b", "n", "v"}
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_REF = re.compile(r"<ref(?:\s[^>]*?)?/>|<ref(?:\s[^>]*)?>.*?</ref\s*>", re.S | re.I)
_DROPPED_TAGS = re.compile(
    r"<(math|gallery|source|syntaxhighlight|timeline|imagemap|score|chem|ce)\b[^>]*>.*?</\1\s*>",
    re.S | re.I,
)
_LINK = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", re.S)
_EXTERNAL = re.compile(r"\[(?:[a-z]+:)?//[^\s\]]*\s*([^\]]*)\]", re.I)
_TAG = re.compile(r"</?[a-z][a-z0-9]*\b[^>]*>", re.I)
_MARK = "\x00"  # heading lines become MARK level MARK text until paragraphs are assembled


def iter_wiki_articles(path: os.PathLike, min_chars: int = 500) -> Iterator[tuple[str, str]]:
    """Yield ``(title, plain text)`` of a MediaWiki XML dump's articles, in dump order.

    Only main-namespace pages that are not redirects, with at least ``min_chars`` of text
    once cleaned by :func:`wiki_to_text`, are kept. ``path`` may be ``.bz2`` compressed.
    """
    import bz2
    import xml.etree.ElementTree as ET

    opener = bz2.open if os.fspath(path).endswith(".bz2") else open
    with opener(path, "rb") as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.rpartition("}")[2] != "page":
                continue
            fields = {child.tag.rpartition("}")[2]: child for child in elem}
            revision = fields.get("revision")
            raw = revision.findtext("{*}text") if revision is not None else None
            if fields.get("ns") is not None and fields["ns"].text == "0" and "redirect" not in fields and raw:
                text = wiki_to_text(raw)
                if len(text) >= min_chars:
                    yield fields["title"].text or "", text
            elem.clear()


def wiki_to_text(wikitext: str) -> str:
    """Strip MediaWiki markup to plain text, paragraphs separated by blank lines.

    Drops templates, tables, references, comments, maths, file/category links and every
    section from the first reference-type heading ("References", "See also", …) on. Link
    labels and external-link labels are kept. A section heading stays as a paragraph of
    its own unless nothing is left in its section.
    """
    text = _COMMENT.sub("", wikitext)
    for m in _HEADING.finditer(text):
        if m.group(2).strip("' ").lower() in _REFERENCE_SECTIONS:
            text = text[: m.start()]
            break
    text = _DROPPED_TAGS.sub("", _REF.sub("", text))
    text = _drop_nested(_drop_nested(text, "{{", "}}"), "{|", "|}")
    while True:  # innermost links first, so links inside file captions go with them
        text, n = _LINK.subn(_link_text, text)
        if not n:
            break
    text = _EXTERNAL.sub(r"\1", text)
    text = re.sub(r"<br\s*/?>", "\n", text, flags=re.I)
    text = _TAG.sub("", text)
    text = re.sub(r"'{2,}|__[A-Z]+__", "", text)
    text = _HEADING.sub(lambda m: f"\n\n{_MARK}{len(m.group(1))}{_MARK}{m.group(2)}\n\n", text)
    text = html.unescape(text)
    return _paragraphs(text)


def _drop_nested(text: str, opener: str, closer: str) -> str:
    """Remove balanced ``opener … closer`` spans, nesting included."""
    kept, depth, last = [], 0, 0
    for m in re.finditer(f"{re.escape(opener)}|{re.escape(closer)}", text):
        if m.group() == opener:
            if depth == 0:
                kept.append(text[last:m.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                last = m.end()
    if depth == 0:
        kept.append(text[last:])
    return "".join(kept)


def _link_text(m: re.Match) -> str:
    target, pipe, label = m.group(1).partition("|")
    prefix, colon, rest = target.lstrip(":").partition(":")
    prefix = prefix.strip().lower()
    if colon and (prefix in _DROPPED_LINKS and not target.startswith(":")
                  or re.fullmatch(r"[a-z]{2,3}(-[a-z]+)*", prefix) and prefix not in _INTERWIKI
                  and not pipe):
        return ""  # an image, a category or an interlanguage link: not text
    if label:
        return label
    if colon and prefix in _INTERWIKI:
        return rest
    return re.sub(r"\s*\(.*\)$", "", target.lstrip(":")) if pipe else target.lstrip(":")


def _paragraphs(text: str) -> str:
    blocks = []
    for block in re.split(r"\n\s*\n", text):
        lines = []
        for line in block.split("\n"):
            line = re.sub(r"^[*#:;]+", "", line)  # list and indent markers
            line = re.sub(r"\(\s*[,;:]?\s*\)", "", line)  # emptied by dropped templates
            line = re.sub(r"\(\s*[,;:]\s*", "(", re.sub(r"\s*[,;:]\s*\)", ")", line))
            line = re.sub(r"[ \t\xa0\u200b]+", " ", line).strip()
            line = re.sub(r" ([,.;:!?)\]])", r"\1", line)
            line = re.sub(r"([(\[]) ", r"\1", line)
            if line.startswith(("|", "!")) or line == "----":
                continue  # debris of a malformed table
            if re.search(r"\w", line.rpartition(_MARK)[2]):
                lines.append(line)
        if lines:
            blocks.append("\n".join(lines))
    paragraphs = []
    for i, block in enumerate(blocks):
        if block.startswith(_MARK):
            level = int(block.split(_MARK)[1])
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            if nxt is None or nxt.startswith(_MARK) and int(nxt.split(_MARK)[1]) <= level:
                continue  # a heading with nothing left under it
            block = block.split(_MARK, 2)[2]
        paragraphs.append(block)
    return "\n\n".join(paragraphs)


__all__ = ["iter_wiki_articles", "wiki_to_text"]
