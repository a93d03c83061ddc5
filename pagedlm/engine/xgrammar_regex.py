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

import json
import re
from dataclasses import dataclass, field

# Letters whose escape xgrammar's regex converter knows (others it matches as the letter itself,
# warning only on stderr: "\\A" matches "A"): c, u and x are decoded here, b outside a class, k, p,
# B and P it refuses itself.
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
    text: str = ""  # as written
    rewritten: bool = False  # an escape in it is written otherwise (\\xHH as \\u00HH, ...)


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
            end = self.s.find("}", self.i, self.i + 32)  # {n,m}: short; a literal "{" is not searched past
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
        if c == "0" and self.peek().isdigit():
            raise self.error("octal escape \\0 followed by a digit is not supported: write \\xHH")
        if c in _CHAR_ESCAPES:
            return _Char(self.s[start:self.i], _CHAR_ESCAPES[c])
        if c == "b" and in_class:
            return _Char(self.s[start:self.i], "\b")
        if c in "xu":
            found = re.match(r"\{([0-9a-fA-F]{1,6})\}" if c == "u" and self.peek() == "{" else
                             "[0-9a-fA-F]{%d}" % (2 if c == "x" else 4), self.s[self.i:self.i + 8])
            if not found:
                raise self.error(f"malformed escape \\{c}: write \\xHH or \\uHHHH")
            self.i += found.end()
            code = int(found.group(found.lastindex or 0), 16)
            if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
                raise self.error(f"escape {self.s[start:self.i]} is not supported (a surrogate, of which xgrammar "
                                 "writes no UTF-8, or past U+10FFFF): write the character itself")
            # xgrammar reads \x greedily (\x41b as U+41B) and knows no \u{...}: four digits it reads alike
            return _Char(f"\\u{code:04x}" if code <= 0xFFFF else chr(code), chr(code))
        if c == "c":
            if not (self.peek().isascii() and self.peek().isalpha()):
                raise self.error("escape \\c needs a letter A-Z after it")
            self.i += 1
            code = ord(self.s[self.i - 1].upper()) - 64
            return _Char(f"\\u{code:04x}", chr(code))
        if c.isascii() and c.isalpha():
            if c not in _KNOWN_ESCAPES:
                raise self.error(f"escape \\{c} is not supported (xgrammar would match the letter itself); supported: "
                                 "\\d \\w \\s \\D \\W \\S, \\b in a character class, \\n \\r \\t \\f \\v \\a \\e, "
                                 "\\xHH \\uHHHH, \\cX and escaped punctuation")
            if in_class:  # there xgrammar matches the letter: [\B] matches "B", [\p{L}] "p", "{", ...
                raise self.error(f"escape \\{c} is not supported in a character class")
            return self.s[start:self.i]  # \p{...}, \k<...>, \b, \B: xgrammar refuses them itself
        return _Char(self.s[start:self.i], c)

    def char_class(self) -> _Class:
        start = self.i
        self.i += 1
        cls = _Class(negated=self.peek() == "^")
        self.i += cls.negated
        if self.peek() == "]":  # ECMAScript's [] and [^] (nothing, anything), Python's literal "]"
            raise self.error("a character class cannot begin with ]: write \\]")
        while self.peek() != "]":
            if not self.peek():
                raise self.error("missing ]")
            surrogates = _SURROGATE_RANGE.match(self.s, self.i)
            if surrogates:  # as this module writes them (a pattern read back): no UTF-8 text has one
                self.i = surrogates.end()
                cls.rewritten = True
                continue
            item = self.class_member(cls)
            if isinstance(item, _Char) and self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                last = self.class_member(cls)
                if not isinstance(last, _Char):
                    raise self.error("a range cannot end in a class escape")
                if ord(last.char) < ord(item.char):  # xgrammar refuses it too, not in a JSON pattern's rewrite
                    raise self.error(f"range {item.text}-{last.text} goes backwards")
                item = (item, last)
            elif isinstance(item, _Char) and item.char == "-" and cls.items and isinstance(cls.items[-1], str):
                cls.rewritten = True  # ECMAScript's literal "-" after \w: xgrammar drops it (the rebuild escapes it)
            cls.items.append(item)
        if not cls.items and not cls.negated:
            raise self.error("the class holds only surrogates, which no UTF-8 text holds")
        self.i += 1
        cls.text = self.s[start:self.i]
        return cls

    def class_member(self, cls: _Class) -> "_Char | str":
        """One character or class escape of ``cls``, noting in it whether its text is written otherwise."""
        at = self.i
        item = self.escape(in_class=True) if self.peek() == "\\" else self.plain_char()
        cls.rewritten |= isinstance(item, _Char) and item.text != self.s[at:self.i]
        return item

    def plain_char(self) -> _Char:
        c = self.s[self.i]
        self.i += 1
        return _Char(c, c)


