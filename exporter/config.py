"""Configuration: built-in defaults, overlaid by the YAML file, overlaid by command-line flags.

Every problem is collected and reported at once (``ConfigError.problems``) before the daemon binds
its port, so an operator fixing a fleet's config sees the whole list in one run, not one per restart.
The YAML layout mirrors the dataclasses below; ``README.md`` documents each key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from exporter.errors import ConfigError

DEFAULT_LISTEN = ":10437"
DEFAULT_STATE_DIR = "/var/lib/kvm-cpu-exporter"
DEFAULT_CACHE_DIR = "/var/cache/kvm-cpu-exporter"
SEED_CIPHERS: tuple[str, ...] = (
    "aes-ecb-plain",
    "aes-cbc-plain",
    "aes-ctr-plain",
    "aes-lrw-plain",
    "aes-pcbc-plain",
    "aes-xts-plain",
)
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("logfmt", "json")
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")


@dataclass
class WebConfig:
    listen_address: str = DEFAULT_LISTEN
    config_file: str | None = None  # exporter-toolkit web config (TLS, basic auth)
    telemetry_path: str = "/metrics"


@dataclass
class PathsConfig:
    procfs: str = "/proc"
    sysfs: str = "/sys"
    state_dir: str = DEFAULT_STATE_DIR
    cache_dir: str = DEFAULT_CACHE_DIR


@dataclass
class LogConfig:
    level: str = "info"
    format: str = "logfmt"


@dataclass
class FeaturesConfig:
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)


@dataclass
class QemuConfig:
    binary: str = "qemu-system-x86_64"
    #: accelerators to try proving, in order of preference
    accelerators: list[str] = field(default_factory=lambda: ["kvm", "tcg"])
    #: how long a proof guest or QMP probe may take before it counts as failed
    probe_timeout_seconds: float = 15.0
    #: re-probe models/accelerators this often (QEMU upgrades, module reloads)
    refresh_interval_seconds: float = 3600.0


@dataclass
class QmpSocketConfig:
    guest: str
    path: str


@dataclass
class GuestsConfig:
    #: QMP sockets the operator created for the exporter (never libvirt's own monitor)
    qmp_sockets: list[QmpSocketConfig] = field(default_factory=list)
    #: process names treated as QEMU guests (besides anything named qemu-system-*)
    process_names: list[str] = field(default_factory=lambda: ["qemu-kvm", "kvm"])
    #: also export the per-guest feature matrix (kvmcpu_guest_cpu_feature{guest,feature}...):
    #: about 2 x watched features series per guest; off by default (issue 13)
    full_feature_matrix: bool = False


@dataclass
class ProfileConfig:
    name: str
    #: QEMU -cpu spec; "auto" = host where KVM is proven, else max
    cpu: str = "auto"
    #: accelerator: "auto" (kvm when proven, else tcg), "kvm" or "tcg"
    accel: str = "auto"
    #: "none" (no NIC) or "isolated" (virtio-net on a private bridge in its own netns)
    network: str = "none"
    #: whether this profile is expected to expose AES-NI (alerts compare against it)
    expects_aesni: bool | None = None


def default_profiles() -> list[ProfileConfig]:
    return [
        ProfileConfig(name="aesni", cpu="auto", expects_aesni=True),
        ProfileConfig(name="noaesni", cpu="auto,-aes", expects_aesni=False),
    ]


@dataclass
class CanaryConfig:
    enabled: bool = True
    interval_seconds: float = 900.0
    jitter_seconds: float = 60.0
    profiles: list[ProfileConfig] = field(default_factory=default_profiles)
    ciphers: list[str] = field(default_factory=lambda: list(SEED_CIPHERS))
    size_mib: int = 64
    rounds: int = 3
    timeout_seconds: float = 300.0
    #: guest RAM in MiB; 0 = sized from the RAM disk
    memory_mib: int = 0
    #: skip a tick when the 1-minute load per core is above this
    busy_load_per_core: float = 0.8
    #: skip a tick when host CPU use (percent, sampled) is above this
    busy_cpu_percent: float = 80.0
    #: canary CPU time budget, percent of one core averaged over an hour
    duty_cycle_percent: float = 5.0
    nice: int = 19
    cpu_affinity: list[int] = field(default_factory=list)
    #: user the canary QEMU runs as when the daemon runs as root
    run_as_user: str = "nobody"
    #: explicit kernel/initramfs to use instead of the built image
    kernel: str | None = None
    initrd: str | None = None


@dataclass
class Config:
    web: WebConfig = field(default_factory=WebConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    collectors: dict[str, bool] = field(default_factory=dict)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    qemu: QemuConfig = field(default_factory=QemuConfig)
    guests: GuestsConfig = field(default_factory=GuestsConfig)
    canary: CanaryConfig = field(default_factory=CanaryConfig)

    def collector_enabled(self, name: str, default: bool = True) -> bool:
        return self.collectors.get(name, default)


# --------------------------------------------------------------------------- loading


def _build(cls: type[Any], data: Any, where: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from a mapping, recording (not raising) every problem found."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping, got {type(data).__name__}")
        return cls() if _all_defaulted(cls) else None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            problems.append(f"{where}.{key}: unknown key (known: {', '.join(sorted(fields))})")
            continue
        kwargs[name] = _convert(fields[name], value, f"{where}.{key}", problems)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for n in missing:
        problems.append(f"{where}.{n}: required")
    if missing:
        return None
    kwargs = {k: v for k, v in kwargs.items() if v is not _INVALID}
    return cls(**kwargs)


_INVALID = object()


def _all_defaulted(cls: type[Any]) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def _convert(f: dataclasses.Field[Any], value: Any, where: str, problems: list[str]) -> Any:
    typ = str(f.type)
    nested = {
        "WebConfig": WebConfig,
        "PathsConfig": PathsConfig,
        "LogConfig": LogConfig,
        "FeaturesConfig": FeaturesConfig,
        "QemuConfig": QemuConfig,
        "GuestsConfig": GuestsConfig,
        "CanaryConfig": CanaryConfig,
    }
    if typ in nested:
        built = _build(nested[typ], value, where, problems)
        return _INVALID if built is None else built
    if typ == "list[ProfileConfig]":
        return _list_of(ProfileConfig, value, where, problems)
    if typ == "list[QmpSocketConfig]":
        return _list_of(QmpSocketConfig, value, where, problems)
    if typ == "dict[str, bool]":
        if not isinstance(value, dict) or not all(isinstance(v, bool) for v in value.values()):
            problems.append(f"{where}: expected a mapping of collector name to true/false")
            return _INVALID
        return {str(k): v for k, v in value.items()}
    if typ == "bool" or typ == "bool | None":
        if value is None and typ.endswith("None"):
            return None
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true or false, got {value!r}")
            return _INVALID
        return value
    if typ == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {value!r}")
            return _INVALID
        return value
    if typ == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{where}: expected a number, got {value!r}")
            return _INVALID
        return float(value)
    if typ in ("str", "str | None"):
        if value is None and typ.endswith("None"):
            return None
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            problems.append(f"{where}: expected a string, got {value!r}")
            return _INVALID
        return str(value)
    if typ in ("list[str]", "list[int]"):
        item = int if typ == "list[int]" else str
        if not isinstance(value, list) or not all(
            isinstance(v, item) and not isinstance(v, bool) for v in value
        ):
            problems.append(f"{where}: expected a list of {item.__name__}")
            return _INVALID
        return list(value)
    raise AssertionError(f"unhandled config type {typ} at {where}")


def _list_of(cls: type[Any], value: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(value, list):
        problems.append(f"{where}: expected a list")
        return _INVALID
    out = []
    for i, item in enumerate(value):
        built = _build(cls, item, f"{where}[{i}]", problems)
        if built is not None:
            out.append(built)
    return out


def parse_config(data: Any, source: str = "config") -> tuple[Config, list[str]]:
    """Build a Config from already-parsed YAML; returns the config and the problems found."""
    problems: list[str] = []
    cfg = _build(Config, data, source, problems)
    if cfg is None:
        cfg = Config()
    return cfg, problems


def load_file(path: str | os.PathLike[str]) -> tuple[Config, list[str]]:
    """Read and parse a YAML config file; problems (including unreadable/invalid YAML) are returned."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        return Config(), [f"{p}: cannot read config file: {err.strerror or err}"]
    except UnicodeDecodeError as err:
        return Config(), [f"{p}: not UTF-8 text: {err}"]
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as err:  # RecursionError: absurdly deep nesting
        return Config(), [f"{p}: invalid YAML: {' '.join(str(err).split())}"]
    return parse_config(data, source=str(p))


