"""Which kernel modules are present: the exporter's ``lsmod | grep aes``.

A loadable module is listed in /proc/modules; a built-in one never is, but shows up as
/sys/module/<name> (when it has parameters or a version), so both are consulted. A kernel built
without module support has no /proc/modules at all: that means "nothing loaded", not an error.
"""

from __future__ import annotations

from pathlib import Path

from exporter.procfs import read_text

#: modules whose presence the exporter reports (``kvmcpu_host_kernel_module_loaded``)
WATCHED_MODULES: tuple[str, ...] = ("aesni_intel", "dm_crypt", "kvm", "kvm_intel", "kvm_amd")


def parse_modules(text: str) -> set[str]:
    """Module names from /proc/modules text (first column of each line)."""
    return {line.split()[0] for line in text.splitlines() if line.split()}


def loaded_modules(procfs: Path) -> set[str]:
    path = procfs / "modules"
    if not path.exists():  # a kernel without loadable modules has no /proc/modules
        return set()
    return parse_modules(read_text(path))


def module_present(name: str, loaded: set[str], sysfs: Path) -> bool:
    """Loaded as a module or built into the kernel (``-`` and ``_`` are the same to the kernel)."""
    canonical = name.replace("-", "_")
    return canonical in loaded or (sysfs / "module" / canonical).is_dir()
