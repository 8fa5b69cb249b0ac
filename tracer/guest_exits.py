"""Names of hardware exit reasons as the ``kvm:kvm_exit`` tracepoint reports them.

VMX: the basic exit reasons of ``<asm/vmx.h>`` (EXIT_REASON_*); SVM: the exit codes of
``<asm/svm.h>`` (SVM_EXIT_*), both UAPI. tests/unit/test_abi_headers.py compares these tables
with the installed headers through the C compiler.
"""

from __future__ import annotations

from typing import Final

ISA_NAMES: Final = {1: "vmx", 2: "svm"}  # kvm_exit's isa field (KVM_ISA_VMX, KVM_ISA_SVM)

VMX_EXIT_REASONS: Final = {
    0: "EXCEPTION_NMI", 1: "EXTERNAL_INTERRUPT", 2: "TRIPLE_FAULT", 3: "INIT_SIGNAL",
    4: "SIPI_SIGNAL", 7: "INTERRUPT_WINDOW", 8: "NMI_WINDOW", 9: "TASK_SWITCH", 10: "CPUID",
    12: "HLT", 13: "INVD", 14: "INVLPG", 15: "RDPMC", 16: "RDTSC", 18: "VMCALL", 19: "VMCLEAR",
    20: "VMLAUNCH", 21: "VMPTRLD", 22: "VMPTRST", 23: "VMREAD", 24: "VMRESUME", 25: "VMWRITE",
    26: "VMOFF", 27: "VMON", 28: "CR_ACCESS", 29: "DR_ACCESS", 30: "IO_INSTRUCTION",
    31: "MSR_READ", 32: "MSR_WRITE", 33: "INVALID_STATE", 34: "MSR_LOAD_FAIL",
    36: "MWAIT_INSTRUCTION", 37: "MONITOR_TRAP_FLAG", 39: "MONITOR_INSTRUCTION",
    40: "PAUSE_INSTRUCTION", 41: "MCE_DURING_VMENTRY", 43: "TPR_BELOW_THRESHOLD",
    44: "APIC_ACCESS", 45: "EOI_INDUCED", 46: "GDTR_IDTR", 47: "LDTR_TR", 48: "EPT_VIOLATION",
    49: "EPT_MISCONFIG", 50: "INVEPT", 51: "RDTSCP", 52: "PREEMPTION_TIMER", 53: "INVVPID",
    54: "WBINVD", 55: "XSETBV", 56: "APIC_WRITE", 57: "RDRAND", 58: "INVPCID", 59: "VMFUNC",
    60: "ENCLS", 61: "RDSEED", 62: "PML_FULL", 63: "XSAVES", 64: "XRSTORS", 67: "UMWAIT",
    68: "TPAUSE", 74: "BUS_LOCK", 75: "NOTIFY",
}

SVM_EXIT_REASONS: Final = {
    0x000: "READ_CR0", 0x003: "READ_CR3", 0x004: "READ_CR4", 0x008: "READ_CR8",
    0x010: "WRITE_CR0", 0x013: "WRITE_CR3", 0x014: "WRITE_CR4", 0x018: "WRITE_CR8",
    0x060: "INTR", 0x061: "NMI", 0x062: "SMI", 0x063: "INIT", 0x064: "VINTR",
    0x065: "CR0_SEL_WRITE", 0x072: "CPUID", 0x073: "RSM", 0x074: "IRET", 0x075: "SWINT",
    0x076: "INVD", 0x077: "PAUSE", 0x078: "HLT", 0x079: "INVLPG", 0x07a: "INVLPGA", 0x07b: "IOIO",
    0x07c: "MSR", 0x07d: "TASK_SWITCH", 0x07e: "FERR_FREEZE", 0x07f: "SHUTDOWN", 0x080: "VMRUN",
    0x081: "VMMCALL", 0x082: "VMLOAD", 0x083: "VMSAVE", 0x084: "STGI", 0x085: "CLGI",
    0x086: "SKINIT", 0x087: "RDTSCP", 0x088: "ICEBP", 0x089: "WBINVD", 0x08a: "MONITOR",
    0x08b: "MWAIT", 0x08c: "MWAIT_COND", 0x08d: "XSETBV", 0x08e: "RDPRU", 0x400: "NPF",
    0x401: "AVIC_INCOMPLETE_IPI", 0x402: "AVIC_UNACCELERATED_ACCESS", 0x403: "VMGEXIT",
}
SVM_EXIT_EXCP_BASE: Final = 0x040  # SVM_EXIT_EXCP_BASE + vector, for the 32 exception vectors


def guest_exit_name(isa: int, reason: int) -> tuple[str, str]:
    """(isa name, reason name) for one kvm_exit; unknown values keep their number."""
    isa_name = ISA_NAMES.get(isa, str(isa))
    if isa_name == "svm":
        if SVM_EXIT_EXCP_BASE <= reason < SVM_EXIT_EXCP_BASE + 32:
            return isa_name, f"EXCP_{reason - SVM_EXIT_EXCP_BASE}"
        return isa_name, SVM_EXIT_REASONS.get(reason, f"0x{reason:x}")
    if isa_name == "vmx":
        basic = reason & 0xFFFF  # the high bits are flags (e.g. failed VM entry)
        return isa_name, VMX_EXIT_REASONS.get(basic, str(basic))
    return isa_name, str(reason)
