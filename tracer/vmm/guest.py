"""Tiny real-mode guest programs, hand-assembled (16-bit code, CS = 0, IP = load address).

Each instruction is emitted by a helper below whose bytes are spelled out next to the assembly
they encode, so a program's listing (:meth:`GuestProgram.listing`) reads like an assembler's.

Memory map the scenarios use: one slot backs GPA [0, 64 KiB); programs load at 0x1000 (one
vCPU) or 0x1000 + 0x100 * n (several vCPUs sharing a VM). The MMIO address 0x20000 lies outside
every slot, so accesses there exit with KVM_EXIT_MMIO; real mode reaches it through ES
(segment 0x2000, offset 0), loaded by the program itself.

Loop programs end in a short jump back to their loop head, so every KVM_RUN gives exactly one
exit of the kind listed in :attr:`GuestProgram.exits`.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Final

LOAD_ADDR: Final = 0x1000
MEMORY_SIZE: Final = 0x10000
MMIO_GPA: Final = 0x20000
SERIAL_PORT: Final = 0x3F8
PORT_7E: Final = 0x7E
# A dword the spinning programs increment (inside the memory slot, below every load address),
# so the VMM can see from its own mapping of guest memory that the guest is running.
HEARTBEAT_ADDR: Final = 0x0F00
# An MSR index KVM does not know: with KVM_CAP_X86_USER_SPACE_MSR (reason UNKNOWN) accesses to it
# exit to userspace. PVM claims 0x4b564d00-ff for itself, so stay clear of those.
USER_MSR: Final = 0x12345678


@dataclass(frozen=True)
class Insn:
    offset: int  # from the program start
    code: bytes
    asm: str


@dataclass(frozen=True)
class GuestProgram:
    name: str
    instructions: tuple[Insn, ...]
    exits: tuple[str, ...]  # per loop iteration, or for the whole program if it does not loop
    loops: bool
    loop_head: int  # offset the closing jump returns to (0 when the program does not loop)
    description: str
    port: int | None = None
    gpa: int | None = None
    msr_index: int | None = None
    direction: str | None = None  # of the loop's access: "in"/"out" (PIO), "read"/"write"
    load_addr: int = LOAD_ADDR
    heartbeat: int | None = None  # GPA of a dword the program increments as it runs

    @property
    def code(self) -> bytes:
        return b"".join(i.code for i in self.instructions)

    def listing(self) -> str:
        return "\n".join(
            f"{self.load_addr + i.offset:04x}: {i.code.hex(' '):<20} {i.asm}"
            for i in self.instructions
        )

    def at(self, load_addr: int) -> GuestProgram:
        """The same program loaded elsewhere (the code is position independent)."""
        return dataclasses.replace(self, load_addr=load_addr)


class _Asm:
    """Appends instructions with their offsets; one method per encoding the programs use."""

    def __init__(self) -> None:
        self.insns: list[Insn] = []
        self.pos = 0

    def _emit(self, code: bytes, asm: str) -> int:
        start = self.pos
        self.insns.append(Insn(start, code, asm))
        self.pos += len(code)
        return start

    # 16-bit operand size is the default in real mode; 0x66 selects 32 bits.
    def _mov_r16(self, opcode: int, reg: str, value: int) -> int:
        # B8+rw iw: mov r16, imm16
        return self._emit(bytes([opcode]) + struct.pack("<H", value), f"mov {reg}, {value:#x}")

    def mov_ax(self, value: int) -> int:
        return self._mov_r16(0xB8, "ax", value)

    def mov_al(self, value: int) -> int:
        return self._emit(bytes([0xB0, value]), f"mov al, {value:#x}")

    def mov_dx(self, value: int) -> int:
        return self._mov_r16(0xBA, "dx", value)

    def mov_eax(self, value: int) -> int:
        return self._emit(b"\x66\xb8" + struct.pack("<I", value), f"mov eax, {value:#x}")

    def mov_ecx(self, value: int) -> int:
        return self._emit(b"\x66\xb9" + struct.pack("<I", value), f"mov ecx, {value:#x}")

    def mov_edx(self, value: int) -> int:
        return self._emit(b"\x66\xba" + struct.pack("<I", value), f"mov edx, {value:#x}")

    def mov_di(self, value: int) -> int:
        return self._mov_r16(0xBF, "di", value)

    def mov_si(self, value: int) -> int:
        return self._mov_r16(0xBE, "si", value)

    def rep_insb(self) -> int:
        # F3 6C: rep insb, ES:DI <- port DX, CX times (16-bit address size in real mode)
        return self._emit(b"\xf3\x6c", "rep insb")

    def rep_outsb(self) -> int:
        # F3 6E: rep outsb, port DX <- DS:SI, CX times
        return self._emit(b"\xf3\x6e", "rep outsb")

    def mov_es_ax(self) -> int:
        return self._emit(b"\x8e\xc0", "mov es, ax")  # 8E /r, ModRM 11 000(es) 000(ax)

    def out_dx(self, size: int) -> int:
        # EE: out dx, al; EF: out dx, ax; 66 EF: out dx, eax
        code = {1: b"\xee", 2: b"\xef", 4: b"\x66\xef"}[size]
        return self._emit(code, f"out dx, {_acc(size)}")

    def in_dx(self, size: int) -> int:
        # EC: in al, dx; ED: in ax, dx; 66 ED: in eax, dx
        code = {1: b"\xec", 2: b"\xed", 4: b"\x66\xed"}[size]
        return self._emit(code, f"in {_acc(size)}, dx")

    def store_es_al(self, offset: int) -> int:
        # 26 = ES override; A2 = mov moffs16, al
        return self._emit(b"\x26\xa2" + struct.pack("<H", offset), f"mov [es:{offset:#x}], al")

    def load_al_es(self, offset: int) -> int:
        # 26 = ES override; A0 = mov al, moffs16
        return self._emit(b"\x26\xa0" + struct.pack("<H", offset), f"mov al, [es:{offset:#x}]")

    def rdmsr(self) -> int:
        return self._emit(b"\x0f\x32", "rdmsr")

    def wrmsr(self) -> int:
        return self._emit(b"\x0f\x30", "wrmsr")

    def hlt(self) -> int:
        return self._emit(b"\xf4", "hlt")

    def mov_bx(self, value: int) -> int:
        return self._mov_r16(0xBB, "bx", value)

    def mov_cx(self, value: int) -> int:
        return self._mov_r16(0xB9, "cx", value)

    def inc_dword(self, addr: int) -> int:
        # 66 FF /0 with ModRM 00 000 110: inc dword [disp16] (DS = 0)
        return self._emit(b"\x66\xff\x06" + struct.pack("<H", addr), f"inc dword [{addr:#x}]")

    def dec_bx(self) -> int:
        return self._emit(b"\x4b", "dec bx")  # 48+rw (one-byte form, not REX in 16-bit code)

    def _rel8(self, target: int, length: int) -> int:
        rel = target - (self.pos + length)
        if not -128 <= rel <= 127:
            raise ValueError(f"short jump of {rel} bytes")
        return rel & 0xFF

    def loop_short(self, target: int) -> int:
        # E2 rel8: decrement CX (16-bit address size), jump while CX != 0.
        return self._emit(bytes([0xE2, self._rel8(target, 2)]), f"loop {target:#x}")

    def jnz_short(self, target: int) -> int:
        # 75 rel8
        return self._emit(bytes([0x75, self._rel8(target, 2)]), f"jnz short {target:#x}")

    def jmp_short(self, target: int) -> int:
        # EB rel8: the displacement counts from the end of this 2-byte instruction.
        rel = target - (self.pos + 2)
        if not -128 <= rel <= 127:
            raise ValueError(f"short jump of {rel} bytes")
        return self._emit(bytes([0xEB, rel & 0xFF]), f"jmp short {target:#x}")

    def loop_program(self, name: str, head: int, exits: tuple[str, ...], description: str,
                     direction: str, **access: int) -> GuestProgram:
        self.jmp_short(head)
        return GuestProgram(name, tuple(self.insns), exits, True, head, description,
                            direction=direction, **access)


def _acc(size: int) -> str:
    return {1: "al", 2: "ax", 4: "eax"}[size]


def _real_mode_segment(gpa: int) -> tuple[int, int]:
    """Segment and offset reaching ``gpa`` from real mode (below 1 MiB + 64 KiB)."""
    segment = min(gpa >> 4, 0xFFFF)
    offset = gpa - (segment << 4)
    if not 0 <= offset <= 0xFFFF:
        raise ValueError(f"GPA {gpa:#x} is out of real-mode reach")
    return segment, offset


def out_loop(port: int = SERIAL_PORT, value: int = 0x41, size: int = 1) -> GuestProgram:
    """OUT of ``value`` to ``port`` forever: one KVM_EXIT_IO (direction out) per KVM_RUN."""
    a = _Asm()
    a.mov_dx(port)
    a.mov_eax(value)
    head = a.out_dx(size)
    return a.loop_program(f"out-{port:#x}", head, ("KVM_EXIT_IO",),
                          f"out dx, {_acc(size)} to port {port:#x} in a loop", "out",
                          port=port)


def in_loop(port: int = SERIAL_PORT, size: int = 1) -> GuestProgram:
    """IN from ``port`` forever: one KVM_EXIT_IO (direction in) per KVM_RUN; the value the VMM
    answers lands in AL/AX/EAX only when the exit is completed."""
    a = _Asm()
    a.mov_dx(port)
    head = a.in_dx(size)
    return a.loop_program(f"in-{port:#x}", head, ("KVM_EXIT_IO",),
                          f"in {_acc(size)}, dx from port {port:#x} in a loop", "in",
                          port=port)


# Where the string I/O programs read from and write to (guest memory, below the load address).
STRING_IO_BUFFER: Final = 0x0E00
STRING_IO_COUNT: Final = 4


def _rep_string_loop(direction: str, port: int, count: int, buffer: int) -> GuestProgram:
    """``rep insb`` (ES:DI <- port) or ``rep outsb`` (port <- DS:SI) of ``count`` bytes at
    ``buffer``, forever: string I/O, which KVM always runs in its instruction emulator."""
    a = _Asm()
    a.mov_dx(port)
    head = a.mov_cx(count)
    if direction == "in":
        a.mov_di(buffer)
        a.rep_insb()
    else:
        a.mov_si(buffer)
        a.rep_outsb()
    mnemonic, prep = ("rep insb", "from") if direction == "in" else ("rep outsb", "to")
    return a.loop_program(f"{mnemonic.replace(' ', '-')[:-1]}-{port:#x}", head, ("KVM_EXIT_IO",),
                          f"{mnemonic}, {count} bytes {prep} port {port:#x} in a loop",
                          direction, port=port)


def rep_ins_loop(port: int = SERIAL_PORT, count: int = STRING_IO_COUNT,
                 dest: int = STRING_IO_BUFFER) -> GuestProgram:
    """String IN: one KVM_EXIT_IO (direction in) with count > 1 per loop."""
    return _rep_string_loop("in", port, count, dest)


def rep_outs_loop(port: int = SERIAL_PORT, count: int = STRING_IO_COUNT,
                  src: int = STRING_IO_BUFFER) -> GuestProgram:
    """String OUT: KVM_EXIT_IO (direction out), one exit per element here."""
    return _rep_string_loop("out", port, count, src)


# A hypercall-like request: the guest puts a pointer to its request block in DI and reads a
# status from HCALL_PORT; the VMM reads DI (KVM_GET_REGS), the block, answers, and completes.
HCALL_PORT: Final = 0x510
HCALL_REQUEST_ADDR: Final = 0x0E00


def hypercall_in_loop(port: int = HCALL_PORT, request: int = HCALL_REQUEST_ADDR) -> GuestProgram:
    """``mov di, request`` then IN from ``port`` forever: one KVM_EXIT_IO (in) per KVM_RUN,
    whose argument (the request block's address) is only in RDI."""
    a = _Asm()
    a.mov_di(request)
    a.mov_dx(port)
    head = a.in_dx(1)
    return a.loop_program(f"hypercall-{port:#x}", head, ("KVM_EXIT_IO",),
                          f"in al, dx from port {port:#x} with di -> request block "
                          f"{request:#x}, in a loop", "in", port=port)


def mmio_write_loop(gpa: int = MMIO_GPA, value: int = 0x42) -> GuestProgram:
    """Byte store to unbacked ``gpa`` forever: one KVM_EXIT_MMIO (is_write=1, len 1) per KVM_RUN."""
    segment, offset = _real_mode_segment(gpa)
    a = _Asm()
    a.mov_ax(segment)
    a.mov_es_ax()
    a.mov_al(value)
    head = a.store_es_al(offset)
    return a.loop_program(f"mmio-write-{gpa:#x}", head, ("KVM_EXIT_MMIO",),
                          f"byte store to MMIO {gpa:#x} in a loop", "write", gpa=gpa)


def mmio_read_loop(gpa: int = MMIO_GPA) -> GuestProgram:
    """Byte load from unbacked ``gpa`` forever: one KVM_EXIT_MMIO (is_write=0, len 1) per KVM_RUN;
    the VMM's answer reaches AL on completion."""
    segment, offset = _real_mode_segment(gpa)
    a = _Asm()
    a.mov_ax(segment)
    a.mov_es_ax()
    head = a.load_al_es(offset)
    return a.loop_program(f"mmio-read-{gpa:#x}", head, ("KVM_EXIT_MMIO",),
                          f"byte load from MMIO {gpa:#x} in a loop", "read", gpa=gpa)


def rdmsr_loop(index: int = USER_MSR) -> GuestProgram:
    """RDMSR of ``index`` forever: one KVM_EXIT_X86_RDMSR per KVM_RUN (needs the VM to send
    unknown MSRs to userspace); EDX:EAX get the VMM's answer on completion."""
    a = _Asm()
    a.mov_ecx(index)
    head = a.rdmsr()
    return a.loop_program(f"rdmsr-{index:#x}", head, ("KVM_EXIT_X86_RDMSR",),
                          f"rdmsr {index:#x} in a loop", "read", msr_index=index)


def wrmsr_loop(index: int = USER_MSR, value: int = 0x0BADF00D_DEADBEEF) -> GuestProgram:
    """WRMSR of ``value`` to ``index`` forever: one KVM_EXIT_X86_WRMSR per KVM_RUN."""
    a = _Asm()
    a.mov_ecx(index)
    a.mov_eax(value & 0xFFFFFFFF)
    a.mov_edx(value >> 32)
    head = a.wrmsr()
    return a.loop_program(f"wrmsr-{index:#x}", head, ("KVM_EXIT_X86_WRMSR",),
                          f"wrmsr {index:#x} <- {value:#x} in a loop", "write",
                          msr_index=index)


def hlt_loop() -> GuestProgram:
    """HLT forever: one KVM_EXIT_HLT per KVM_RUN (no in-kernel irqchip, so KVM hands the halt
    to userspace with RIP already past it; nothing is left to complete)."""
    a = _Asm()
    head = a.hlt()
    return a.loop_program("hlt", head, ("KVM_EXIT_HLT",), "hlt in a loop", "")


# Rounds of the delay loop in :func:`delayed_out_loop`. Real mode runs instruction by instruction
# in KVM's emulator on this PVM host (no hardware real mode under PVM), about 0.7 us per `loop`:
# measured on these hosts, one round of 65535 `loop`s makes a KVM_RUN (entry to the IO exit) last
# from 14 ms (a quiet, fast host) to 66 ms (a loaded one): 4 rounds keep the run well above the
# snapshot's 5 ms head start plus the GIL's clock slack (10 ms) on the fastest host. The
# save-while-running scenario reports each run's length in its facts (run_ms_min/max). On a
# host with hardware real mode a round takes ~0.1 ms: raise the rounds there (the scenario
# fails loudly if the snapshot does not start during the run).
OUT_DELAY_ROUNDS: Final = 4
DELAY_INNER_LOOPS: Final = 0xFFFF


def delayed_out_loop(port: int = SERIAL_PORT, delay: int = OUT_DELAY_ROUNDS,
                     value: int = 0x41, heartbeat: int = HEARTBEAT_ADDR) -> GuestProgram:
    """Bump the ``heartbeat`` dword, spend ``delay`` rounds of 65535 `loop` iterations, then
    OUT of ``value`` to ``port``, forever: one KVM_EXIT_IO (direction out) per KVM_RUN, each
    KVM_RUN spending the whole delay in the guest first, so another thread can act while the
    vCPU is inside KVM_RUN (and know it is, from the heartbeat)."""
    if not 1 <= delay <= 0xFFFF:
        raise ValueError(f"delay of {delay} rounds: must be 1..65535")
    a = _Asm()
    a.mov_dx(port)
    a.mov_al(value & 0xFF)
    head = a.inc_dword(heartbeat)
    a.mov_bx(delay)
    outer = a.mov_cx(DELAY_INNER_LOOPS)
    inner = a.pos
    a.loop_short(inner)
    a.dec_bx()
    a.jnz_short(outer)
    a.out_dx(1)
    program = a.loop_program(f"delayed-out-{port:#x}", head, ("KVM_EXIT_IO",),
                             f"{delay} x {DELAY_INNER_LOOPS} loop iterations, then out dx, al "
                             f"to port {port:#x}, in a loop", "out", port=port)
    return dataclasses.replace(program, heartbeat=heartbeat)


def spin_forever(heartbeat: int | None = HEARTBEAT_ADDR) -> GuestProgram:
    """Increment the ``heartbeat`` dword in a tight loop (``None``: a bare `jmp $`), forever:
    KVM_RUN never exits on its own; only a signal (or immediate_exit) ends it, with -EINTR
    (KVM_EXIT_INTR) and nothing pending."""
    a = _Asm()
    if heartbeat is None:
        head = a.jmp_short(0)
        return GuestProgram("spin", tuple(a.insns), (), True, head, "jmp $ forever",
                            direction="")
    head = a.inc_dword(heartbeat)
    a.jmp_short(head)
    return GuestProgram("spin", tuple(a.insns), (), True, head,
                        f"inc dword [{heartbeat:#x}] forever", direction="",
                        heartbeat=heartbeat)


def sequence(port: int = SERIAL_PORT, gpa: int = MMIO_GPA, msr: int = USER_MSR) -> GuestProgram:
    """One of each exit, in order, then HLT forever (every later KVM_RUN gives KVM_EXIT_HLT)."""
    segment, offset = _real_mode_segment(gpa)
    a = _Asm()
    a.mov_dx(port)
    a.mov_al(0x41)
    a.out_dx(1)  # KVM_EXIT_IO out
    a.in_dx(1)  # KVM_EXIT_IO in
    a.mov_ax(segment)
    a.mov_es_ax()
    a.mov_al(0x42)
    a.store_es_al(offset)  # KVM_EXIT_MMIO write
    a.load_al_es(offset)  # KVM_EXIT_MMIO read
    a.mov_ecx(msr)
    a.rdmsr()  # KVM_EXIT_X86_RDMSR
    a.mov_eax(0x1234)
    a.mov_edx(0)
    a.wrmsr()  # KVM_EXIT_X86_WRMSR
    head = a.hlt()  # KVM_EXIT_HLT
    a.jmp_short(head)
    exits = ("KVM_EXIT_IO", "KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_MMIO",
             "KVM_EXIT_X86_RDMSR", "KVM_EXIT_X86_WRMSR", "KVM_EXIT_HLT")
    return GuestProgram("sequence", tuple(a.insns), exits, False, 0,
                        "out, in, MMIO write, MMIO read, rdmsr, wrmsr, then hlt forever",
                        port=port, gpa=gpa, msr_index=msr)
