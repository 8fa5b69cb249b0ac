"""Symbol names as their authors wrote them: Rust (v0 and legacy) and C++ (Itanium ABI).

Most VMMs are Rust. Rust's legacy scheme is Itanium-shaped with a hash and ``$..$`` escapes;
v0 (``_R``, RFC 2603) has its own grammar, decoded here the way rustc-demangle prints it in its
alternate form (what ``rustfilt`` and Rust backtraces show: no crate disambiguators, no hashes,
no integer type suffixes). C++ goes through libstdc++'s ``__cxa_demangle``. A name nothing
understands is returned unchanged: a raw symbol is still better than no frame.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from collections.abc import Callable
from typing import Any, Final

# rustc's own table (compiler/rustc_symbol_mangling/src/legacy.rs); other $uXX$ are code points.
_LEGACY_ESCAPES: Final = {"SP": "@", "BP": "*", "RF": "&", "LT": "<", "GT": ">", "LP": "(",
                          "RP": ")", "C": ","}
_LEGACY_HASH: Final = re.compile(r"h[0-9a-f]{16}")
# A legacy name and a compiler-added suffix (".cold"): the elements may hold dots ("..") too.
_LEGACY_SPLIT: Final = re.compile(r"(_ZN.*17h[0-9a-f]{16}E)(\..*)?", re.DOTALL)
# LLVM appends ".llvm.<hash>" to internalized symbols (ThinLTO); it names nothing the author wrote.
_LLVM_SUFFIX: Final = re.compile(r"\.llvm\.[0-9A-F@]+$", re.IGNORECASE)
_BASIC: Final = {"a": "i8", "b": "bool", "c": "char", "d": "f64", "e": "str", "f": "f32",
                 "h": "u8", "i": "isize", "j": "usize", "l": "i32", "m": "u32", "n": "i128",
                 "o": "u128", "s": "i16", "t": "u16", "u": "()", "v": "...", "x": "i64",
                 "y": "u64", "z": "!", "p": "_"}
_UNSIGNED_CONSTS: Final = frozenset("htmyoj")
_SIGNED_CONSTS: Final = frozenset("aslxni")
_DIGITS62: Final = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_DEPTH: Final = 300  # nesting of a v0 name; deeper is a corrupt or hostile name


def demangle(name: str) -> str:
    """``name`` demangled (Rust v0, Rust legacy or C++), else ``name`` unchanged."""
    base = _LLVM_SUFFIX.sub("", name)
    try:
        if base.startswith("_R"):
            # v0 names have no dots: what follows one (".cold", ".constprop.0") was added by
            # the compiler and stays visible after the name.
            core, dot, suffix = base.partition(".")
            return _V0(core).symbol() + dot + suffix
        split = _LEGACY_SPLIT.fullmatch(base)
        if split is not None:
            legacy = _rust_legacy(split[1])
            if legacy is not None:
                return legacy + (split[2] or "")
        if name.startswith("_Z"):
            return _cxa_demangle(name) or name
    except (_Bad, IndexError, ValueError, RecursionError):
        return name
    return name


class _Bad(ValueError):
    """Not a well-formed mangled name."""


# ---- Rust legacy: _ZN <len><element>... 17h<hash> E -------------------------------------------
def _rust_legacy(name: str) -> str | None:
    pos, parts = 3, []
    while pos < len(name) and name[pos] != "E":
        m = re.match(r"[1-9]\d*", name[pos:])
        if m is None:
            return None
        pos += len(m[0])
        length = int(m[0])
        if pos + length > len(name):
            return None
        parts.append(name[pos:pos + length])
        pos += length
    # Without rustc's hash it is C++ (or not Rust's): leave it to the C++ demangler.
    if pos != len(name) - 1 or len(parts) < 2 or not _LEGACY_HASH.fullmatch(parts[-1]):
        return None
    return "::".join(_legacy_element(part) for part in parts[:-1])


def _legacy_element(part: str) -> str:
    if part.startswith("_$"):  # rustc prefixes "_" when an element would start with "$"
        part = part[1:]
    out, i = [], 0
    while i < len(part):
        if part.startswith("..", i):
            out.append("::")
            i += 2
            continue
        if part[i] == "$":
            end = part.find("$", i + 1)
            text = _legacy_escape(part[i + 1:end]) if end > i else None
            if text is None:  # not an escape we know: keep the rest raw, as rustc-demangle does
                out.append(part[i:])
                break
            out.append(text)
            i = end + 1
            continue
        out.append(part[i])
        i += 1
    return "".join(out)


def _legacy_escape(escape: str) -> str | None:
    if escape in _LEGACY_ESCAPES:
        return _LEGACY_ESCAPES[escape]
    if len(escape) > 1 and escape[0] == "u" and re.fullmatch(r"[0-9a-f]+", escape[1:]):
        code = int(escape[1:], 16)
        if code < 0x110000 and chr(code).isprintable():
            return chr(code)
    return None


# ---- Rust v0 (RFC 2603) ----------------------------------------------------------------------
class _V0:
    """One pass over a v0 name, printing while parsing (backrefs re-parse an earlier spot)."""

    def __init__(self, name: str) -> None:
        self.s = name
        self.pos = 2  # after "_R"; backrefs count from here
        self.depth = 0
        self.bound_lifetimes = 0  # binders (for<'a>) we are inside

    # -- lexing --
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
        """``<base-62-number>``: "_" is 0, "<digits>_" is the value plus one."""
        if self.eat("_"):
            return 0
        value = 0
        while not self.eat("_"):
            ch = self.next()
            if ch not in _DIGITS62:
                raise _Bad("bad base-62 digit")
            value = value * 62 + _DIGITS62.index(ch)
        return value + 1

    def opt_base62(self, tag: str) -> int:
        return self.base62() + 1 if self.eat(tag) else 0

    def decimal(self) -> int:
        # "0" stands alone: in "011FOO" the 0 is an empty identifier and 11 the next length.
        if self.eat("0"):
            return 0
        start = self.pos
        while self.peek().isdigit():
            self.pos += 1
        if start == self.pos:
            raise _Bad("number expected")
        return int(self.s[start:self.pos])

    def ident(self) -> tuple[int, str]:
        """(disambiguator, name) of ``[s<base-62>] [u] <decimal> [_] <bytes>``."""
        dis = self.opt_base62("s")
        punycode = self.eat("u")
        length = self.decimal()
        self.eat("_")  # separates a length from bytes that start with a digit or "_"
        text = self.s[self.pos:self.pos + length]
        if len(text) != length:
            raise _Bad("identifier runs past the end")
        self.pos += length
        return dis, _punycode(text) if punycode else text

    def backref(self, parse: Callable[[], str]) -> str:
        at = self.pos - 1  # the "B"
        target = self.base62() + 2
        if target >= at:
            raise _Bad("backref does not point backwards")
        saved, self.pos = self.pos, target
        try:
            return parse()
        finally:
            self.pos = saved

    def nested(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Bad("too deep")

    # -- grammar --
    def symbol(self) -> str:
        if self.peek().isdigit() and self.decimal() != 0:
            raise _Bad("unknown encoding version")
        text = self.path(in_value=True)
        if self.pos < len(self.s):
            self.path(in_value=False)  # the instantiating crate: not printed
        if self.pos != len(self.s):
            raise _Bad("trailing characters")
        return text

    def path(self, in_value: bool) -> str:
        self.nested()
        try:
            return self._path(in_value)
        finally:
            self.depth -= 1

    def _path(self, in_value: bool) -> str:
        tag = self.next()
        if tag == "C":
            return self.ident()[1]
        if tag == "N":
            ns = self.next()
            parent = self.path(in_value)
            dis, name = self.ident()
            if "A" <= ns <= "Z":  # special namespaces: closures, shims, others by letter
                kind = {"C": "closure", "S": "shim"}.get(ns, ns)
                return f"{parent}::{{{kind}{':' + name if name else ''}#{dis}}}"
            return f"{parent}::{name}" if name else parent
        if tag in "MX":
            self.opt_base62("s")
            self.path(in_value=False)  # the impl's own path: rustc-demangle leaves it out
            ty = self.type()
            return f"<{ty} as {self.path(False)}>" if tag == "X" else f"<{ty}>"
        if tag == "Y":
            ty = self.type()
            return f"<{ty} as {self.path(False)}>"
        if tag == "I":
            base = self.path(in_value)
            return f"{base}{'::' if in_value else ''}<{self.generic_args()}>"
        if tag == "B":
            return self.backref(lambda: self.path(in_value))
        raise _Bad(f"unknown path tag {tag!r}")

    def generic_args(self) -> str:
        args = []
        while not self.eat("E"):
            if self.eat("L"):
                args.append(self.lifetime(self.base62()))
            elif self.eat("K"):
                args.append(self.const())
            else:
                args.append(self.type())
        return ", ".join(args)

    def lifetime(self, index: int) -> str:
        if index == 0:
            return "'_"
        depth = self.bound_lifetimes - index
        if depth < 0:
            raise _Bad("lifetime outside its binder")
        return f"'{chr(ord('a') + depth)}" if depth < 26 else f"'_{depth}"

    def const(self) -> str:
        tag = self.next()
        if tag == "p":
            return "_"
        if tag == "B":
            return self.backref(self.const)
        if tag in _UNSIGNED_CONSTS:
            return self.const_uint()
        if tag in _SIGNED_CONSTS:
            sign = "-" if self.eat("n") else ""
            return sign + self.const_uint()
        if tag == "b":
            value = self.hex_nibbles()
            if value not in ("0", "1"):
                raise _Bad("bad bool constant")
            return "true" if value == "1" else "false"
        if tag == "c":
            return repr(chr(int(self.hex_nibbles() or "0", 16)))
        # str, references, arrays, tuples, ADTs as const generics: rare in VMMs; name left raw.
        raise _Bad(f"unsupported constant {tag!r}")

    def hex_nibbles(self) -> str:
        start = self.pos
        while self.next() != "_":
            pass
        digits = self.s[start:self.pos - 1]
        if not re.fullmatch(r"[0-9a-f]*", digits):
            raise _Bad("bad hex constant")
        return digits.lstrip("0") or "0"

    def const_uint(self) -> str:
        digits = self.hex_nibbles()
        return str(int(digits, 16)) if len(digits) <= 16 else f"0x{digits}"

    def type(self) -> str:
        self.nested()
        try:
            return self._type()
        finally:
            self.depth -= 1

    def _type(self) -> str:
        tag = self.next()
        if tag in _BASIC:
            return _BASIC[tag]
        if tag in "RQ":
            lifetime = self.lifetime(self.base62()) + " " if self.eat("L") else ""
            if lifetime == "'_ ":
                lifetime = ""  # erased: rustc-demangle prints "&T"
            return f"&{lifetime}{'mut ' if tag == 'Q' else ''}{self.type()}"
        if tag in "PO":
            return f"*{'const' if tag == 'P' else 'mut'} {self.type()}"
        if tag == "A":
            ty = self.type()
            return f"[{ty}; {self.const()}]"
        if tag == "S":
            return f"[{self.type()}]"
        if tag == "T":
            items = []
            while not self.eat("E"):
                items.append(self.type())
            return f"({', '.join(items)}{',' if len(items) == 1 else ''})"
        if tag == "F":
            return self.in_binder(self.fn_sig)
        if tag == "D":
            return self.dyn_bounds()
        if tag == "B":
            return self.backref(self.type)
        self.pos -= 1
        return self.path(in_value=False)

    def in_binder(self, body: Callable[[], str]) -> str:
        count = self.opt_base62("G")
        names = []
        for _ in range(count):
            self.bound_lifetimes += 1
            names.append(self.lifetime(1))
        try:
            text = body()
        finally:
            self.bound_lifetimes -= count
        return f"for<{', '.join(names)}> {text}" if names else text

    def fn_sig(self) -> str:
        head = "unsafe " if self.eat("U") else ""
        if self.eat("K"):
            abi = "C" if self.eat("C") else self.ident()[1].replace("_", "-")
            head += f'extern "{abi}" '
        args = []
        while not self.eat("E"):
            args.append(self.type())
        ret = "" if self.eat("u") else f" -> {self.type()}"
        return f"{head}fn({', '.join(args)}){ret}"

    def dyn_bounds(self) -> str:
        # "dyn for<'a> Fn(&'a u8)": the binder covers the traits, not the trailing lifetime.
        text = self.in_binder(self.dyn_traits)
        if not self.eat("L"):
            raise _Bad("dyn without its lifetime")
        lifetime = self.base62()
        return f"dyn {text}" + (f" + {self.lifetime(lifetime)}" if lifetime else "")

    def dyn_traits(self) -> str:
        traits = []
        while not self.eat("E"):
            trait, args = self.dyn_trait_path()
            while self.eat("p"):
                name = self.ident()[1]
                args.append(f"{name} = {self.type()}")
            traits.append(f"{trait}<{', '.join(args)}>" if args else trait)
        return " + ".join(traits)

    def dyn_trait_path(self) -> tuple[str, list[str]]:
        """A trait path with its generic args kept apart: ``Fn<(u8,), Output = ()>`` prints the
        associated-type bindings inside the same angle brackets."""
        if self.eat("B"):
            at = self.pos - 1
            target = self.base62() + 2
            if target >= at:
                raise _Bad("backref does not point backwards")
            saved, self.pos = self.pos, target
            try:
                return self.dyn_trait_path()
            finally:
                self.pos = saved
        if self.eat("I"):
            base = self.path(in_value=False)
            args = self.generic_args()
            return base, [args] if args else []
        return self.path(in_value=False), []


def _punycode(text: str) -> str:
    # rustc writes "_" where RFC 3492 has "-" as the basic/encoded delimiter.
    head, sep, tail = text.rpartition("_")
    try:
        return (head + "-" + tail if sep else text).encode("ascii").decode("punycode")
    except (UnicodeError, ValueError):
        return f"punycode{{{text}}}"  # rustc-demangle's marker for what it cannot decode


# ---- C++ -------------------------------------------------------------------------------------
_CXA: list[Any] = []  # [(__cxa_demangle, free)] once loaded, [None] when unavailable


def _load_cxa() -> Any:
    # The soname directly: ctypes.util.find_library would spawn ldconfig/gcc from a daemon.
    with contextlib.suppress(OSError, AttributeError):
        lib = ctypes.CDLL("libstdc++.so.6")
        fn = lib.__cxa_demangle
        fn.restype = ctypes.c_void_p
        fn.argtypes = (ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.POINTER(ctypes.c_int))
        free = ctypes.CDLL(None).free
        free.restype = None
        free.argtypes = (ctypes.c_void_p,)
        return fn, free
    return None


def _cxa_demangle(name: str) -> str | None:
    if not _CXA:
        _CXA.append(_load_cxa())
    if _CXA[0] is None or "\0" in name:
        return None
    fn, free = _CXA[0]
    status = ctypes.c_int(0)
    ptr = fn(name.encode("utf-8", "surrogateescape"), None, None, ctypes.byref(status))
    if not ptr:
        return None
    try:  # status 0: demangled; -2: not a valid name (then ptr is NULL anyway)
        return ctypes.string_at(ptr).decode("utf-8", "replace") if status.value == 0 else None
    finally:
        free(ptr)
