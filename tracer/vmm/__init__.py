"""A small pure-Python KVM VMM that exercises the tracer with real exits on /dev/kvm.

- :mod:`tracer.vmm.kvm`: typed bindings (Kvm, Vm, Vcpu) that log every vCPU ioctl they issue;
- :mod:`tracer.vmm.guest`: hand-assembled real-mode programs, one exit kind each;
- :mod:`tracer.vmm.snapshot`: a Firecracker-like save/restore sequence;
- :mod:`tracer.vmm.scenarios`: correct and buggy VMM behaviours, each reporting the violations
  a tracer must see (:mod:`tracer.vmm.report`);
- ``python -m tracer.vmm SCENARIO``: run one and write its report as JSON.
"""
