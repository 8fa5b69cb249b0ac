"""Symbol names as their authors wrote them: Rust (v0 and legacy) and C++ (Itanium ABI).

Most VMMs are Rust. Rust's legacy scheme is Itanium-shaped with a hash and ``$..$`` escapes;
v0 (``_R``) has its own grammar (RFC 2603), decoded here. C++ goes through libstdc++'s
``__cxa_demangle``; a name nothing understands is returned unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import re
from typing import Any, Final

_LEGACY_ESCAPES: Final = {"$SP$": "@", "$BP$": "*", "$RF$": "&", "$LT$": "<", "$GT$": ">",
                          "$LP$": "(", "$RP$": ")", "$C$": ",", "$u7e$": "~", "$u20$": " ",
                          "$u27$": "'", "$u5b$": "[", "$u5d$": "]", "$u7b$": "{", "$u7d$": "}",
                          "$u3b$": ";", "$u2b$": "+", "$u22$": '"'}
_HASH: Final = re.compile(r"^h[0-9a-f]{16}$")
_BASIC: Final = {"a": "i8", "b": "bool", "c": "char", "d": "f64", "e": "str", "f": "f32",
                 "h": "u8", "i": "isize", "j": "usize", "l": "i32", "m": "u32", "n": "i128",
                 "o": "u128", "s": "i16", "t": "u16", "u": "()", "v": "...", "x": "i64",
                 "y": "u64", "z": "!", "p": "_"}
_DIGITS62: Final = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def demangle(name: str) -> str:
    try:
        if name.startswith("_R"):
            return _V0(name).symbol()
        if name.startswith("_ZN") and name.endswith("E"):
            legacy = _rust_legacy(name)
            if legacy is not None:
                return legacy
        if name.startswith("_Z"):
            return _cxa_demangle(name) or name
    except (_Bad, IndexError, ValueError, RecursionError):
        return name
    return name


class _Bad(ValueError):
    pass


# ---- Rust legacy: _ZN <len><ident>... 17h<hash> E -----------------------------------------------
def _rust_legacy(name: str) -> str | None:
    pos, parts = 3, []
    while pos < len(name) - 1:
        m = re.match(r"\d+", name[pos:])
        if not m:
            return None
        pos += len(m[0])
        length = int(m[0])
        parts.append(name[pos:pos + length])
        pos += length
    if len(parts) < 2 or not _HASH.match(parts[-1]):
        return None  # C++, or not Rust's hash: leave it to the C++ demangler
    out = []
    for part in parts[:-1]:
        if part.startswith("_$"):
            part = part[1:]
        for esc, text in _LEGACY_ESCAPES.items():
            part = part.replace(esc, text)
        out.append(part.replace("..", "::"))
    return "::".join(out)


# ---- Rust v0 (RFC 2603) ------------------------------------------------------------------------
class _V0:
    def __init__(self, name: str) -> None:
        self.s = name
        self.pos = 2
        self.depth = 0

    def peek(self) -> str:
        return self.s[self.pos] if self.pos < len(self.s) else ""

    def next(self) -> str:
        if self.pos >= len(self.s):
            raise _Bad("unexpected end")
        ch = self.s[self.pos]
        self.pos += 1
        return ch

    def eat(self, ch: str) -> bool:
        if self.peek() == ch:
            self.pos += 1
            return True
        return False

    def base62(self) -> int:
        if self.eat("_"):
            return 0
        value = 0
        while not self.eat("_"):
            ch = self.next()
            if ch not in _DIGITS62:
                raise _Bad("bad base-62 digit")
            value = value * 62 + _DIGITS62.index(ch)
        return value + 1

    def decimal(self) -> int:
        start = self.pos
        while self.peek().isdigit():
            self.pos += 1
        if start == self.pos:
            raise _Bad("number expected")
        return int(self.s[start:self.pos])

    def disambiguator(self) -> int:
        return self.base62() + 1 if self.eat("s") else 0

    def ident(self) -> str:
        return self.ident_with_disambiguator()[1]

    def ident_with_disambiguator(self) -> tuple[int, str]:
        dis = self.disambiguator()
        punycode = self.eat("u")
        length = self.decimal()
        self.eat("_")
        text = self.s[self.pos:self.pos + length]
        if len(text) != length:
            raise _Bad("identifier runs past the end")
        self.pos += length
        if punycode:
            with contextlib.suppress(UnicodeError):
                head, _, tail = text.rpartition("_")
                text = (head.encode() + b"-" + tail.encode()).decode("punycode")
        return dis, text

    def backref(self, fn: str) -> str:
        target = self.base62() + 2  # relative to after "_R"
        if target >= self.pos:
            raise _Bad("forward backref")
        saved = self.pos
        self.pos = target
        try:
            return str(getattr(self, fn)())
        finally:
            self.pos = saved

    def symbol(self) -> str:
        if self.peek().isdigit():
            self.decimal()  # encoding version
        return self.path()

    def path(self) -> str:
        self.depth += 1
        if self.depth > 200:
            raise _Bad("too deep")
        try:
            tag = self.next()
            if tag == "C":
                return self.ident()
            if tag == "N":
                ns = self.next()
                parent = self.path()
                dis, name = self.ident_with_disambiguator()
                if ns.isupper():  # special namespaces: C closure, S shim, others by letter
                    kind = {"C": "closure", "S": "shim"}.get(ns, ns)
                    label = f"{kind}:{name}" if name else kind
                    return f"{parent}::{{{label}#{dis}}}"
                return f"{parent}::{name}" if name else parent
            if tag == "M":
                self.disambiguator()
                self.path()
                return f"<{self.type()}>"
            if tag == "X":
                self.disambiguator()
                self.path()
                ty = self.type()
                return f"<{ty} as {self.path()}>"
            if tag == "Y":
                ty = self.type()
                return f"<{ty} as {self.path()}>"
            if tag == "I":
                base = self.path()
                args = []
                while not self.eat("E"):
                    args.append(self.generic_arg())
                return f"{base}::<{', '.join(a for a in args if a)}>"
            if tag == "B":
                return self.backref("path")
            raise _Bad(f"unknown path tag {tag!r}")
        finally:
            self.depth -= 1

    def generic_arg(self) -> str:
        if self.eat("L"):
            self.base62()
            return ""  # lifetimes are left out, as rustc's own demangler does when erased
        if self.eat("K"):
            return self.const()
        return self.type()

    def const(self) -> str:
        if self.eat("B"):
            return self.backref("const")
        if self.eat("p"):
            return "_"
        self.type()
        neg = self.eat("n")
        start = self.pos
        while self.peek() != "_":
            self.next()
        digits = self.s[start:self.pos]
        self.next()
        return f"{'-' if neg else ''}{int(digits, 16) if digits else 0}"

    def type(self) -> str:
        self.depth += 1
        if self.depth > 200:
            raise _Bad("too deep")
        try:
            ch = self.peek()
            if ch in _BASIC:
                self.pos += 1
                return _BASIC[ch]
            tag = self.next()
            if tag == "A":
                ty = self.type()
                return f"[{ty}; {self.const()}]"
            if tag == "S":
                return f"[{self.type()}]"
            if tag in "RQ":
                if self.eat("L"):
                    self.base62()
                return f"&{'mut ' if tag == 'Q' else ''}{self.type()}"
            if tag in "PO":
                return f"*{'const' if tag == 'P' else 'mut'} {self.type()}"
            if tag == "T":
                items = []
                while not self.eat("E"):
                    items.append(self.type())
                return f"({', '.join(items)}{',' if len(items) == 1 else ''})"
            if tag == "F":
                return self.fn_sig()
            if tag == "D":
                return self.dyn_bounds()
            if tag == "B":
                return self.backref("type")
            self.pos -= 1
            return self.path()
        finally:
            self.depth -= 1

    def fn_sig(self) -> str:
        if self.eat("G"):
            self.base62()
        unsafe = self.eat("U")
        abi = ""
        if self.eat("K"):
            abi = "C" if self.eat("C") else self.ident()
        args = []
        while not self.eat("E"):
            args.append(self.type())
        ret = self.type()
        head = ("unsafe " if unsafe else "") + (f'extern "{abi}" ' if abi else "")
        return f"{head}fn({', '.join(args)})" + ("" if ret == "()" else f" -> {ret}")

    def dyn_bounds(self) -> str:
        if self.eat("G"):
            self.base62()
        traits = []
        while not self.eat("E"):
            trait = self.path()
            while self.eat("p"):
                name = self.ident()
                trait += f"<{name} = {self.type()}>"
            traits.append(trait)
        if self.eat("L"):
            self.base62()
        return f"dyn {' + '.join(traits)}"


# ---- C++ ----------------------------------------------------------------------------------------
_CXA: list[Any] = []  # [function] once loaded, [None] when unavailable


def _cxa_demangle(name: str) -> str | None:
    if not _CXA:
        fn = None
        with contextlib.suppress(OSError, AttributeError):
            lib = ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6")
            fn = lib.__cxa_demangle
            fn.restype = ctypes.c_void_p
            fn.argtypes = (ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.POINTER(ctypes.c_int))
        _CXA.append(fn)
    fn = _CXA[0]
    if fn is None:
        return None
    status = ctypes.c_int(0)
    ptr = fn(name.encode(), None, None, ctypes.byref(status))
    if not ptr or status.value != 0:
        return None
    try:
        return ctypes.string_at(ptr).decode("utf-8", "replace")
    finally:
        ctypes.CDLL(None).free(ctypes.c_void_p(ptr))
