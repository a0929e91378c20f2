"""kvm-cpu-exporter: what CPU features a KVM/QEMU host has, which its guests get, and what AES-NI is worth."""

__version__ = "0.1.0"