def _repeats(quantifier: str) -> bool:
    """Whether the quantifier lets its atom match more than once."""
    q = quantifier[:-1] if len(quantifier) > 1 and quantifier[-1] in "?+" else quantifier  # lazy, possessive
    if q in ("", "?"):
        return False
    if q.startswith("{"):
        most = q[1:-1].split(",")[-1].strip()
        return most not in ("0", "1")
    return True


def _zero_width(atom: object, anchor: str) -> bool:
    return atom == anchor or isinstance(atom, str) and atom.startswith("(?")  # flags: (?i)


def _check_anchors(alternatives: list, at_start: bool, at_end: bool) -> None:
    """Refuse a ``^`` that may follow a consumed character or a ``$`` that may precede one: xgrammar
    matches the whole text and drops anchors, so only those at its edges mean what they say."""
    for alt in alternatives:
        after_empty = [True] * (len(alt) + 1)  # after_empty[k]: nothing but $ and flags after alt[k - 1]
        for k in range(len(alt) - 1, -1, -1):
            after_empty[k] = after_empty[k + 1] and _zero_width(alt[k].atom, "$")
        before_empty = True
        for k, node in enumerate(alt):
            if node.atom == "^" and not (at_start and before_empty) or node.atom == "$" and not (at_end and after_empty[k + 1]):
                raise RegexError(f"the anchor {node.atom} inside the pattern is not supported: xgrammar matches the "
                                 "whole text and ignores it (anchors may only begin or end the pattern)")
            if isinstance(node.atom, _Group):
                once = not _repeats(node.quantifier)
                _check_anchors(node.atom.alternatives, at_start and before_empty and once,
                               at_end and after_empty[k + 1] and once)
            before_empty = before_empty and _zero_width(node.atom, "^")


# In a JSON string's text (json_string), what a class that is not spelled out may match: none of the
# characters JSON escapes. xgrammar writes those raw wherever a pattern compiles to its grammar
# rules rather than its state machine.
_NOT_JSON_SPECIAL = '"\\\\\\u0000-\\u001f'
# Python's whitespace (a Lark terminal's \s), as class members xgrammar reads alike wherever they stand.
_PYTHON_SPACE = "\\u0009-\\u000d\\u001c-\\u0020\\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
_CLASS_SHORTHANDS = frozenset(("\\d", "\\w", "\\s", "\\D", "\\W", "\\S"))
# xgrammar's open classes (negated ones, ".", \\S, \\W, \\D, a range over U+D800-U+DFFF) let an
# encoded surrogate (ED A0 80 ...) through, which is no UTF-8 (found by a hunt: a regex "." gave
# "\\ufffd\\ufffd\\ufffd"); every class this module writes leaves them out. Its state machine (a JSON
# pattern's, an EBNF Regex()'s; ``fsm``) also takes overlong sequences (E0 9C AC, F0 8F BF BF) for a
# class whose code points span UTF-8 lengths, and none for one within a length (measured, xgrammar
# 0.2.9): there a class is written as one class per length (``_LENGTHS``).
_SURROGATES = "\\ud800-\\udfff"
_SURROGATE_RANGE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}-\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
# Per UTF-8 length (1-4 bytes), the code points it holds and the class members of all the others.
_LENGTHS = ((0x0, 0x7F), (0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, 0x10FFFF))
_OTHER_LENGTHS = (f"\\u0080-\\uffff{chr(0x10000)}-{chr(0x10FFFF)}",
                  f"\\u0000-\\u007f\\u0800-\\uffff{chr(0x10000)}-{chr(0x10FFFF)}",
                  f"\\u0000-\\u07ff{_SURROGATES}{chr(0x10000)}-{chr(0x10FFFF)}",
                  "\\u0000-\\uffff")
