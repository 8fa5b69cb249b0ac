"""kvm-completion-tracer: catch vCPU state saves and restores during a pending KVM exit completion.

Flow: probes (bpf/*.c, loaded by :mod:`tracer.probes`) -> :mod:`tracer.events` (decoding)
-> :mod:`tracer.tracker` (per-vCPU mirror, policy) -> sinks (:mod:`tracer.alerts`).
"""

__version__ = "0.1.0"
