"""Source selection: which records of a source the paper keeps at all, before any cleaning.

- Wikipedia: "Wikipedia dumps from the June-August 2022 period, covering 20 languages, which
  use either the Latin or Cyrillic scripts" (Touvron et al. 2023, section 2.1);
  `config.WIKIPEDIA_LANGUAGES`. A record's language is its meta "language" (RedPajama-v1's
  wikipedia records carry it), else the subdomain of its meta "url" (`fr.wikipedia.org`).
- Stack Exchange: "We kept the data from the 28 largest websites" (section 2.1);
  `config.STACKEXCHANGE_SITES`. A record's site is its meta "site", else the host of its
  meta "url" (RedPajama-v1's stackexchange records carry the question's url).

A record outside the lists is rejected "wikipedia_language" / "stackexchange_site"; one that
names no language or site at all is rejected "wikipedia_no_language" / "stackexchange_no_site"
(it cannot be shown to be in the selection). An empty list selects every record. Pure
Python: it runs the same in a test and in a Ray task (`select_block`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from urllib.parse import urlsplit

from llamaray.data.records import Document, Rejected

REASONS: dict[str, str] = {
    "wikipedia_language": "the article's language is not one of corpus.wikipedia_languages",
    "wikipedia_no_language": "the record has neither meta language nor a wikipedia.org url",
    "stackexchange_site": "the post's site is not one of corpus.stackexchange_sites",
    "stackexchange_no_site": "the record has neither meta site nor url",
}


def _host(meta: Mapping) -> str:
    url = meta.get("url")
    if not isinstance(url, str) or not url:
        return ""
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:  # a malformed url names no host
        return ""


def wikipedia_language(meta: Mapping) -> str:
    """The article's language code, "" when the record does not say."""
    language = meta.get("language")
    if isinstance(language, str) and language.strip():
        return language.strip().lower()
    host = _host(meta)
    if host.endswith(".wikipedia.org"):
        sub = host.removesuffix(".wikipedia.org").removeprefix("www.")
        return sub.split(".")[0] if sub else ""
    return ""


def stackexchange_site(meta: Mapping) -> str:
    """The post's site (host name, e.g. "math.stackexchange.com"), "" when unknown."""
    site = meta.get("site")
    if isinstance(site, str) and site.strip():
        site = site.strip().lower()
        return site.removeprefix("https://").removeprefix("http://").split("/")[0]
    return _host(meta).removeprefix("www.")


def select_document(
    doc: Document, *, wikipedia_languages: Collection[str], stackexchange_sites: Collection[str]
) -> Document | Rejected:
    """`doc` if its source's selection keeps it (see the module doc), else why not."""
    if doc.source == "wikipedia" and wikipedia_languages:
        language = wikipedia_language(doc.meta)
        if not language:
            return Rejected.of(doc, "wikipedia_no_language")
        if language not in wikipedia_languages:
            return Rejected.of(doc, "wikipedia_language")
    elif doc.source == "stackexchange" and stackexchange_sites:
        site = stackexchange_site(doc.meta)
        if not site:
            return Rejected.of(doc, "stackexchange_no_site")
        if site not in stackexchange_sites:
            return Rejected.of(doc, "stackexchange_site")
    return doc