# What the open atoms leave out, as a negated class's members: ECMAScript's "." no line terminator
# (xgrammar's matches every character); in a JSON string's text, none of what JSON escapes either.
_DOT = "\\n\\r\\u2028\\u2029"
_OPEN = {"\\S": "\\s", "\\W": "\\w", "\\D": "\\d"}
_NARROWED = {".": f"\\u2028\\u2029{_NOT_JSON_SPECIAL}", **{k: v + _NOT_JSON_SPECIAL for k, v in _OPEN.items()}}
_JSON_SPACE = f"[^\\S{_NOT_JSON_SPECIAL}]"  # \\s in a JSON string's text: its raw whitespace, one UTF-8 length each


def _negated(members: str, fsm: bool) -> str:
    """The class of every character but ``members`` and the surrogates; for the state machine
    (``fsm``), as one class per UTF-8 length."""
    if not fsm:
        return f"[^{members}{_SURROGATES}]"
    return f"(?:{'|'.join(f'[^{members}{others}]' for others in _OTHER_LENGTHS)})"


def _open_atom(atom: str, json_string: bool, fsm: bool) -> str:
    """``.``, ``\\S``, ``\\W`` or ``\\D`` outside a class (``\\s`` too in a JSON string's text)."""
    if json_string:
        return _JSON_SPACE if atom == "\\s" else _negated(_NARROWED[atom], fsm)
    return _negated(_DOT if atom == "." else _OPEN[atom], fsm)


def _emit_char(ch: _Char, json_string: bool) -> str:
    return _json_escaped(ch.char) if json_string and _json_special(ch.char) else ch.text


def _class_text(ch: _Char) -> str:
    """A character as a class member: ``^`` and ``-`` escaped (the members may be reordered)."""
    return {"^": "\\^", "-": "\\-"}.get(ch.char, ch.text)


def _code_text(code: int) -> str:
    """A code point as a class member that xgrammar reads alike wherever it stands."""
    return f"\\u{code:04x}" if code <= 0xFFFF else chr(code)


def _ends_in_control(item: object) -> bool:
    """Whether a class member ends in a control character or DEL, which xgrammar writes into its
    grammar as ``\\xHH``, then reads on into a next member's hex digit (``[\\x00-\\x1fA]`` became
    U+0000-U+01FA)."""
    last = item[1] if isinstance(item, tuple) else item
    return isinstance(last, _Char) and (ord(last.char) < 0x20 or last.char == "\x7f")


def _python_shorthand(item: str) -> str:
    """A shorthand class of a Python regex (a Lark terminal's) as xgrammar enforces it: ``\\s`` as
    Python's whitespace (xgrammar's, ECMAScript's, takes U+FEFF and leaves U+001C-U+001F and U+0085
    out); ``\\w`` and ``\\d`` as they are (ASCII there, narrower than Python's, so what they match
    Python's match too); ``\\S``, ``\\W`` and ``\\D`` refused (they would take what Python's leave out)."""
    if item in ("\\S", "\\W", "\\D"):
        raise RegexError(f"{item} is not supported in a Lark terminal (a Python regex): xgrammar matches it as "
                         f"ECMAScript does, with characters Python's {item} leaves out; write the class out")
    return _PYTHON_SPACE if item == "\\s" else item


