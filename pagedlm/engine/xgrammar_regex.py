"""Regexes as xgrammar 0.2.9 enforces them: what it would accept without enforcing, refused, and
the rewrites that make it enforce what a regex or a JSON schema ``pattern`` says.

xgrammar's regex converter drops what it does not know instead of refusing it: an unknown escape
matches its letter (``\\A`` matches "A"), a ``^`` or ``$`` inside the pattern is ignored (``ab$c``
matches "abc"), a lookahead in a JSON schema's ``pattern`` is dropped, ``[\\^a]`` reads as the
negated ``[^a]``, and a surrogate pair escape becomes two 3-byte sequences (CESU-8, no UTF-8). In a
``pattern`` it writes the characters the pattern names into the JSON string raw, so a pattern that
names ``"``, ``\\`` or a control character gave a string that is no JSON. ``check`` parses the
pattern (ECMAScript's syntax, which JSON Schema's patterns use and xgrammar's converter follows)
and returns it rewritten, or raises.
"""

import re
from dataclasses import dataclass, field

# Letters whose escape xgrammar's regex converter knows (others it matches as the letter itself,
# warning only on stderr: "\\A" matches "A"), or refuses itself (b outside a class, c, k, p, u, x, B, P).
_KNOWN_ESCAPES = frozenset("adefnrstvwDSWbckpuxBP")
_CLASS_ESCAPES = frozenset("dwsDWS")
_CHAR_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "f": "\f", "v": "\v", "a": "\a", "e": "\x1b", "0": "\0"}
# JSON's escapes of the characters a JSON string cannot hold raw (RFC 8259, section 7).
_JSON_ESCAPES = {'"': '\\\\"', "\\": "\\\\\\\\", "\b": "\\\\b", "\f": "\\\\f", "\n": "\\\\n", "\r": "\\\\r",
                 "\t": "\\\\t"}


class RegexError(ValueError):
    pass


def _json_special(ch: str) -> bool:
    return ch in '"\\' or ord(ch) < 0x20


def _json_escaped(ch: str) -> str:
    """A regex that matches the JSON text of ``ch`` inside a string, in every spelling JSON allows
    for it (``\\u`` escapes with either case of hex digit)."""
    spelled = f"\\\\u00{ord(ch):02x}"
    any_case = "".join(f"[{c}{c.upper()}]" if c.isalpha() and c != "u" else c for c in spelled)
    short = _JSON_ESCAPES.get(ch)
    return f"(?:{short}|{any_case})" if short else any_case


@dataclass
class _Char:
    """One character: a literal, or an escape that names one (``\\n``, ``\\x41``, ``\\.``)."""
    text: str
    char: str


@dataclass
class _Class:
    """``[...]``: its items (``_Char``, ``(first, last)`` ranges of ``_Char``, and shorthand escapes
    like ``\\d`` as strings), negated or not."""
    negated: bool
    items: list = field(default_factory=list)


@dataclass
class _Group:
    open: str  # "(" or "(?:" (named groups: "(?<name>")
    alternatives: list  # of lists of nodes


@dataclass
class _Node:
    atom: "_Char | _Class | _Group | str"  # str: ".", "^", "$", a shorthand escape like "\\d", flags "(?i)"
    quantifier: str = ""


