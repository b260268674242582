"""GitHub: permissive licenses, RedPajama-v1 file heuristics, license header strip, exact dedup."""

import pytest

from llamaray.data.clean import ExactFileDeduplicator, clean_document
from llamaray.data.clean.github import (
    alpha_token_ratio_rule,
    alphanum_fraction_rule,
    clean,
    quality_rule,
    spdx_permissive,
    strip_license_header,
)
from llamaray.data.records import Document, Rejected

CODE = "def add(first, second):\n    return first + second\n"
MIT_HEADER = (
    "# Copyright (c) 2020 Someone\n"
    "#\n"
    "# Permission is hereby granted, free of charge, to any person obtaining a copy\n"
)


def gh(text: str = CODE, license: object = "mit", origin: str = "gh.jsonl:1") -> Document:
    meta = {} if license is None else {"license": license}
    return Document(text, "github", origin, meta)


def reason(out: Document | Rejected) -> str | None:
    return out.reason if isinstance(out, Rejected) else None


# --- license -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "spdx"),
    [
        ("mit", "MIT"),
        ("MIT License", "MIT"),
        ("The MIT License (MIT)", "MIT"),
        ("Apache-2.0", "Apache-2.0"),
        ("apache 2", "Apache-2.0"),
        ("Apache License, Version 2.0", "Apache-2.0"),
        ("bsd-2-clause", "BSD-2-Clause"),
        ('BSD 2-Clause "Simplified" License', "BSD-2-Clause"),
        ("BSD-3-Clause", "BSD-3-Clause"),
        ('BSD 3-Clause "New" or "Revised" License', "BSD-3-Clause"),
        ("bsd3", "BSD-3-Clause"),
        ("MIT OR Apache-2.0", "MIT OR Apache-2.0"),
        ("GPL-3.0", None),
        ("LGPL-2.1", None),
        ("Apache-1.1", None),
        ("Apache", None),  # no version: could be 1.0/1.1
        ("BSD", None),  # no clause count: could be the 4-clause license
        ("MIT OR GPL-3.0", None),
        ("", None),
    ],
)
def test_spdx_permissive(name, spdx):
    assert spdx_permissive(name) == spdx


@pytest.mark.parametrize("license", ["MIT", "Apache-2.0", ["mit", "bsd-3-clause"]])
def test_permissive_licenses_are_kept(license):
    assert reason(clean(gh(license=license))) is None


@pytest.mark.parametrize("license", [None, "", "gpl-2.0", ["mit", "gpl-2.0"], [], 42])
def test_other_or_missing_licenses_are_rejected(license):
    out = clean_document(gh(license=license, origin="gh.jsonl:9"))
    assert isinstance(out, Rejected)
    assert (out.reason, out.origin, out.source) == ("github_license", "gh.jsonl:9", "github")


# --- header strip --------------------------------------------------------------------------------


def test_hash_license_header_is_stripped_and_shebang_kept():
    text = "#!/usr/bin/env python\n" + MIT_HEADER + "\n# Helpers.\n" + CODE
    assert strip_license_header(text) == "#!/usr/bin/env python\n# Helpers.\n" + CODE


def test_license_block_after_a_coding_line_is_stripped():
    text = "# -*- coding: utf-8 -*-\n\n" + MIT_HEADER + "\n" + CODE
    assert strip_license_header(text) == "# -*- coding: utf-8 -*-\n\n" + CODE


def test_slash_slash_and_block_comment_headers_are_stripped():
    go = "// Copyright 2019 The Authors. All rights reserved.\n// Use is governed by a BSD.\n\n"
    go += "// Package add adds.\npackage add\n"
    assert strip_license_header(go) == "// Package add adds.\npackage add\n"
    c = "/*\n * Licensed under the Apache License, Version 2.0.\n */\n#include <stdio.h>\nint x;\n"
    assert strip_license_header(c) == "#include <stdio.h>\nint x;\n"


def test_docstring_license_header_is_stripped():
    text = '"""\nCopyright 2021 ACME.\nLicensed under the MIT license.\n"""\n' + CODE
    assert strip_license_header(text) == CODE
    one_line = '"""All rights reserved."""\nimport os\n'
    assert strip_license_header(one_line) == "import os\n"


def test_other_comments_and_later_license_mentions_are_kept():
    assert strip_license_header("# Adds numbers.\n" + CODE) == "# Adds numbers.\n" + CODE
    later = CODE + "# Copyright notice down here stays.\n"
    assert strip_license_header(later) == later
    inline = "/* Copyright 2020 */ int x = 1;\n"  # code on the comment's last line
    assert strip_license_header(inline) == inline
    directive = "#include <license.h>\nint x;\n"  # a preprocessor line, not a comment
    assert strip_license_header(directive) == directive


