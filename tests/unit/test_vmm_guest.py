"""Pure checks of the built-in VMM: guest machine code, report classification, CLI errors."""

from __future__ import annotations

import struct

import pytest

from tracer import abi
from tracer.vmm import __main__ as cli
from tracer.vmm import guest, scenarios
from tracer.vmm.guest import GuestProgram
from tracer.vmm.kvm import Kvm, KvmUnavailableError, MidCompletionIoctl, PendingExit, PioExit
from tracer.vmm.report import ScenarioReport, VcpuInfo, sanction_rule, split_expectations

# An independent length decoder for the few 16-bit encodings the programs may use:
# opcode bytes (after an optional 0x66 / 0x26 prefix) -> immediate/displacement bytes.
_OPERAND_BYTES = {
    b"\xb8": 2, b"\xb9": 2, b"\xba": 2,  # mov r16, imm16 (imm32 with 0x66)
    b"\xbb": 2,  # mov bx, imm16
    b"\x4b": 0,  # dec bx
    b"\xe2": 1, b"\x75": 1,  # loop rel8 / jnz rel8
    b"\xff\x06": 2,  # inc word/dword [disp16]
    b"\xb0": 1,  # mov al, imm8
    b"\x8e\xc0": 0,  # mov es, ax
    b"\xee": 0, b"\xef": 0, b"\xec": 0, b"\xed": 0,  # out/in with dx
    b"\xe6": 1, b"\xe7": 1,  # out imm8, al/ax
    b"\xa0": 2, b"\xa2": 2,  # mov al, [moffs16] / mov [moffs16], al
    b"\x0f\x30": 0, b"\x0f\x32": 0,  # wrmsr / rdmsr
    b"\xf4": 0,  # hlt
    b"\xbe": 2,  # mov si, imm16
    b"\xbf": 2,  # mov di, imm16
    b"\xf3\x6c": 0,  # rep insb
    b"\xf3\x6e": 0,  # rep outsb
    b"\xeb": 1,  # jmp rel8
}