class _Parser:
    def __init__(self, regex: str) -> None:
        self.s, self.i = regex, 0

    def error(self, what: str) -> RegexError:
        return RegexError(f"{what} (at position {self.i})")

    def peek(self, k: int = 0) -> str:
        return self.s[self.i + k] if self.i + k < len(self.s) else ""

    def alternatives(self) -> list:
        alts = [[]]
        while self.i < len(self.s) and self.peek() != ")":
            if self.peek() == "|":
                self.i += 1
                alts.append([])
                continue
            atom = self.atom()
            alts[-1].append(_Node(atom, self.quantifier()))
        return alts

    def atom(self):
        c = self.peek()
        if c == "(":
            return self.group()
        if c == "[":
            return self.char_class()
        if c in ".^$":
            self.i += 1
            return c
        if c == "\\":
            return self.escape(in_class=False)
        self.i += 1
        return _Char(c, c)

    def group(self):
        start = self.i
        self.i += 1
        if self.s.startswith(("?=", "?!", "?<=", "?<!"), self.i):
            raise self.error("lookaround (?=, ?!, ?<=, ?<!) is not supported: xgrammar cannot enforce it")
        if self.s.startswith("?:", self.i):
            self.i += 2
        elif self.peek() == "?":  # named groups, flags: xgrammar decides (it refuses what it cannot parse)
            flags = re.match(r"\?[a-zA-Z-]+\)", self.s[self.i:])
            if flags:  # (?i): matches nothing itself
                self.i += flags.end()
                return self.s[start:self.i]
            end = self.s.find(">", self.i)
            self.i = end + 1 if self.s.startswith(("?<", "?P<"), self.i) and end > 0 else self.i
        open_text = self.s[start:self.i]
        alts = self.alternatives()
        if self.peek() != ")":
            raise self.error("missing )")
        self.i += 1
        return _Group(open_text, alts)

    def quantifier(self) -> str:
        start = self.i
        c = self.peek()
        if c in "*+?":
            self.i += 1
        elif c == "{":
            end = self.s.find("}", self.i)
            if end < 0:
                return ""
            self.i = end + 1
        else:
            return ""
        if self.peek() in "?+":  # lazy or possessive: xgrammar decides
            self.i += 1
        return self.s[start:self.i]

    def escape(self, in_class: bool):
        start = self.i
        self.i += 1
        c = self.peek()
        if not c:
            raise self.error("a pattern cannot end in a lone backslash")
        self.i += 1
        if c in _CLASS_ESCAPES:
            return self.s[start:self.i]
        if c.isdigit() and c != "0":
            raise self.error(f"backreference \\{c} is not supported: xgrammar cannot enforce it")
        if c in _CHAR_ESCAPES:
            return _Char(self.s[start:self.i], _CHAR_ESCAPES[c])
        if c == "b" and in_class:
            return _Char(self.s[start:self.i], "\b")
        if c in "xu":
            digits = 2 if c == "x" else 4
            hex_text = self.s[self.i:self.i + digits]
            if len(hex_text) == digits and all(h in "0123456789abcdefABCDEF" for h in hex_text):
                self.i += digits
                code = int(hex_text, 16)
                if 0xD800 <= code <= 0xDFFF:
                    raise self.error(f"surrogate escape \\u{hex_text} is not supported (xgrammar writes no UTF-8 for it): "
                                     "write the character itself")
                return _Char(self.s[start:self.i], chr(code))
            return self.s[start:self.i]  # malformed: xgrammar's error
        if c == "c" and self.peek().isalpha():
            self.i += 1
            return _Char(self.s[start:self.i], chr(ord(self.s[self.i - 1].upper()) - 64))
        if c.isascii() and c.isalpha():
            if c not in _KNOWN_ESCAPES:
                raise self.error(f"escape \\{c} is not supported (xgrammar would match the letter itself); supported: "
                                 "\\d \\w \\s \\D \\W \\S, \\b in a character class, \\n \\r \\t \\f \\v \\a \\e, "
                                 "\\xHH \\uHHHH, \\cX and escaped punctuation")
            return self.s[start:self.i]  # \p{...}, \k<...>, \b, \B: xgrammar refuses them itself
        return _Char(self.s[start:self.i], c)

    def char_class(self) -> _Class:
        self.i += 1
        cls = _Class(negated=self.peek() == "^")
        self.i += cls.negated
        while self.peek() != "]":
            if not self.peek():
                raise self.error("missing ]")
            item = self.escape(in_class=True) if self.peek() == "\\" else self.plain_char()
            if isinstance(item, _Char) and self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                last = self.escape(in_class=True) if self.peek() == "\\" else self.plain_char()
                if not isinstance(last, _Char):
                    raise self.error("a range cannot end in a class escape")
                item = (item, last)
            cls.items.append(item)
        self.i += 1
        return cls

    def plain_char(self) -> _Char:
        c = self.s[self.i]
        self.i += 1
        return _Char(c, c)


def _repeats(quantifier: str) -> bool:
    """Whether the quantifier lets its atom match more than once."""
    q = quantifier.rstrip("?+") if len(quantifier) > 1 else quantifier
    if q in ("", "?"):
        return False
    if q.startswith("{"):
        most = q[1:-1].split(",")[-1].strip()
        return most not in ("0", "1")
    return True


def _is_flags(atom: object) -> bool:
    return isinstance(atom, str) and atom.startswith("(?")


