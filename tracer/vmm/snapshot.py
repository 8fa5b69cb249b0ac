"""A Firecracker-like vCPU snapshot: which state ioctls, in which order.

The save side follows the order Firecracker's x86 ``save_state`` issues (facts file), less
KVM_GET_LAPIC, which needs an in-kernel irqchip this VMM must not create (HLT would stop
exiting). The restore side writes back everything the VMM can write back unchanged; CPUID and
the TSC frequency are not restored because KVM refuses to change them once the vCPU has run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from tracer.vmm import structs
from tracer.vmm.kvm import Vcpu

# One MSR is enough to make GET_MSRS/SET_MSRS real; SYSENTER_CS exists on every x86 vCPU and
# writing its own value back is harmless.
SNAPSHOT_MSR: Final = 0x174

SAVE_IOCTLS: Final = (
    "KVM_GET_MP_STATE",
    "KVM_GET_REGS",
    "KVM_GET_SREGS",
    "KVM_GET_XSAVE",
    "KVM_GET_XCRS",
    "KVM_GET_DEBUGREGS",
    "KVM_GET_TSC_KHZ",
    "KVM_GET_VCPU_EVENTS",
    "KVM_GET_MSRS",
    "KVM_GET_CPUID2",
)
RESTORE_IOCTLS: Final = (
    "KVM_SET_SREGS",
    "KVM_SET_XSAVE",
    "KVM_SET_REGS",
    "KVM_SET_XCRS",
    "KVM_SET_DEBUGREGS",
    "KVM_SET_MP_STATE",
    "KVM_SET_VCPU_EVENTS",
    "KVM_SET_MSRS",
)


@dataclass
class Snapshot:
    mp_state: int
    regs: structs.Regs
    sregs: structs.Sregs
    xsave: structs.Xsave
    xcrs: structs.Xcrs
    debugregs: structs.DebugRegs
    tsc_khz: int
    events: structs.VcpuEvents
    msr_value: int
    cpuid_entries: int


def save(vcpu: Vcpu) -> Snapshot:
    """Issue exactly :data:`SAVE_IOCTLS`, in that order."""
    mp_state = vcpu.get_mp_state()
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    xsave = vcpu.get_xsave()
    xcrs = vcpu.get_xcrs()
    debugregs = vcpu.get_debugregs()
    tsc_khz = vcpu.get_tsc_khz()
    events = vcpu.get_vcpu_events()
    msr_value = vcpu.get_msr(SNAPSHOT_MSR)
    cpuid = vcpu.get_cpuid2()
    return Snapshot(mp_state, regs, sregs, xsave, xcrs, debugregs, tsc_khz, events, msr_value,
                    int(cpuid.nent))


def restore(vcpu: Vcpu, snap: Snapshot) -> None:
    """Issue exactly :data:`RESTORE_IOCTLS`, in that order."""
    vcpu.set_sregs(snap.sregs)
    vcpu.set_xsave(snap.xsave)
    vcpu.set_regs(snap.regs)
    vcpu.set_xcrs(snap.xcrs)
    vcpu.set_debugregs(snap.debugregs)
    vcpu.set_mp_state(snap.mp_state)
    vcpu.set_vcpu_events(snap.events)
    vcpu.set_msr(SNAPSHOT_MSR, snap.msr_value)