def _emit_class(cls: _Class, json_string: bool, python: bool = False, fsm: bool = False) -> str:
    """The class as xgrammar reads it: as written where it can be; else rebuilt from its members,
    none of them a caret first (xgrammar reads a class that begins with one, escaped or
    ``\\u005e``, as negated), and those that end in a control character last (``_ends_in_control``).
    In a JSON string's text, a positive class's characters that JSON escapes become branches of
    their escapes, and an open one (negated, ``\\S``, ...) leaves them out. No class takes a
    surrogate, and for the state machine (``fsm``) none spans UTF-8 lengths (see ``_SURROGATES``)."""
    head = cls.items[0] if cls.items else None
    caret_first = isinstance(head, _Char) and head.char == "^" or isinstance(head, tuple) and head[0].char == "^"
    items = sorted(cls.items, key=_ends_in_control)  # stable: the others in their order, then those
    if python and cls.negated and any(item in ("\\d", "\\w") for item in items):
        # xgrammar's \d and \w are narrower than Python's, so outside them is wider (found by a review)
        raise RegexError("\\d or \\w in a negated class is not supported in a Lark terminal (a Python regex): "
                         "xgrammar's are ASCII, so the class would take digits and letters Python's leave out; "
                         "write the class out")
    # Python's reading of each shorthand: refuses \S, \W and \D, and rewrites \s.
    shorthands = python and any(isinstance(item, str) and item != _python_shorthand(item) for item in items)
    opens = any(item in _OPEN for item in items if isinstance(item, str))
    spans = any(ord(item[0].char) <= 0xDFFF and ord(item[1].char) >= 0xD800 or
                fsm and any(lo <= ord(item[0].char) <= hi < ord(item[1].char) for lo, hi in _LENGTHS)
                for item in items if isinstance(item, tuple))
    if (not json_string and not caret_first and not cls.rewritten and items == cls.items and not shorthands
            and not cls.negated and not opens and not spans):
        return cls.text
    escaping = json_string and not cls.negated
    members: list[str] = []
    longer: list[list[str]] = [[], [], []]  # for the state machine, a positive class's members of 2-4 UTF-8 bytes
    branches: list[str] = []  # beside the class: JSON escapes, open shorthands narrowed
    for item in items:
        if isinstance(item, str):  # \d \w \s \D \W \S
            if python:
                members.append(_python_shorthand(item))
            elif not cls.negated and (item in _OPEN or escaping and item == "\\s"):
                branches.append(_open_atom(item, json_string, fsm))
            else:
                members.append(item)
        elif isinstance(item, tuple):
            lo, hi = ord(item[0].char), ord(item[1].char)
            # The characters JSON escapes are all at or below "\\" (U+005C).
            special = [c for c in range(lo, min(hi, 0x5C) + 1) if _json_special(chr(c))] if escaping else []
            branches += [_json_escaped(chr(c)) for c in special]
            bounds = [lo - 1, *special, hi + 1]
            # (first, last) runs: JSON's escaped characters and the surrogates left out, and for the
            # state machine a positive class's runs cut where the UTF-8 length changes.
            runs = [(a + 1, b - 1) for a, b in zip(bounds, bounds[1:]) if a + 2 <= b]
            runs = [part for a, b in runs for part in ((a, min(b, 0xD7FF)), (max(a, 0xE000), b)) if part[0] <= part[1]]
            cuts = _LENGTHS if fsm and not cls.negated else ((0, 0x10FFFF),)
            for a, b in runs:
                for k, (first, last) in enumerate(cuts):
                    a_k, b_k = max(a, first), min(b, last)
                    if a_k <= b_k:
                        (longer[k - 1] if k else members).append(
                            _code_text(a_k) if a_k == b_k else f"{_code_text(a_k)}-{_code_text(b_k)}")
        elif escaping and _json_special(item.char):
            branches.append(_json_escaped(item.char))
        elif fsm and not cls.negated and ord(item.char) > 0x7F:
            longer[_utf8_length(ord(item.char)) - 2].append(_class_text(item))
        else:
            members.append(_class_text(item))
    if json_string and cls.negated:
        members.append(_NOT_JSON_SPECIAL)
    branches += [f"[{''.join(run)}]" for run in longer if run]
    safe = next((k for k, m in enumerate(members) if not m.startswith(("\\^", "\\u005e"))), None)
    if safe is not None:
        members.insert(0, members.pop(safe))
    elif members and not cls.negated:  # carets first only: the caret apart, ranges from the next code point
        members = [f"\\u005f{m[m.index('-'):]}" for m in members if "-" in m and not m.endswith(("-\\^", "-\\u005e"))]
        branches.insert(0, "\\^")
    if not members and not cls.negated:
        return branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
    text = _negated("".join(members), fsm) if cls.negated else f"[{''.join(members)}]"
    return f"(?:{'|'.join([text, *branches])})" if branches else text


def _utf8_length(code: int) -> int:
    return next(k for k, (_, last) in enumerate(_LENGTHS, start=1) if code <= last)


