"""Fakes shared by the unit tests of the tracker's sinks: a ProcView that names VMs from a
table, and tracer.metrics.ProbeStats over tracer.model.ProbeModel."""

from __future__ import annotations

from tracer.counters import VcpuEntry
from tracer.midcounts import MidKey
from tracer.model import ProbeModel
from tracer.vmident import VmIdentity

EXPECTED = ("raw:kvm_userspace_exit", "syscalls:sys_enter_ioctl")


class NamedProc:
    def __init__(self, names: dict[int, str]) -> None:
        self.names = names

    def identify(self, pid: int) -> VmIdentity:
        return VmIdentity(name=self.names.get(pid, f"vm-{pid}"), vmm="qemu", uuid=None,
                          source="test")

    def resolve_fd(self, pid: int, fd: int) -> int | None:
        return None

    def run_addr(self, pid: int, vcpu_id: int) -> int | None:
        return None

    def start_time(self, pid: int) -> int | None:
        return 1

    def alive(self, pid: int, start_time: int) -> bool:
        return True


class ModelProbes:
    """tracer.metrics.ProbeStats over the model; ``fail`` makes every map read raise."""

    def __init__(self, model: ProbeModel) -> None:
        self.model = model
        self.fail = False
        self.guest: dict[tuple[int, int, int, int], int] = {}
        self.lost = 2  # kernel's lost_violation counter: the budget for reports never seen

    def vcpu_entries(self) -> list[VcpuEntry]:
        if self.fail:
            raise OSError("map read failed")
        return [VcpuEntry(v.uid, v.pid, v.vcpu_id, v.state.value, v.counters, v.pending_since)
                for v in self.model.vcpus.values()]

    def counters(self) -> dict[str, int]:
        return {"lost_violation": self.lost, "vcpu_map_full": 0, "untracked_exits": 7,
                "stack_map_full": 4, "stack_failed": 1, "user_stack_failed": 2,
                "lost_window_map_full": 5,
                "user_stack_dropped": 3}

    def guest_exit_counts(self) -> dict[tuple[int, int, int, int], int]:
        return self.guest

    def mid_counts(self) -> dict[MidKey, int]:
        return self.model.mid_counts()

    def attached(self) -> list[str]:
        return list(EXPECTED[:1])