def _check_anchors(alternatives: list, at_start: bool, at_end: bool) -> None:
    """Refuse a ``^`` that may follow a consumed character or a ``$`` that may precede one: xgrammar
    matches the whole text and drops anchors, so only those at its edges mean what they say."""
    for alt in alternatives:
        for k, node in enumerate(alt):
            before_empty = all(n.atom == "^" or _is_flags(n.atom) for n in alt[:k])
            after_empty = all(n.atom == "$" or _is_flags(n.atom) for n in alt[k + 1:])
            if node.atom == "^" and not (at_start and before_empty) or node.atom == "$" and not (at_end and after_empty):
                raise RegexError(f"the anchor {node.atom} inside the pattern is not supported: xgrammar matches the "
                                 "whole text and ignores it (anchors may only begin or end the pattern)")
            if isinstance(node.atom, _Group):
                once = not _repeats(node.quantifier)
                _check_anchors(node.atom.alternatives, at_start and before_empty and once, at_end and after_empty and once)


def _emit_char(ch: _Char, json_string: bool) -> str:
    return _json_escaped(ch.char) if json_string and _json_special(ch.char) else ch.text


def _class_text(ch: _Char) -> str:
    """A character as a class member; a ``^`` never as a class's first member (xgrammar reads
    ``[\\^a]`` as ``[^a]``, and ``[\\x5ea]`` as nothing)."""
    return ch.text if ch.char != "^" else "\\^"


def _emit_class(cls: _Class, json_string: bool) -> str:
    members: list[str] = []
    escapes: list[str] = []
    for item in cls.items:
        if isinstance(item, str):
            members.append(item)
        elif isinstance(item, tuple):
            first, last = item
            lo, hi = ord(first.char), ord(last.char)
            if not json_string or cls.negated or not any(_json_special(chr(c)) for c in range(lo, min(hi, 0x5C) + 1)):
                members.append(f"{_class_text(first)}-{last.text}")
                continue
            run: list[int] = []  # the range split around the characters JSON escapes
            for code in [*range(lo, min(hi, 0x5C) + 1), None]:
                if code is not None and not _json_special(chr(code)):
                    run.append(code)
                    continue
                if run:
                    members.append(f"\\u{run[0]:04x}-\\u{run[-1]:04x}" if len(run) > 1 else f"\\u{run[0]:04x}")
                    run = []
                if code is not None:
                    escapes.append(_json_escaped(chr(code)))
            if hi > 0x5C:
                members.append(f"\\u005d-{last.text}")
        elif json_string and not cls.negated and _json_special(item.char):
            escapes.append(_json_escaped(item.char))
        else:
            members.append(_class_text(item))
    if len(members) > 1 and members[0] == "\\^":
        members.append(members.pop(0))
    if not escapes:
        if members == ["\\^"] and not cls.negated:
            return "\\^"
        return f"[{'^' if cls.negated else ''}{''.join(members)}]"
    branches = ([f"[{''.join(members)}]"] if members else []) + escapes
    return f"(?:{'|'.join(branches)})"


def _emit(alternatives: list, json_string: bool) -> str:
    out = []
    for alt in alternatives:
        parts = []
        for node in alt:
            atom = node.atom
            if isinstance(atom, _Group):
                text = atom.open + _emit(atom.alternatives, json_string) + ")"
            elif isinstance(atom, _Class):
                text = _emit_class(atom, json_string)
            elif isinstance(atom, _Char):
                text = _emit_char(atom, json_string)
                if node.quantifier and len(text) > 1 and not text.startswith("(?:") and text != atom.text:
                    text = f"(?:{text})"
            else:
                text = atom
            parts.append(text + node.quantifier)
        out.append("".join(parts))
    return "|".join(out)


def check(regex: str, json_string: bool = False) -> str:
    """``regex`` as xgrammar enforces it exactly, or a ``RegexError`` (a ``ValueError``) saying what
    it would not enforce. With ``json_string`` (a JSON schema's ``pattern``, over the string's
    value) the result matches the string's JSON text: a character JSON escapes (``"``, ``\\``,
    control characters) is matched as its escape sequences. Classes that are not spelled out
    (``.``, ``\\S``, ``[^a]``) stay xgrammar's, which never write those characters."""
    parser = _Parser(regex)
    alternatives = parser.alternatives()
    if parser.i < len(regex):
        raise parser.error("unbalanced )")
    _check_anchors(alternatives, True, True)
    return _emit(alternatives, json_string)