def _emit(alternatives: list, json_string: bool, python: bool = False, fsm: bool = False) -> str:
    out = []
    for alt in alternatives:
        parts = []
        for node in alt:
            atom = node.atom
            if isinstance(atom, _Group):
                text = atom.open + _emit(atom.alternatives, json_string, python, fsm) + ")"
            elif isinstance(atom, _Class):
                text = _emit_class(atom, json_string, python, fsm)
            elif isinstance(atom, _Char):
                text = _emit_char(atom, json_string)
                if node.quantifier and len(text) > 1 and not text.startswith("(?:") and text != atom.text:
                    text = f"(?:{text})"
            elif python and atom in _CLASS_SHORTHANDS:
                text = _python_shorthand(atom)
                text = f"[{text}]" if text == _PYTHON_SPACE else text
            elif atom == "." or atom in _OPEN or json_string and atom == "\\s":
                text = _open_atom(atom, json_string, fsm)
            else:
                text = atom
            parts.append(text + node.quantifier)
        out.append("".join(parts))
    return "|".join(out)


def check(regex: str, json_string: bool = False, python: bool = False, fsm: bool = False) -> str:
    """``regex`` as xgrammar enforces it exactly, or a ``RegexError`` (a ``ValueError``) saying what
    it would not enforce. With ``json_string`` (a JSON schema's ``pattern``, over the string's
    value) the result matches the string's JSON text: a character JSON escapes (``"``, ``\\``,
    control characters) is matched as its escape sequences, and classes that are not spelled out
    (``.``, ``\\S``, ``[^a]``) leave those characters out. ``fsm``: the regex is an EBNF
    ``Regex()``'s, which xgrammar runs on its state machine (as it does some JSON patterns, which
    ``check_grammar`` then reads in its printed grammar). No class of the result takes a surrogate,
    nor, with ``fsm``, an overlong sequence (``_SURROGATES``)."""
    parser = _Parser(regex)
    try:
        alternatives = parser.alternatives()
        if parser.i < len(regex):
            raise parser.error("unbalanced )")
        _check_anchors(alternatives, True, True)
        return _emit(alternatives, json_string, python, fsm)
    except RecursionError:
        raise RegexError("groups nested too deeply") from None


def check_grammar(grammar: str, lark: bool) -> str:
    """``grammar`` (structured outputs' Lark or EBNF text) with each regex in it as ``check``
    returns it, or a ``RegexError`` naming the first one xgrammar would not enforce as written: a
    Lark terminal ``/.../flags`` (a Python regex, so ``python``; found by a hunt: xgrammar read
    ``/[\\^a]/`` as ``[^a]`` and ``/\\x41b/`` as U+041B), an EBNF ``Regex("...")`` (ECMAScript's,
    its string JSON's; xgrammar's printed JSON patterns, ``Regex("...", json_string=true)``, too),
    and each negated EBNF class without surrogates (``_SURROGATES``)."""
    out, i = [], 0
    while i < len(grammar):
        c = grammar[i]
        if c == '"':  # a string literal, its escapes included
            end = _string_end(grammar, i, '"')
            printed = bool(_PATTERN_CALL_END.match(grammar, end))
            if not lark and _after_regex_call(grammar, i) and (printed or _CALL_END.match(grammar, end)):
                out.append(json.dumps(_checked(grammar, i, end, printed), ensure_ascii=False))
            else:
                out.append(grammar[i:end])
            i = end
        elif not lark and c == "[":  # an EBNF character class, which may hold a quote
            end = _string_end(grammar, i, "]")
            out.append(_without_surrogates(grammar[i:end]))
            i = end
        elif grammar.startswith("//" if lark else "#", i):  # a comment, to the end of its line
            end = grammar.find("\n", i)
            end = len(grammar) if end < 0 else end
            out.append(grammar[i:end])
            i = end
        elif lark and c == "/":
            end = i + 1
            while end < len(grammar) and grammar[end] not in "/\n":
                end += 2 if grammar[end] == "\\" else 1
            if not grammar.startswith("/", end):
                raise RegexError(f"the Lark terminal at position {i} has no closing /")
            try:
                regex = check(grammar[i + 1:end], python=True)
            except RegexError as exc:
                raise RegexError(f"terminal {grammar[i:end + 1]}: {exc}") from None
            out.append(f"/{regex}/")
            i = end + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


