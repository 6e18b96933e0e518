"""The Unicode side of the poisoning scan (`registry.scan`): characters a person cannot see, and
letters of one script passing for another's.

A client shows a person a tool's name and perhaps the first line of its description, and the
model all of it: text hidden in Unicode tag characters, zero-width or blank look-alikes, or a word
spelled with Cyrillic letters that pass for Latin ones reads one way to the person and another to
the model (or to a name check). `invisible(text)` and `confusable(text, is_key)` return one
message per cue; `quote` and `describe` spell a character or a string out for such messages.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any

from confusable_homoglyphs import categories, confusables

# --- invisible characters ----------------------------------------------------------------------

TAGS = range(0xE0000, 0xE0080)
TAG_RUN = re.compile("[\U000E0000-\U000E007F]+")
# Invisible, yet not format characters: fillers and blanks that render as nothing.
BLANK_LOOKALIKES = {0x034F, 0x115F, 0x1160, 0x3164, 0xFFA0, 0x2800, 0x2028, 0x2029}
VARIATION_SELECTORS = {*range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0), *range(0x180B, 0x1810)}
_JOINERS = {0x200C, 0x200D}


def invisible(text: str) -> list[str]:
    messages = []
    hidden_runs = [(match.start(), match.group(0)) for match in TAG_RUN.finditer(text)]
    odd: dict[str, int] = {}
    for i, ch in enumerate(text):
        if ord(ch) not in TAGS and _is_invisible(text, i):
            odd[ch] = odd.get(ch, 0) + 1
    for start, tag_run in hidden_runs:
        if _is_flag_emoji(text, start, tag_run):
            continue
        spelled = "".join(chr(ord(ch) - 0xE0000) for ch in tag_run if 0x20 <= ord(ch) - 0xE0000 < 0x7F)
        messages.append(f"hides the text {quote(spelled)} in {len(tag_run)} Unicode tag characters")
    if odd:
        count = sum(odd.values())
        listed = ", ".join(describe(ch) for ch in odd)
        messages.append(f"contains {count} invisible character{'s' if count != 1 else ''}: {listed}")
    return messages


def _is_invisible(text: str, i: int) -> bool:
    ch = text[i]
    cp, category = ord(ch), unicodedata.category(ch)
    before = text[i - 1] if i > 0 else ""
    after = text[i + 1] if i + 1 < len(text) else ""
    if category == "Cc":
        return not (ch in "\n\t" or (ch == "\r" and after == "\n"))
    if cp in _JOINERS and _joins_letters_of_a_joining_script(before, after):
        return False  # ZWNJ/ZWJ are spelling in Persian, Arabic and Indic scripts
    if cp == 0x200D and _is_symbol(before) and _is_symbol(after):
        return False  # emoji sequences such as family emoji
    if cp in (0xFE0E, 0xFE0F) and before and (_is_symbol(before) or before in "0123456789#*"):
        return False  # one text/emoji presentation selector after a symbol
    return category == "Cf" or cp in BLANK_LOOKALIKES or cp in VARIATION_SELECTORS


def _joins_letters_of_a_joining_script(before: str, after: str) -> bool:
    def joining_letter(ch: str) -> bool:
        if not ch or unicodedata.category(ch)[0] not in "LM":
            return False
        return categories.alias(ch) not in ("LATIN", "GREEK", "CYRILLIC", "COMMON")

    return joining_letter(before) and joining_letter(after)


def _is_symbol(ch: str) -> bool:
    return bool(ch) and unicodedata.category(ch) in ("So", "Sk")


def _is_flag_emoji(text: str, start: int, tag_run: str) -> bool:
    """🏴 followed by tag letters and CANCEL TAG spells a subdivision flag (England, Scotland, Wales)."""
    letters = tag_run[:-1]
    return (
        start > 0
        and text[start - 1] == "\U0001F3F4"
        and tag_run.endswith("\U000E007F")
        and 2 <= len(letters) <= 6
        and all(0xE0030 <= ord(ch) <= 0xE0039 or 0xE0061 <= ord(ch) <= 0xE007A for ch in letters)
    )


# --- confusable characters ---------------------------------------------------------------------

WORD = re.compile(r"[^\s!-/:-@\[-`{-~]+")
_IGNORED_SCRIPTS = {"COMMON", "INHERITED"}
# Scripts written together as a matter of course (Japanese mixes all three, Korean adds Han).
_CJK = {"HAN", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO"}


def _dominant_script(text: str, is_key: bool) -> str:
    """The script most letters of the string are in: the one look-alikes imitate. A key is one
    word, so it has none of its own; identifiers are Latin."""
    counts = Counter(categories.alias(ch) for ch in text if ch.isalpha())
    for script in _IGNORED_SCRIPTS:
        counts.pop(script, None)
    return counts.most_common(1)[0][0] if counts and not is_key else "LATIN"


def confusable(text: str, is_key: bool) -> list[str]:
    dominant = _dominant_script(text, is_key)
    messages = []
    for word in dict.fromkeys(WORD.findall(text)):
        scripts = Counter(categories.alias(ch) for ch in word if ch.isalpha())
        for script in _IGNORED_SCRIPTS:
            scripts.pop(script, None)
        if len(scripts) > 1 and not set(scripts) <= _CJK:
            base = dominant if dominant in scripts else scripts.most_common(1)[0][0]
            found = confusables.is_confusable(word, greedy=True, preferred_aliases=[base])
            if found:
                lookalikes = ", ".join(_lookalike(entry, base) for entry in found)
                what = "the key" if is_key else "the word"
                messages.append(f"{what} {quote(word)} mixes {base.title()} with look-alike letters: {lookalikes}")
        elif len(scripts) == 1 and dominant == "LATIN" and (script := next(iter(scripts))) != "LATIN":
            if _spells_latin(word, script):
                written = f"is written in {script.title()} letters that all look like Latin ones"
                messages.append(f"the word {quote(word)} {written}")
    return messages


def _spells_latin(word: str, script: str) -> bool:
    """A whole word of another script made of letters that each pass for an ASCII letter."""
    letters = [ch for ch in word if ch.isalpha()]
    if len(letters) < 3 or script in _CJK:
        return False
    found = confusables.is_confusable(word, greedy=True, preferred_aliases=["latin"]) or []
    passing = {
        entry["character"]
        for entry in found
        if any(len(glyph["c"]) == 1 and glyph["c"].isascii() and glyph["c"].isalpha() for glyph in entry["homoglyphs"])
    }
    return all(ch in passing for ch in letters)


def _lookalike(entry: dict[str, Any], base: str) -> str:
    ch = entry["character"]
    like = next((g["c"] for g in entry["homoglyphs"] if all(categories.alias(c) == base for c in g["c"])), None)
    return f"{describe(ch)}" + (f" (looks like {like!r})" if like else "")


def describe(ch: str) -> str:
    return f"U+{ord(ch):04X} {unicodedata.name(ch, 'unnamed')}"


_UNPRINTABLE = ("Cc", "Cf", "Co", "Cn", "Zl", "Zp")


def quote(text: str, limit: int = 80) -> str:
    """`text` shortened and with every invisible or control character spelled out."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    out = []
    for ch in text:
        cp = ord(ch)
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\\":
            out.append("\\\\")
        elif unicodedata.category(ch) in _UNPRINTABLE or cp in BLANK_LOOKALIKES or cp in VARIATION_SELECTORS:
            out.append(f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}")
        else:
            out.append(ch)
    body = "".join(out)
    if "'" in body and '"' not in body:
        return f'"{body}"'
    return "'" + body.replace("'", "\\'") + "'"
