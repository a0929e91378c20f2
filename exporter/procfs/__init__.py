"""Readers for the kernel's text files under /proc and /sys.

Each reader takes the mount root (``--path.procfs``/``--path.sysfs``) rather than a fixed path so
that the exporter can run in a container with the host's /proc bind-mounted elsewhere, and tests
can point it at fixture trees. Parsers are pure functions of the text; readers add the I/O.
"""