def validate(cfg: Config, known_collectors: set[str] | None = None) -> list[str]:
    """Semantic checks that the type-level parse cannot do. Returns every problem found."""
    problems: list[str] = []
    try:
        parse_listen_address(cfg.web.listen_address)
    except ValueError as err:
        problems.append(f"web.listen_address: {err}")
    if not cfg.web.telemetry_path.startswith("/"):
        problems.append("web.telemetry_path: must start with '/'")
    if cfg.web.config_file is not None:
        if not Path(cfg.web.config_file).is_file():
            problems.append(f"web.config_file: {cfg.web.config_file}: no such file")
        else:
            # checked here too so that one run lists config-file and web-config problems together
            from exporter.webconfig import load_web_config

            try:
                load_web_config(cfg.web.config_file)
            except ConfigError as err:
                problems += [f"web.config_file: {p}" for p in err.problems]
    if cfg.log.level not in LOG_LEVELS:
        problems.append(f"log.level: {cfg.log.level!r} is not one of {', '.join(LOG_LEVELS)}")
    if cfg.log.format not in LOG_FORMATS:
        problems.append(f"log.format: {cfg.log.format!r} is not one of {', '.join(LOG_FORMATS)}")
    for key in ("procfs", "sysfs"):
        value = getattr(cfg.paths, key)
        if not Path(value).is_dir():
            problems.append(f"paths.{key}: {value}: not a directory")
    if known_collectors is not None:
        for name in cfg.collectors:
            if name not in known_collectors:
                problems.append(
                    f"collectors.{name}: unknown collector (known: {', '.join(sorted(known_collectors))})"
                )
    for accel in cfg.qemu.accelerators:
        if accel not in ("kvm", "tcg"):
            problems.append(f"qemu.accelerators: {accel!r} is not kvm or tcg")
    if cfg.qemu.probe_timeout_seconds <= 0:
        problems.append("qemu.probe_timeout_seconds: must be > 0")
    if cfg.qemu.refresh_interval_seconds <= 0:
        problems.append("qemu.refresh_interval_seconds: must be > 0")
    c = cfg.canary
    if c.interval_seconds <= 0:
        problems.append("canary.interval_seconds: must be > 0")
    if c.jitter_seconds < 0:
        problems.append("canary.jitter_seconds: must be >= 0")
    if not 1 <= c.size_mib <= 65536:
        problems.append("canary.size_mib: must be between 1 and 65536")
    if not 1 <= c.rounds <= 100:
        problems.append("canary.rounds: must be between 1 and 100")
    if c.timeout_seconds <= 0:
        problems.append("canary.timeout_seconds: must be > 0")
    if c.memory_mib < 0:
        problems.append("canary.memory_mib: must be >= 0")
    if not 0 < c.duty_cycle_percent <= 100:
        problems.append("canary.duty_cycle_percent: must be in (0, 100]")
    if c.busy_load_per_core < 0:
        problems.append("canary.busy_load_per_core: must be >= 0")
    if not 0 <= c.busy_cpu_percent <= 100:
        problems.append("canary.busy_cpu_percent: must be between 0 and 100")
    if not -20 <= c.nice <= 19:
        problems.append("canary.nice: must be between -20 and 19")
    if not c.ciphers:
        problems.append("canary.ciphers: at least one cipher is needed")
    for cipher in c.ciphers:
        if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+){1,3}", cipher):
            problems.append(f"canary.ciphers: {cipher!r} is not a cryptsetup cipher spec like aes-xts-plain")
    seen: set[str] = set()
    for i, prof in enumerate(c.profiles):
        where = f"canary.profiles[{i}]"
        if not _PROFILE_NAME.match(prof.name):
            problems.append(f"{where}.name: {prof.name!r} is not a valid profile name")
        if prof.name in seen:
            problems.append(f"{where}.name: duplicate profile {prof.name!r}")
        seen.add(prof.name)
        if prof.accel not in ("auto", "kvm", "tcg"):
            problems.append(f"{where}.accel: {prof.accel!r} is not auto, kvm or tcg")
        if prof.network not in ("none", "isolated"):
            problems.append(f"{where}.network: {prof.network!r} is not none or isolated")
        if not re.fullmatch(r"[A-Za-z0-9_.+=,-]+", prof.cpu):
            problems.append(f"{where}.cpu: {prof.cpu!r} is not a QEMU -cpu spec")
    for key in ("kernel", "initrd"):
        value = getattr(c, key)
        if value is not None and not Path(value).is_file():
            problems.append(f"canary.{key}: {value}: no such file")
    if (c.kernel is None) != (c.initrd is None):
        problems.append("canary.kernel and canary.initrd: give both or neither")
    for i, sock in enumerate(cfg.guests.qmp_sockets):
        if not sock.guest:
            problems.append(f"guests.qmp_sockets[{i}].guest: must not be empty")
    return problems


def parse_listen_address(addr: str) -> tuple[str, int]:
    """``:10437`` / ``127.0.0.1:10437`` / ``[::1]:10437`` -> (host, port); host "" means all."""
    if addr.startswith("["):
        host, sep, port = addr[1:].partition("]:")
        if not sep:
            raise ValueError(f"{addr!r}: expected [host]:port")
    else:
        host, sep, port = addr.rpartition(":")
        if not sep:
            raise ValueError(f"{addr!r}: expected host:port or :port")
    try:
        num = int(port)
    except ValueError:
        raise ValueError(f"{addr!r}: port {port!r} is not a number") from None
    if not 0 <= num <= 65535:
        raise ValueError(f"{addr!r}: port {num} out of range")
    return host, num