def _decode(code: bytes) -> list[tuple[int, bytes]]:
    """(offset, instruction bytes) for the whole program; fails on anything unexpected."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(code):
        start = pos
        prefixes = b""
        while code[pos] in (0x66, 0x26):
            prefixes += code[pos : pos + 1]
            pos += 1
        for opcode, operand in _OPERAND_BYTES.items():
            if code[pos:].startswith(opcode):
                if opcode in (b"\xb8", b"\xb9", b"\xba") and b"\x66" in prefixes:
                    operand = 4
                pos += len(opcode) + operand
                break
        else:
            raise AssertionError(f"unknown opcode {code[pos]:#x} at offset {pos}")
        out.append((start, code[start:pos]))
    assert pos == len(code), "last instruction runs past the end"
    return out


LOOP_PROGRAMS = [
    guest.out_loop(),
    guest.out_loop(port=guest.PORT_7E, value=1, size=2),
    guest.out_loop(size=4),
    guest.in_loop(),
    guest.in_loop(size=2),
    guest.mmio_write_loop(),
    guest.mmio_read_loop(),
    guest.rdmsr_loop(),
    guest.wrmsr_loop(),
    guest.hlt_loop(),
]


OTHER_PROGRAMS = [guest.sequence(), guest.delayed_out_loop(), guest.delayed_out_loop(delay=3),
                  guest.rep_ins_loop(), guest.rep_outs_loop(),
                  guest.spin_forever(), guest.spin_forever(heartbeat=None)]


@pytest.mark.parametrize("program", [*LOOP_PROGRAMS, *OTHER_PROGRAMS], ids=lambda p: p.name)
def test_program_decodes_and_matches_its_listing(program: GuestProgram) -> None:
    decoded = _decode(program.code)
    assert [(i.offset, i.code) for i in program.instructions] == decoded
    assert len(program.listing().splitlines()) == len(decoded)
    assert len(program.code) < 0x100  # multi packs one program per 256 bytes


@pytest.mark.parametrize("program", LOOP_PROGRAMS, ids=lambda p: p.name)
def test_loop_jumps_back_to_the_exiting_instruction(program: GuestProgram) -> None:
    decoded = _decode(program.code)
    last_offset, last = decoded[-1]
    assert last[0] == 0xEB, "loop programs end in jmp short"
    (rel,) = struct.unpack("<b", last[1:2])
    target = last_offset + 2 + rel
    assert target == program.loop_head
    assert target in {off for off, _ in decoded}
    head = dict(decoded)[target]
    exiting = {b"\xee", b"\xef", b"\x66\xef", b"\xec", b"\xed", b"\x66\xed", b"\x0f\x32",
               b"\x0f\x30", b"\xf4"}
    assert head in exiting or head[:2] in (b"\x26\xa2", b"\x26\xa0")
    assert program.loops and len(program.exits) == 1


def test_known_encodings() -> None:
    # mov dx, 0x3f8; mov eax, 0x41; out dx, al; jmp -3
    assert guest.out_loop().code == bytes.fromhex("baf803 66b841000000 ee ebfd")
    # mov dx, 0x3f8; in al, dx; jmp -3
    assert guest.in_loop().code == bytes.fromhex("baf803 ec ebfd")
    # mov ax, 0x2000; mov es, ax; mov al, [es:0]; jmp -6
    assert guest.mmio_read_loop().code == bytes.fromhex("b80020 8ec0 26a00000 ebfa")
    # mov ecx, 0x12345678; rdmsr; jmp -4
    assert guest.rdmsr_loop().code == bytes.fromhex("66b978563412 0f32 ebfc")
    assert guest.hlt_loop().code == bytes.fromhex("f4 ebfd")
    assert guest.out_loop(port=0x7E, size=2).code.endswith(bytes.fromhex("ef ebfd"))
    # mov dx, 0x3f8; head: mov cx, 4; mov di, 0xe00; rep insb; jmp head
    assert guest.rep_ins_loop().code == bytes.fromhex("baf803 b90400 bf000e f36c ebf6")
    # mov dx, 0x3f8; head: mov cx, 4; mov si, 0xe00; rep outsb; jmp head
    assert guest.rep_outs_loop().code == bytes.fromhex("baf803 b90400 be000e f36e ebf6")


def _rel8_target(decoded: list[tuple[int, bytes]], offset: int) -> int:
    code = dict(decoded)[offset]
    (rel,) = struct.unpack("<b", code[-1:])
    return offset + len(code) + rel


def test_delayed_out_loop() -> None:
    # mov dx, 0x3f8; mov al, 0x41; head: inc dword [0xf00]; mov bx, 4; outer: mov cx, 0xffff;
    # inner: loop inner; dec bx; jnz outer; out dx, al; jmp head
    program = guest.delayed_out_loop()
    assert program.code == bytes.fromhex(
        "baf803 b041 66ff06000f bb0400 b9ffff e2fe 4b 75f8 ee ebed")
    assert guest.OUT_DELAY_ROUNDS == 4 and guest.DELAY_INNER_LOOPS == 0xFFFF
    decoded = _decode(program.code)
    offsets = [off for off, _ in decoded]
    head, bx, outer, inner, dec, jnz, out, jmp = offsets[2:]
    assert program.loop_head == head and program.loops and program.exits == ("KVM_EXIT_IO",)
    assert program.heartbeat == guest.HEARTBEAT_ADDR
    assert dict(decoded)[head] == b"\x66\xff\x06" + struct.pack("<H", guest.HEARTBEAT_ADDR)
    assert _rel8_target(decoded, jmp) == head  # each KVM_RUN beats, then runs the whole delay
    assert _rel8_target(decoded, inner) == inner  # loop $ (CX times)
    assert _rel8_target(decoded, jnz) == outer and bx < outer
    assert dict(decoded)[out] == b"\xee" and dec < jnz < out < jmp
    assert (program.port, program.direction) == (guest.SERIAL_PORT, "out")
    assert guest.delayed_out_loop(port=0x80, delay=0x1234, heartbeat=0xE00).code == (
        bytes.fromhex("ba8000 b041 66ff06000e bb3412 b9ffff e2fe 4b 75f8 ee ebed"))
    for bad in (0, 0x10000):
        with pytest.raises(ValueError):
            guest.delayed_out_loop(delay=bad)


def test_spin_forever() -> None:
    bare = guest.spin_forever(heartbeat=None)
    assert bare.code == bytes.fromhex("ebfe")  # jmp $
    assert bare.exits == () and bare.loops and bare.loop_head == 0 and bare.heartbeat is None
    beating = guest.spin_forever()
    # l: inc dword [0xf00]; jmp l
    assert beating.code == bytes.fromhex("66ff06000f ebf9")
    assert beating.exits == () and beating.loop_head == 0
    assert beating.heartbeat == guest.HEARTBEAT_ADDR


def test_heartbeat_is_plain_memory() -> None:
    """Inside the only slot, clear of every program (several vCPUs load at 0x1000 + 0x100 n)."""
    assert guest.HEARTBEAT_ADDR >= 0x500 and guest.HEARTBEAT_ADDR + 4 <= guest.LOAD_ADDR
    assert guest.HEARTBEAT_ADDR + 4 <= guest.MEMORY_SIZE


def test_program_access_metadata() -> None:
    assert guest.out_loop(port=0x7E).port == 0x7E
    assert guest.mmio_write_loop(0x30010).gpa == 0x30010
    assert guest.mmio_write_loop(0x30010).code.startswith(bytes.fromhex("b80130"))  # es=0x3001
    assert guest.wrmsr_loop().msr_index == guest.USER_MSR
    assert guest.USER_MSR not in range(0x4B564D00, 0x4B564E00)  # PVM's own MSRs #GP
    assert guest.MMIO_GPA >= guest.MEMORY_SIZE  # outside the only memory slot
    moved = guest.in_loop().at(0x1300)
    assert moved.load_addr == 0x1300 and moved.code == guest.in_loop().code
    assert moved.listing().startswith("1300:")
    with pytest.raises(ValueError):
        guest.mmio_read_loop(0x200000)  # beyond real-mode reach
    seq = guest.sequence()
    assert seq.exits[-1] == "KVM_EXIT_HLT" and not seq.loops


def _record(kind: str, port: int, direction: str = "out", *, quirk_off: bool = False,
            reason: int = abi.KVM_EXIT_IO) -> MidCompletionIoctl:
    pending = PendingExit(reason, PioExit(port, direction, 1, 1, 4096), 10)
    name = "KVM_GET_REGS" if kind == "save" else "KVM_SET_REGS"
    return MidCompletionIoctl(20, 1, 5, 4, 0, name, kind, pending, quirk_off)


def test_sanction_rules() -> None:
    assert sanction_rule(_record("save", 0x7E)) == "port-0x7e"
    assert sanction_rule(_record("restore", 0x7E)) == "port-0x7e"
    assert sanction_rule(_record("save", 0x7E, quirk_off=True)) is None
    assert sanction_rule(_record("restore", 0x7E, quirk_off=True)) == "restore-after-pio"
    assert sanction_rule(_record("save", 0x7E, "in")) is None  # the quirk is for OUT only
    assert sanction_rule(_record("save", 0x3F8)) is None
    assert sanction_rule(_record("restore", 0x3F8, "in")) is None  # KVM writes into the restore
    assert sanction_rule(_record("restore", 0x3F8, "out")) == "restore-after-pio"
    mmio = MidCompletionIoctl(20, 1, 5, 4, 0, "KVM_SET_REGS", "restore",
                              PendingExit(abi.KVM_EXIT_MMIO, None, 10), False)
    assert sanction_rule(mmio) is None
    violations, sanctioned, _ = split_expectations([_record("save", 0x3F8), _record("save", 0x7E)])
    assert [v.port for v in violations] == [0x3F8] and violations[0].rule is None
    assert [(v.port, v.rule) for v in sanctioned] == [(0x7E, "port-0x7e")]


def test_report_json_round_trip() -> None:
    violations, sanctioned, _ = split_expectations([_record("save", 0x3F8), _record("save", 0x7E)])
    report = ScenarioReport(
        scenario="x", pid=1, iterations=1, violations=violations, sanctioned=sanctioned,
        exits={"KVM_EXIT_IO": 1}, completions=0,
        vcpus=[VcpuInfo(4, 0, 5, "out-0x3f8", True, 1, None, [6], [1])],
        pending_at_end=[], started_ns=1, finished_ns=3,
    )
    again = ScenarioReport.from_json(report.to_json())
    assert again == report
    assert report.to_dict()["elapsed_ns"] == 2


def test_missing_kvm_is_a_clean_error() -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist"):
        Kvm("/nonexistent/kvm")


def test_cli_reports_missing_kvm_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    def no_kvm(*args: object, **kwargs: object) -> ScenarioReport:
        raise KvmUnavailableError("/dev/kvm does not exist: no KVM on this machine")

    monkeypatch.setattr(cli, "run_scenario", no_kvm)
    assert cli.main(["correct-io"]) == cli.EXIT_NO_KVM
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "/dev/kvm" in err


def test_cli_list_names_every_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(scenarios.SCENARIOS)
    assert {"correct-io", "buggy-other-thread", "port-7e-quirk-disabled", "dup-fd", "fd-reuse",
            "multi", "loop-io", "process-exit"} <= set(listed)


def test_unknown_scenario() -> None:
    with pytest.raises(KeyError):
        scenarios.run_scenario("nope")