_CALL_END = re.compile(r"\s*\)")
# A JSON pattern's Regex() call as xgrammar prints it, its string in xgrammar's escapes (\? for ?).
_PATTERN_CALL_END = re.compile(r", json_string=true\)")
_PRINTED_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|.)", re.DOTALL)
_STRING_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f"}


# An EBNF class's members: an escape (\\uHHHH, \\UHHHHHHHH, \\xHH, a backslash and one character) or a character.
_EBNF_CLASS_MEMBER = re.compile(r"\\u[0-9a-fA-F]{4}|\\U[0-9a-fA-F]{8}|\\x[0-9a-fA-F]{2}|\\.|.", re.DOTALL)
_EBNF_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f", "v": "\v", "0": "\0", "e": "\x1b"}


def _member_code(member: str) -> int:
    """The code point of an EBNF class member (``_EBNF_CLASS_MEMBER``)."""
    if len(member) > 2:
        return int(member[2:], 16)
    return ord(_EBNF_ESCAPES.get(member[1], member[1]) if len(member) == 2 else member)


def _without_surrogates(ebnf_class: str) -> str:
    """An EBNF character class without the surrogates: a negated one leaves them out
    (``_SURROGATES`` last, before a trailing literal "-"), a positive one's ranges over them are cut
    around them. A class without its closing "]" is left to xgrammar to refuse.

    Raises:
        RegexError: a positive class of surrogates alone.
    """
    if not ebnf_class.endswith("]") or len(ebnf_class) < 3:
        return ebnf_class
    negated = ebnf_class.startswith("[^")
    members = _EBNF_CLASS_MEMBER.findall(ebnf_class[1 + negated:-1])
    out, i = [], 0
    while i < len(members):
        if i + 2 < len(members) and members[i + 1] == "-":  # a range
            low, high = _member_code(members[i]), _member_code(members[i + 2])
            if not negated and low <= 0xDFFF and high >= 0xD800:
                out += [f"{members[i]}-\\ud7ff"] * (low < 0xD800) + [f"\\ue000-{members[i + 2]}"] * (high > 0xDFFF)
            else:
                out.append("".join(members[i:i + 3]))
            i += 3
        else:
            out.append(members[i])
            i += 1
    if negated and _SURROGATES not in out:
        trailing = out[-1:] if out and out[-1] == "-" else []
        out = out[:len(out) - len(trailing)] + [_SURROGATES] + trailing
    if not out:
        raise RegexError(f"the class {ebnf_class} holds only surrogates, which no UTF-8 text holds")
    return f"[{'^' * negated}{''.join(out)}]"


def _after_regex_call(grammar: str, i: int) -> bool:
    """Whether the string at ``grammar[i]`` is an EBNF ``Regex(`` call's argument, whitespace between
    (found by a review: a window of 40 characters before it missed longer whitespace)."""
    j = i
    while j and grammar[j - 1].isspace():
        j -= 1
    return grammar.endswith("Regex(", 0, j) and not (j > 6 and (grammar[j - 7].isalnum() or grammar[j - 7] == "_"))


def _string_end(text: str, start: int, close: str) -> int:
    """Where the literal that begins at ``start`` (a string's quote, a class's bracket) ends, past
    its ``close``, escapes skipped."""
    i = start + 1
    while i < len(text) and text[i] != close:
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _checked(grammar: str, start: int, end: int, printed: bool = False) -> str:
    """The EBNF ``Regex("...")`` argument at ``grammar[start:end]``, checked (``check``);
    ``printed``: a JSON pattern's in xgrammar's printed grammar, its string in xgrammar's escapes."""
    literal = grammar[start:end]
    if printed:
        regex = _PRINTED_ESCAPE.sub(lambda m: _printed_char(m.group(1)), literal[1:-1])
    else:
        try:
            regex = json.loads(literal)
        except ValueError:
            raise RegexError(f"Regex({literal}): write its string as JSON does (\\\\, \\\", \\uHHHH)") from None
    try:
        return check(regex, fsm=True)
    except RegexError as exc:
        raise RegexError(f"Regex({literal}): {exc}") from None


def _printed_char(escape: str) -> str:
    """The character of an escape in xgrammar's printed strings (without its backslash)."""
    if len(escape) > 1:
        return chr(int(escape[1:], 16))
    return _STRING_ESCAPES.get(escape, escape)
