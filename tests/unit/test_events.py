"""tracer.events: the wire format shared with bpf/completion.c, and its decoding.

The C side is read from bpf/completion.c at test time (``struct event``, ``enum event_type``,
``enum event_flag``, ``enum counter`` are cut out of the file textually) and compiled with the
host's C compiler, so the Python layout is compared with what the compiler makes of the real
definitions, not with a copy.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import has_c_compiler

from tracer import abi, counters, probes, syscall_abi, tracker
from tracer.events import (
    EVENT_SIZE,
    EVENT_STRUCT,
    EXEC_EVENT_SIZE,
    EXEC_PATH_BYTES,
    MAX_EVENT_SIZE,
    PT_REGS,
    USTACK_BYTES,
    USTACK_HEADER,
    CapturePairer,
    EventFlag,
    EventType,
    HypercallAccess,
    HypervAccess,
    KernelEvent,
    MalformedEvent,
    MmioAccess,
    MsrAccess,
    PioAccess,
    UserCapture,
    decode_access,
    decode_event,
    encode_event,
    encode_user_stack,
    stack_capture_budget,
)

REPO = Path(__file__).resolve().parents[2]
BPF_SOURCE = REPO / "bpf" / "completion.c"

requires_cc = pytest.mark.skipif(not has_c_compiler(), reason="no C compiler (cc) on this host")


# ---- cutting definitions out of bpf/completion.c -----------------------------------------------

def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def c_block(source: str, opener: str) -> str:
    """The body of ``opener { ... };`` (the first ``};`` after it)."""
    start = source.index(opener + " {")
    body_start = source.index("{", start) + 1
    end = source.index("};", body_start)
    return source[body_start:end]


def struct_fields(body: str) -> list[tuple[str, str, str | None]]:
    """(type, name, array length or None) for each member of a flat struct body."""
    fields = []
    for decl in strip_comments(body).split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        m = re.fullmatch(r"(\w+(?: \w+)*) (\w+)(?:\[(\w+)\])?", decl)
        assert m, f"cannot parse struct member {decl!r}"
        fields.append((m.group(1), m.group(2), m.group(3)))
    return fields


def enum_names(body: str) -> list[str]:
    out = []
    for item in strip_comments(body).split(","):
        item = item.strip()
        if item:
            m = re.match(r"([A-Za-z_]\w*)", item)
            assert m, f"cannot parse enumerator {item!r}"
            out.append(m.group(1))
    return out


SOURCE = BPF_SOURCE.read_text()
STRUCT_EVENT = c_block(SOURCE, "struct event")
ENUM_EVENT_TYPE = c_block(SOURCE, "enum event_type")
ENUM_EVENT_FLAG = c_block(SOURCE, "enum event_flag")
ENUM_COUNTER = c_block(SOURCE, "enum counter")
ENUM_EXIT_SLOT = c_block(SOURCE, "enum exit_slot")
ENUM_COMPLETION_PATH = c_block(SOURCE, "enum completion_path")
ENUM_RUN_STATE = c_block(SOURCE, "enum vcpu_run_state")
C_FIELDS = struct_fields(STRUCT_EVENT)

# Values the C program stores in a struct event; decode_event must read back exactly these.
MMIO_UNION = bytearray(abi.ACCESS_BYTES)
struct.pack_into("<Q", MMIO_UNION, 0, 0xFEE00030)  # phys_addr
struct.pack_into("<Q", MMIO_UNION, 8, 0x1122334455667788)  # data
struct.pack_into("<IB", MMIO_UNION, 16, 4, 1)  # len, is_write
C_SAMPLE: dict[str, Any] = {
    "type": int(EventType.VIOLATION),
    "tgid": 0x01020304,
    "tid": 0x05060708,
    "vcpu_id": 0x0A0B0C0D,
    "fd": -7,
    "cmd": abi.IOCTL_BY_NAME["KVM_GET_REGS"].number,
    "exit_reason": abi.KVM_EXIT_MMIO,
    "flags": int(EventFlag.ACCESS_VALID | EventFlag.AT_RETURN),
    "seq": 0x1112131415161718,
    "pending_since_ns": 0x2122232425262728,
    "ts_ns": 0x3132333435363738,
    "aux": -0x4142434445464748,
    "vcpu_uid": 0x8000000000000005,
    "access": bytes(MMIO_UNION),
    "comm": b"qemu-system-x86",
    "stack_id": -0x51525354,
    "pad": 0,
}


def c_program() -> str:
    def quote(b: bytes) -> str:
        return "{" + ", ".join(str(x) for x in b) + "}"

    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <string.h>",
        "typedef unsigned char u8;",
        "typedef unsigned int u32;",
        "typedef int s32;",
        "typedef unsigned long long u64;",
        "typedef long long s64;",
        f"#define ACCESS_BYTES {abi.ACCESS_BYTES}",
        f"#define MAX_EXIT_REASON {abi.MAX_EXIT_REASON}",
        "enum event_type {" + ENUM_EVENT_TYPE + "};",
        "enum event_flag {" + ENUM_EVENT_FLAG + "};",
        "enum counter {" + ENUM_COUNTER + "};",
        "enum exit_slot {" + ENUM_EXIT_SLOT + "};",
        "enum completion_path {" + ENUM_COMPLETION_PATH + "};",
        "enum vcpu_run_state {" + ENUM_RUN_STATE + "};",
        "struct event {" + STRUCT_EVENT + "};",
        "#define MEMBER(f) printf(\"field %s %zu %zu\\n\", #f, offsetof(struct event, f), "
        "sizeof(((struct event *)0)->f))",
        "#define ENUMV(e) printf(\"enum %s %lld\\n\", #e, (long long)(e))",
        "int main(void) {",
        "    struct event ev;",
        "    memset(&ev, 0xEE, sizeof ev);",
        "    printf(\"sizeof %zu\\n\", sizeof(struct event));",
    ]
    lines += [f"    MEMBER({name});" for _, name, _ in C_FIELDS]
    for body in (ENUM_EVENT_TYPE, ENUM_EVENT_FLAG, ENUM_COUNTER, ENUM_EXIT_SLOT,
                 ENUM_COMPLETION_PATH, ENUM_RUN_STATE):
        lines += [f"    ENUMV({name});" for name in enum_names(body)]
    for _, name, length in C_FIELDS:
        value = C_SAMPLE.get(name)
        if value is None:
            continue
        if length is None:
            suffix = "LL" if value < 0 else "ULL"
            lines.append(f"    ev.{name} = {value}{suffix};")
        else:
            lines.append(f"    {{ static const unsigned char v[] = {quote(value)}; "
                         f"memset(ev.{name}, 0, sizeof ev.{name}); "
                         f"memcpy(ev.{name}, v, sizeof v); }}")
    lines += [
        "    printf(\"bytes \");",
        "    for (size_t i = 0; i < sizeof ev; i++) printf(\"%02x\", ((unsigned char *)&ev)[i]);",
        "    printf(\"\\n\");",
        "    return 0;",
        "}",
    ]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class CFacts:
    size: int
    fields: dict[str, tuple[int, int]]  # name -> (offset, size)
    enums: dict[str, int]
    sample: bytes


@pytest.fixture(scope="module")
def c_facts(tmp_path_factory: pytest.TempPathFactory) -> CFacts:
    if not has_c_compiler():
        pytest.skip("no C compiler (cc) on this host")
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc
    work = tmp_path_factory.mktemp("event_layout")
    src, exe = work / "layout.c", work / "layout"
    src.write_text(c_program())
    built = subprocess.run([cc, "-std=c11", "-Wall", "-Werror", "-o", str(exe), str(src)],
                           capture_output=True, text=True, check=False)
    assert built.returncode == 0, f"{built.stderr}\n--- source ---\n{src.read_text()}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    facts = CFacts(0, {}, {}, b"")
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "sizeof":
            facts.size = int(rest[0])
        elif kind == "field":
            facts.fields[rest[0]] = (int(rest[1]), int(rest[2]))
        elif kind == "enum":
            facts.enums[rest[0]] = int(rest[1])
        elif kind == "bytes":
            facts.sample = bytes.fromhex(rest[0])
    return facts


def python_layout() -> list[tuple[str, int, int]]:
    """(code, offset, size) per field of EVENT_STRUCT, from its format string."""
    fmt = EVENT_STRUCT.format
    order, codes = fmt[0], fmt[1:]
    assert order in "<=!>", "EVENT_STRUCT must fix its byte order"
    out, prefix = [], order
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", codes):
        token = count + code
        if code != "s" and count:  # "3I" is three fields
            for _ in range(int(count)):
                out.append((code, struct.calcsize(prefix), struct.calcsize(order + code)))
                prefix += code
            continue
        out.append((token, struct.calcsize(prefix), struct.calcsize(order + token)))
        prefix += token
    return out


C_TYPE_FOR_CODE = {"I": "u32", "i": "s32", "Q": "u64", "q": "s64"}
KERNEL_EVENT_FIELDS = [f.name for f in dataclasses.fields(KernelEvent)]


# ---- struct event layout ------------------------------------------------------------------------

def test_struct_event_is_found_in_the_bpf_source() -> None:
    assert [name for _, name, _ in C_FIELDS][:2] == ["type", "tgid"]
    assert "comm" in [name for _, name, _ in C_FIELDS]


# Fields that do not live in struct event: an EXEC event's file name follows the struct.
TRAILER_FIELDS = ["path", "capture"]  # after the struct (EXEC), or their own record


def test_c_member_names_match_kernel_event_fields_in_order() -> None:
    # padding members carry nothing: KernelEvent has no field for them
    in_struct = [name for name in KERNEL_EVENT_FIELDS if name not in TRAILER_FIELDS]
    assert [name for _, name, _ in C_FIELDS if name != "pad"] == in_struct
    assert KERNEL_EVENT_FIELDS[-len(TRAILER_FIELDS):] == TRAILER_FIELDS


def test_the_exec_trailer_size_is_the_one_the_probes_compile_with() -> None:
    # the C side reserves sizeof(struct event) + EXEC_PATH_BYTES, defined by probes.py
    assert "sizeof(struct event) + EXEC_PATH_BYTES" in SOURCE
    assert EXEC_EVENT_SIZE == EVENT_SIZE + EXEC_PATH_BYTES <= MAX_EVENT_SIZE


def test_exec_event_decodes_its_path_and_round_trips() -> None:
    ev = dataclasses.replace(make_event(EventType.EXEC), path="/usr/bin/qemu-system-x86_64")
    raw = encode_event(ev)
    assert len(raw) == EXEC_EVENT_SIZE
    assert decode_event(raw).path == "/usr/bin/qemu-system-x86_64"
    assert decode_event(raw) == ev


def test_exec_event_without_its_trailer_has_no_path() -> None:
    raw = encode_event(make_event(EventType.EXEC))[:EVENT_SIZE]
    assert decode_event(raw).path is None


def test_other_events_ignore_bytes_after_the_struct() -> None:
    raw = encode_event(make_event(EventType.VIOLATION)) + b"/bin/x".ljust(EXEC_PATH_BYTES, b"\0")
    assert decode_event(raw).path is None


@requires_cc
def test_event_size_equals_the_c_struct_size(c_facts: CFacts) -> None:
    assert EVENT_SIZE == EVENT_STRUCT.size == c_facts.size


@requires_cc
def test_field_offsets_and_sizes_match_the_c_struct(c_facts: CFacts) -> None:
    py = python_layout()
    assert len(py) == len(C_FIELDS), (py, C_FIELDS)
    mismatches = []
    for (ctype, name, _), (code, offset, size) in zip(C_FIELDS, py, strict=True):
        if c_facts.fields[name] != (offset, size):
            mismatches.append(f"{name}: C {c_facts.fields[name]} vs Python {(offset, size)} "
                              f"({ctype} vs {code!r})")
    assert not mismatches, "\n".join(mismatches)


def test_field_types_and_signedness_match() -> None:
    for (ctype, name, length), (code, _, size) in zip(C_FIELDS, python_layout(), strict=True):
        if length is None:
            assert C_TYPE_FOR_CODE.get(code) == ctype, f"{name}: C {ctype}, Python {code!r}"
        else:
            assert code.endswith("s") and ctype in ("u8", "char"), name
            expected = abi.ACCESS_BYTES if length == "ACCESS_BYTES" else int(length)
            assert size == expected, name


@requires_cc
def test_bytes_written_by_c_decode_to_the_same_values(c_facts: CFacts) -> None:
    ev = decode_event(c_facts.sample)
    assert ev.type is EventType.VIOLATION
    for name in ("tgid", "tid", "vcpu_id", "fd", "cmd", "exit_reason", "seq",
                 "pending_since_ns", "ts_ns", "aux", "vcpu_uid"):
        assert getattr(ev, name) == C_SAMPLE[name], name
    assert ev.flags == EventFlag.ACCESS_VALID | EventFlag.AT_RETURN
    assert ev.access == MmioAccess(0xFEE00030, 4, True)
    assert ev.comm == "qemu-system-x86"
    assert encode_event(ev, C_SAMPLE["access"]) == c_facts.sample


# ---- enums against the C source ----------------------------------------------------------------

@requires_cc
def test_event_type_matches_enum_event_type(c_facts: CFacts) -> None:
    c_names = enum_names(ENUM_EVENT_TYPE)
    assert "EV_TYPES" in c_names
    c_types = {n.removeprefix("EV_"): c_facts.enums[n] for n in c_names if n != "EV_TYPES"}
    assert c_types == {m.name: m.value for m in EventType}
    bound = c_facts.enums["EV_TYPES"]
    assert bound == probes.EVENT_TYPES
    assert all(0 < m.value < bound for m in EventType)


@requires_cc
def test_event_flag_matches_enum_event_flag(c_facts: CFacts) -> None:
    c_flags = {n.removeprefix("EV_F_"): c_facts.enums[n] for n in enum_names(ENUM_EVENT_FLAG)}
    assert all(n.startswith("EV_F_") for n in enum_names(ENUM_EVENT_FLAG))
    assert c_flags == {m.name: m.value for m in EventFlag}


@requires_cc
def test_counter_names_follow_enum_counter(c_facts: CFacts) -> None:
    c_names = enum_names(ENUM_COUNTER)
    ev_types = c_facts.enums["EV_TYPES"]
    assert c_names[0] == "C_LOST_BASE" and c_facts.enums["C_LOST_BASE"] == 0
    assert c_names[-1] == "C_COUNTERS"
    assert c_facts.enums["C_VCPU_MAP_FULL"] == ev_types == probes.EVENT_TYPES
    named = sorted((c_facts.enums[n], n) for n in c_names[1:-1])
    # dense, starting right after the per-event-type "lost" slots, ending at C_COUNTERS
    assert [v for v, _ in named] == list(range(ev_types, c_facts.enums["C_COUNTERS"]))
    lowered = tuple(n.removeprefix("C_").lower() for _, n in named)
    assert lowered == probes.COUNTER_NAMES
    assert c_facts.enums["C_COUNTERS"] == probes.EVENT_TYPES + len(probes.COUNTER_NAMES)


@pytest.mark.parametrize("code", [
    # bcc already loaded (as here, via conftest): tracer.probes must not pull it in
    "import sys, tracer.probes; bad = sorted(m for m in sys.modules if m.split('.')[0] == 'bcc');"
    " print(bad); sys.exit(1 if bad else 0)",
    # bcc unimportable: tracer.probes must still import (bcc is imported in Probes.__init__)
    "import sys; sys.modules['bcc'] = None; import tracer.probes; print('ok')",
])
def test_importing_tracer_probes_does_not_import_bcc(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# ---- round trips --------------------------------------------------------------------------------

def io_union(direction: int, size: int, port: int, count: int) -> bytes:
    raw = bytearray(abi.ACCESS_BYTES)
    base = abi.KVM_RUN_LAYOUT.exit_union
    lay = abi.KVM_RUN_LAYOUT
    struct.pack_into("<B", raw, lay.io_direction - base, direction)
    struct.pack_into("<B", raw, lay.io_size - base, size)
    struct.pack_into("<H", raw, lay.io_port - base, port)
    struct.pack_into("<I", raw, lay.io_count - base, count)
    struct.pack_into("<Q", raw, lay.io_data_offset - base, 4096)
    return bytes(raw)


def mmio_union(gpa: int, length: int, is_write: bool) -> bytes:
    raw = bytearray(abi.ACCESS_BYTES)
    base, lay = abi.KVM_RUN_LAYOUT.exit_union, abi.KVM_RUN_LAYOUT
    struct.pack_into("<Q", raw, lay.mmio_phys_addr - base, gpa)
    struct.pack_into("<Q", raw, lay.mmio_data - base, 0xDEADBEEFCAFEF00D)
    struct.pack_into("<I", raw, lay.mmio_len - base, length)
    struct.pack_into("<B", raw, lay.mmio_is_write - base, int(is_write))
    return bytes(raw)


def msr_union(index: int) -> bytes:
    raw = bytearray(abi.ACCESS_BYTES)
    base, lay = abi.KVM_RUN_LAYOUT.exit_union, abi.KVM_RUN_LAYOUT
    struct.pack_into("<B", raw, lay.msr_error - base, 0x55)
    struct.pack_into("<I", raw, lay.msr_reason - base, 0x66666666)  # KVM_MSR_EXIT_REASON_*
    struct.pack_into("<I", raw, lay.msr_index - base, index)
    return bytes(raw)  # data (offset 48) lies beyond the 24 bytes copied


def make_event(etype: EventType, access_raw: bytes = b"", **kw: Any) -> KernelEvent:
    values: dict[str, Any] = {
        "type": etype, "tgid": 4242, "tid": 4243, "vcpu_id": 3, "fd": 17,
        "cmd": abi.IOCTL_BY_NAME["KVM_SET_REGS"].number, "exit_reason": abi.KVM_EXIT_IO,
        "flags": EventFlag.ACCESS_VALID, "seq": 9, "pending_since_ns": 1_000,
        "ts_ns": 5_000, "aux": -1, "vcpu_uid": 77, "access": None, "comm": "vcpu0",
    }
    values.update(kw)
    if values["flags"] & EventFlag.ACCESS_VALID:
        values["access"] = decode_access(values["exit_reason"], access_raw.ljust(24, b"\0"))
    return KernelEvent(**values)


@pytest.mark.parametrize("etype", [t for t in EventType if t is not EventType.USER_STACK])
def test_round_trip_every_event_type(etype: EventType) -> None:
    raw_access = io_union(1, 2, 0x7E, 1)
    ev = make_event(etype, raw_access, aux=-(2**63), fd=-1, seq=2**64 - 1)
    raw = encode_event(ev, raw_access)
    assert len(raw) == (EXEC_EVENT_SIZE if etype is EventType.EXEC else EVENT_SIZE)
    back = decode_event(raw)
    assert back == ev
    assert back.type is etype
    assert back.access == PioAccess(0x7E, "out", 2, 1)
    assert encode_event(back, raw_access) == raw


@pytest.mark.parametrize("flags", [EventFlag(0), EventFlag.QUIRK_7E_DISABLED,
                                   EventFlag.AT_RETURN | EventFlag.IMMEDIATE_EXIT,
                                   EventFlag.ACCESS_VALID | EventFlag.QUIRK_7E_DISABLED])
def test_round_trip_flags(flags: EventFlag) -> None:
    raw_access = mmio_union(0x1000, 8, False)
    ev = make_event(EventType.VIOLATION, raw_access, exit_reason=abi.KVM_EXIT_MMIO, flags=flags)
    back = decode_event(encode_event(ev, raw_access))
    assert back.flags == flags
    assert back == ev


def test_decode_accepts_a_longer_record() -> None:
    ev = make_event(EventType.VCPU_CREATED, flags=EventFlag(0))
    assert decode_event(encode_event(ev) + b"\x99" * 8) == ev


def test_unknown_flag_bits_are_dropped() -> None:
    raw = bytearray(encode_event(make_event(EventType.VIOLATION, flags=EventFlag(0))))
    struct.pack_into("<I", raw, 28, 0xFFFFFF90 | int(EventFlag.AT_RETURN))
    assert decode_event(bytes(raw)).flags == EventFlag.AT_RETURN


# ---- malformed input -----------------------------------------------------------------------------

@pytest.mark.parametrize("length", [0, 1, 4, EVENT_SIZE - 1])
def test_short_buffer_is_malformed(length: int) -> None:
    raw = encode_event(make_event(EventType.VIOLATION))[:length]
    with pytest.raises(MalformedEvent, match=f"{length} bytes"):
        decode_event(raw)


@pytest.mark.parametrize("etype", [0, 15, 16, 0xFFFFFFFF])
def test_unknown_event_type_is_malformed(etype: int) -> None:
    raw = bytearray(encode_event(make_event(EventType.VIOLATION)))
    struct.pack_into("<I", raw, 0, etype)
    with pytest.raises(MalformedEvent, match=f"unknown event type {etype}"):
        decode_event(bytes(raw))


def test_malformed_event_is_a_value_error() -> None:
    assert issubclass(MalformedEvent, ValueError)


# ---- decode_access -------------------------------------------------------------------------------

@pytest.mark.parametrize(("direction", "name"), [(abi.KVM_EXIT_IO_OUT, "out"),
                                                 (abi.KVM_EXIT_IO_IN, "in")])
def test_decode_pio(direction: int, name: str) -> None:
    got = decode_access(abi.KVM_EXIT_IO, io_union(direction, 4, 0xCF8, 3))
    assert got == PioAccess(0xCF8, name, 4, 3)
    assert got.describe() == {"port": "0xcf8", "direction": name, "size": 4, "count": 3}


@pytest.mark.parametrize("is_write", [True, False])
def test_decode_mmio(is_write: bool) -> None:
    got = decode_access(abi.KVM_EXIT_MMIO, mmio_union(0xFED00000F0, 2, is_write))
    assert got == MmioAccess(0xFED00000F0, 2, is_write)
    assert got.describe()["gpa"] == "0xfed00000f0"
    assert got.describe()["direction"] == ("write" if is_write else "read")


@pytest.mark.parametrize(("reason", "is_write"), [(abi.KVM_EXIT_X86_RDMSR, False),
                                                  (abi.KVM_EXIT_X86_WRMSR, True)])
def test_decode_msr_index_at_union_offset_12(reason: int, is_write: bool) -> None:
    assert abi.KVM_RUN_LAYOUT.msr_index - abi.KVM_RUN_LAYOUT.exit_union == 12
    got = decode_access(reason, msr_union(0xC0000080))
    assert got == MsrAccess(0xC0000080, is_write)
    assert got.describe() == {"msr": "0xc0000080", "direction": "write" if is_write else "read"}


def test_decode_hypercall_nr() -> None:
    raw = struct.pack("<QQQ", 0x1_0000_000C, 0xAAAA, 0xBBBB)
    assert decode_access(abi.KVM_EXIT_HYPERCALL, raw) == HypercallAccess(0x1_0000_000C)


@pytest.mark.parametrize("hv_type", [1, 2, 3])
def test_decode_hyperv_type(hv_type: int) -> None:
    raw = struct.pack("<I", hv_type).ljust(abi.ACCESS_BYTES, b"\x77")
    assert decode_access(abi.KVM_EXIT_HYPERV, raw) == HypervAccess(hv_type)


@pytest.mark.parametrize("reason", [0, 5, 10, 34, 40, 63, 1000])  # HLT, INTR, XEN, TDX ...
def test_decode_unknown_reason_is_none(reason: int) -> None:
    assert decode_access(reason, io_union(1, 1, 0x80, 1)) is None


@pytest.mark.parametrize("reason", [abi.KVM_EXIT_IO, abi.KVM_EXIT_MMIO,
                                    abi.KVM_EXIT_X86_RDMSR, abi.KVM_EXIT_HYPERCALL])
@pytest.mark.parametrize("length", [0, 8, abi.ACCESS_BYTES - 1])
def test_decode_short_buffer_is_none(reason: int, length: int) -> None:
    assert decode_access(reason, mmio_union(0x1000, 4, True)[:length]) is None


def test_access_is_none_without_the_valid_flag() -> None:
    raw_access = io_union(1, 1, 0x3F8, 1)
    ev = make_event(EventType.VIOLATION, raw_access, flags=EventFlag.AT_RETURN)
    back = decode_event(encode_event(ev, raw_access))
    assert back.access is None
    with_flag = make_event(EventType.VIOLATION, raw_access, flags=EventFlag.ACCESS_VALID)
    assert decode_event(encode_event(with_flag, raw_access)).access == PioAccess(
        0x3F8, "out", 1, 1)


def test_access_valid_on_an_exit_without_an_access_is_none() -> None:
    ev = make_event(EventType.VIOLATION, io_union(1, 1, 0x3F8, 1), exit_reason=5)
    assert decode_event(encode_event(ev, io_union(1, 1, 0x3F8, 1))).access is None


# ---- comm and pending_ns -------------------------------------------------------------------------

def raw_with_comm(comm: bytes) -> bytes:
    raw = bytearray(encode_event(make_event(EventType.VCPU_CREATED)))
    raw[96:112] = comm.ljust(16, b"\0")
    return bytes(raw)


@pytest.mark.parametrize(("comm", "text"), [
    (b"qemu-system-x86\0", "qemu-system-x86"),
    (b"fc_vcpu 0\0\xff\xff garbage", "fc_vcpu 0"),  # bytes after the NUL are stale
    (b"0123456789abcdef", "0123456789abcdef"),  # 16 chars, no NUL
    (b"\0whatever", ""),
    (b"cl\xe9-hv\0", "cl\ufffd-hv"),
])
def test_comm_ends_at_the_first_nul(comm: bytes, text: str) -> None:
    assert EVENT_STRUCT.unpack(raw_with_comm(comm[:16]))[14][:len(comm[:16])] == comm[:16]
    assert decode_event(raw_with_comm(comm[:16])).comm == text


def test_comm_longer_than_16_bytes_is_cut_when_encoding() -> None:
    ev = make_event(EventType.VCPU_CREATED, comm="a-very-long-command-name")
    assert decode_event(encode_event(ev)).comm == "a-very-long-comm"


@pytest.mark.parametrize(("since", "ts", "expected"), [
    (1_000, 5_000, 4_000),
    (5_000, 5_000, 0),
    (9_000, 5_000, 0),  # clock read on another CPU, or no window: never negative
    (2**64 - 1, 0, 0),
])
def test_pending_ns_is_never_negative(since: int, ts: int, expected: int) -> None:
    ev = decode_event(encode_event(make_event(EventType.VIOLATION, pending_since_ns=since,
                                              ts_ns=ts)))
    assert ev.pending_ns == expected


@requires_cc
def test_vcpu_statistics_slots_match_the_c_enums(c_facts: CFacts) -> None:
    """tracer.counters indexes the arrays of struct vcpu_state with these."""
    assert c_facts.enums["EXIT_SLOT_OTHER"] == counters.EXIT_SLOT_OTHER
    assert c_facts.enums["EXIT_SLOT_ERROR"] == counters.EXIT_SLOT_ERROR
    assert c_facts.enums["EXIT_SLOTS"] == counters.EXIT_SLOTS
    paths = {n: c_facts.enums[n] for n in enum_names(ENUM_COMPLETION_PATH)}
    assert paths == {"PATH_REENTRY": 0, "PATH_IMMEDIATE": 1, "PATHS": len(counters.PATHS)}
    assert counters.PATHS == ("reentry", "immediate_exit")
    states = {n.removeprefix("VCPU_").lower(): c_facts.enums[n]
              for n in enum_names(ENUM_RUN_STATE)}
    assert states == {s.name.lower(): s.value for s in counters.RunState}
    assert tuple(states) == tracker.RUN_STATES


# ---- the user stack record and its pairing with the violation -----------------------------------

def test_user_stack_record_matches_the_c_struct() -> None:
    body = re.search(r"struct user_stack_rec \{(.*?)\};", SOURCE, re.S)
    assert body is not None
    members = re.findall(r"^\s*(u8|u32|u64) (\w+)(\[\w+\])?;", body[1], re.M)
    assert members == [("u32", "type", ""), ("u32", "tgid", ""), ("u32", "tid", ""),
                       ("u32", "size", ""), ("u64", "seq", ""), ("u64", "vcpu_uid", ""),
                       ("u64", "regs", "[21]"), ("u8", "stack", "[USTACK_BYTES]")]
    assert USTACK_HEADER.size == 4 * 4 + 8 * 2 + 21 * 8
    assert len(PT_REGS) == 21 and PT_REGS[16] == "rip" and PT_REGS[19] == "rsp"
    assert USTACK_HEADER.size + USTACK_BYTES <= MAX_EVENT_SIZE
    # the registers are read as the UAPI struct pt_regs: the same 21 names in the same order
    assert "sizeof(r->regs)" in SOURCE and "r->regs[PT_REGS_SP_IDX]" in SOURCE  # sp
    assert syscall_abi.PT_REGS_IP_SP_OFFSETS["rsp"] // 8 == 19 == PT_REGS.index("rsp")


def _capture(n: int = 64) -> UserCapture:
    return UserCapture({r: i * 0x1111 for i, r in enumerate(PT_REGS)}, bytes(range(n)))


def test_user_stack_round_trips_and_a_lie_about_its_size_is_malformed() -> None:
    raw = encode_user_stack(10, 11, 7, 99, _capture())
    ev = decode_event(raw)
    assert ev.type is EventType.USER_STACK and (ev.tgid, ev.tid, ev.seq, ev.vcpu_uid) == (
        10, 11, 7, 99)
    assert ev.capture == _capture()
    with pytest.raises(MalformedEvent, match="says 64 stack bytes, has 63"):
        decode_event(raw[:-1])
    with pytest.raises(MalformedEvent, match="user stack record of 20 bytes"):
        decode_event(raw[:20])


def _violation(tid: int, seq: int, stack: bool = True) -> KernelEvent:
    return make_event(EventType.VIOLATION, tid=tid, seq=seq, vcpu_uid=99,
                      flags=EventFlag.USER_STACK if stack else EventFlag(0))


def _stack_event(tid: int, seq: int) -> KernelEvent:
    return decode_event(encode_user_stack(1, tid, seq, 99, _capture()))


def test_pairer_joins_the_record_and_keeps_the_order() -> None:
    pairer = CapturePairer()
    other = make_event(EventType.WINDOW_CLOSED, tid=5)
    assert pairer.feed(_violation(5, 1)) == []  # waits for its record
    assert pairer.feed(other) == []  # and so does everything after it
    out = pairer.feed(_stack_event(5, 1))
    assert [e.type for e in out] == [EventType.VIOLATION, EventType.WINDOW_CLOSED]
    assert out[0].capture == _capture() and out[1] == other
    # A violation without the flag goes straight through.
    assert pairer.feed(_violation(6, 1, stack=False)) == [_violation(6, 1, stack=False)]
    assert pairer.unpaired == pairer.orphans == 0


def test_pairer_matches_by_thread_and_window_and_gives_up_after_a_poll() -> None:
    pairer = CapturePairer()
    first, second = _violation(5, 1), _violation(6, 1)
    assert pairer.feed(first) == [] and pairer.feed(second) == []
    assert pairer.feed(_stack_event(6, 1)) == []  # second's: first still waits at the head
    assert pairer.polled() == []  # the same poll round
    out = pairer.polled()  # a whole poll later: first goes without, second with its record
    assert [(e.tid, e.capture is not None) for e in out] == [(5, False), (6, True)]
    assert pairer.unpaired == 1
    assert pairer.feed(_stack_event(9, 9)) == [] and pairer.orphans == 1
    assert pairer.feed(_violation(7, 2)) == []
    assert [e.tid for e in pairer.flush()] == [7] and pairer.unpaired == 2


@pytest.mark.parametrize(("release", "btf", "supported"), [
    ("6.18.44-fc-v1300", True, True), ("5.15.0-91-generic", True, True),
    ("5.10.0-28-amd64", True, False), ("6.1.0-18-amd64", False, False), ("garbage", True, False),
])
def test_the_capture_needs_kernel_5_15_and_btf(tmp_path: Path, release: str, btf: bool,
                                               supported: bool) -> None:
    vmlinux = tmp_path / "vmlinux"
    if btf:
        vmlinux.write_bytes(b"")
    assert probes.user_stack_capture_supported(release, vmlinux) is supported
    # the capture is compiled only then: the frame-pointer walk alone otherwise
    assert "#ifdef USER_STACK_CAPTURE\n    capture_user_stack(ev, 0);" in SOURCE


def test_stack_captures_between_two_reads_fill_at_most_a_quarter_of_the_ring() -> None:
    # The ring's record: its 8-byte header, then struct user_stack_rec (kernel/bpf/ringbuf.c).
    record = 8 + USTACK_HEADER.size + USTACK_BYTES
    page = 4096
    assert stack_capture_budget(64 * page) == 8  # run's default ring: as before
    assert stack_capture_budget(16384 * page) == 256  # watch's 64 MiB ring: the cap
    assert stack_capture_budget(1 * page) == 1  # a tiny ring still gets its first call site
    for pages in (2 ** k for k in range(15)):
        budget = stack_capture_budget(pages * page)
        assert budget == 1 or budget * record <= 0.26 * pages * page, pages
    # A burst of a dozen kinds of state read at once (tracer.vmm's snapshot reads 10) keeps
    # every call site under watch, whose ring is at least 64 MiB.
    assert stack_capture_budget(16384 * page) >= 2 * 12