def test_strip_is_idempotent_and_clean_returns_the_stripped_file():
    text = MIT_HEADER + "\n" + CODE
    once = strip_license_header(text)
    assert once == CODE
    assert strip_license_header(once) == once
    out = clean(gh(text))
    assert isinstance(out, Document)
    assert (out.text, out.meta) == (CODE, {"license": "mit"})


# --- file quality --------------------------------------------------------------------------------


def test_good_file_passes_every_heuristic():
    assert quality_rule(CODE) is None


def test_max_line_length_1000():
    assert quality_rule(CODE + "s = '" + "a" * 994 + "'\n" + CODE * 10) is None  # 1000 chars
    long_line = CODE + "s = '" + "a" * 995 + "'\n" + CODE * 10  # 1001 chars
    assert quality_rule(long_line) == "github_max_line_length"
    assert reason(clean(gh(long_line))) == "github_max_line_length"


def test_mean_line_length_100():
    line = "value = first + second + " + "first + " * 9  # 97 characters
    assert quality_rule(f"{line}abc\n" * 5) is None  # mean 100
    assert quality_rule(f"{line}abcd\n" * 5) == "github_mean_line_length"


def test_alphanumeric_fraction_at_least_0_25():
    assert alphanum_fraction_rule("a---") is None  # 0.25
    assert alphanum_fraction_rule("a----") == "github_alphanum_fraction"  # 0.2
    ascii_art = CODE + ("# " + "-=" * 20 + "\n") * 5
    assert quality_rule(ascii_art) == "github_alphanum_fraction"
    assert reason(clean(gh(ascii_art))) == "github_alphanum_fraction"


def test_alphabetic_characters_per_token_at_least_1_5():
    assert alpha_token_ratio_rule("abc .") is None  # 3 letters, 2 tokens
    assert alpha_token_ratio_rule("ab .") == "github_alpha_token_ratio"  # 2 letters, 2 tokens
    hex_table = "data = [\n" + ",\n".join(["0x1f, 0x2e, 0x3d"] * 20) + "]\n"
    assert quality_rule(hex_table) == "github_alpha_token_ratio"
    assert reason(clean(gh(hex_table))) == "github_alpha_token_ratio"
    names = "names = [\n" + ",\n".join(["alpha, beta, gamma"] * 20) + "]\n"
    assert quality_rule(names) is None


# --- exact dedup ---------------------------------------------------------------------------------


def test_exact_file_dedup_ignores_the_license_header():
    dedup = ExactFileDeduplicator()
    first = gh(MIT_HEADER + CODE, origin="gh:1")
    same_but_other_copyright = gh("# Copyright 2023 Other Person\n" + CODE, origin="gh:2")
    different = gh(CODE + "\nprint(add(1, 2))\n", origin="gh:3")
    rej = Rejected("gh:0", "malformed_json")
    out = list(dedup.process([rej, first, same_but_other_copyright, different, first]))
    assert out[0] is rej
    assert out[1] is first
    assert isinstance(out[2], Rejected)
    assert (out[2].reason, out[2].origin) == ("github_exact_duplicate", "gh:2")
    assert out[3] is different
    assert reason(out[4]) == "github_exact_duplicate"
    assert len(dedup.seen) == 2


def test_extra_licenses_are_accepted_as_spelled_and_meta_is_kept_true():
    from llamaray.data.clean import clean_document
    from llamaray.data.records import Document

    text = (
        "def greeting_for(person_name):\n"
        '    """Return a friendly greeting that mentions the person by their name."""\n'
        '    return "Hello there, " + person_name + ", welcome to the project"\n'
    )
    doc = Document(text, "github", "stdlib.jsonl:1", {"license": "PSF-2.0"})
    assert clean_document(Document(text, "github", "x:1", {"license": "MIT"})).text == text
    rejected = clean_document(doc)
    assert getattr(rejected, "reason", None) == "github_license"  # the paper's rule by default
    kept = clean_document(doc, {"github": {"extra_licenses": ["PSF-2.0"]}})
    assert isinstance(kept, Document) and kept.meta == {"license": "PSF-2.0"}
    # Only the exact spelling listed, and only for the source it is given to.
    assert getattr(clean_document(doc, {"github": {"extra_licenses": ["psf"]}}), "reason", "")
    assert getattr(clean_document(doc, {"c4": {}}), "reason", None) == "github_license"
