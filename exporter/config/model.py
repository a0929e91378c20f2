"""The configuration schema: one typed model per YAML section, with the metadata flags are made from.

Each field carries its type, range, help text and (for the ones with a command-line flag) a
``Flag`` marker, so the YAML validator, the ``--help`` text and the flag parser are generated from
one description and cannot drift. The models are pydantic v2 dataclasses: pydantic reports every
problem with its location in one pass (``canary.profiles[1].name: required``), and dataclasses keep
the plain ``ProfileConfig("aesni")`` construction the rest of the code and its tests use.

Every number is finite (``.nan``/``.inf`` in YAML and ``nan`` on the command line are refused) and
bounded, so nothing downstream can meet an interval the scheduler cannot turn into a timestamp.
Checks that depend on the host (files, CPUs, users) are in ``exporter.config.checks``.

About 370 lines, one job: the schema is read as one document (the sections nest into ``Config``,
the field helpers are shared), and most of its lines are field declarations with their help text.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, Strict, StrictBool, StrictInt
from pydantic.dataclasses import dataclass

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
#: the cryptsetup cipher spec the canary accepts (``aes-xts-plain``); the one copy of this rule
CIPHER_SPEC = re.compile(r"[a-z0-9]+(-[a-z0-9]+){1,3}")
_PROFILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")
_CPU_SPEC = re.compile(r"[A-Za-z0-9_.+=,-]+")
#: reserved key of the ``collectors`` mapping: only collectors named explicitly run
DISABLE_DEFAULTS = "disable_defaults"
YEAR = 366 * 86400.0


@dataclasses.dataclass(frozen=True)
class Flag:
    """Marks a field as settable from the command line as ``--<name>``.

    ``common`` flags exist on every subcommand (where to look, how to log); the others on
    ``serve`` only. Booleans get ``--name`` and ``--no-name``.
    """

    name: str
    metavar: str | None = None
    common: bool = False


_MODEL = ConfigDict(
    extra="forbid",
    allow_inf_nan=False,
    # YAML may spell keys with dashes (listen-address) as the flags do
    alias_generator=lambda name: name.replace("_", "-"),
    validate_by_name=True,
    validate_by_alias=True,
    loc_by_alias=False,
)


def _number_to_str(value: Any) -> Any:
    """YAML reads ``name: 486`` as an int; a string field takes it as the text it was."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def _matches(pattern: re.Pattern[str], what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"{value!r} is not {what}")
        return value

    return check


def _listen_address(value: str) -> str:
    parse_listen_address(value)  # ValueError says what is wrong
    return value


def _absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} must start with '/'")
    return value


Text = Annotated[str, Strict(), BeforeValidator(_number_to_str)]
OptText = Annotated[str | None, BeforeValidator(_number_to_str)]
Number = Annotated[float, Strict()]


def number(
    default: float,
    help: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    flag: Flag | None = None,
) -> Any:
    """A finite float field with its range and help text (the flag's help and the YAML docs)."""
    return Field(default, gt=gt, ge=ge, le=le, description=help, json_schema_extra=_extra(flag))


def integer(
    default: int, help: str, *, ge: int | None = None, le: int | None = None, flag: Flag | None = None
) -> Any:
    return Field(default, ge=ge, le=le, description=help, json_schema_extra=_extra(flag))


def setting(
    default: Any = dataclasses.MISSING, help: str = "", *, flag: Flag | None = None, factory: Any = None
) -> Any:
    if factory is not None:
        return Field(default_factory=factory, description=help, json_schema_extra=_extra(flag))
    if default is dataclasses.MISSING:
        return Field(description=help, json_schema_extra=_extra(flag))
    return Field(default, description=help, json_schema_extra=_extra(flag))


def _extra(flag: Flag | None) -> dict[str, Any] | None:
    # stored as plain JSON-able data in the field's metadata; exporter.config.flags reads it back
    if flag is None:
        return None
    return {"flag": flag.name, "metavar": flag.metavar, "common": flag.common}


@dataclass(config=_MODEL)
class WebConfig:
    listen_address: Annotated[Text, AfterValidator(_listen_address)] = setting(
        DEFAULT_LISTEN,
        "address to listen on: host:port, :port (every address) or [v6addr]:port",
        flag=Flag("web.listen-address", "ADDR"),
    )
    config_file: OptText = setting(
        None, "exporter-toolkit web config file: TLS and basic auth", flag=Flag("web.config.file", "FILE")
    )
    telemetry_path: Annotated[Text, AfterValidator(_absolute_path)] = setting(
        "/metrics", "path under which to expose metrics", flag=Flag("web.telemetry-path", "PATH")
    )
    max_requests: StrictInt = integer(
        40,
        "parallel /metrics and / requests served at once; more get 503 (0 = unlimited)",
        ge=0,
        le=100000,
        flag=Flag("web.max-requests", "N"),
    )
    disable_exporter_metrics: StrictBool = setting(
        False,
        "leave out the exporter's own process_*, python_* and kvmcpu_http_* metrics",
        flag=Flag("web.disable-exporter-metrics"),
    )


@dataclass(config=_MODEL)
class PathsConfig:
    procfs: Text = setting("/proc", "procfs mountpoint", flag=Flag("path.procfs", "DIR", common=True))
    sysfs: Text = setting("/sys", "sysfs mountpoint", flag=Flag("path.sysfs", "DIR", common=True))
    state_dir: Text = setting(
        DEFAULT_STATE_DIR, "where canary results are kept", flag=Flag("path.state-dir", "DIR", common=True)
    )
    cache_dir: Text = setting(
        DEFAULT_CACHE_DIR, "where the canary image is built", flag=Flag("path.cache-dir", "DIR", common=True)
    )


@dataclass(config=_MODEL)
class LogConfig:
    level: Literal["debug", "info", "warn", "error"] = setting(
        "info", "log level: debug, info, warn, error", flag=Flag("log.level", "LEVEL", common=True)
    )
    format: Literal["logfmt", "json"] = setting(
        "logfmt", "log format: logfmt or json", flag=Flag("log.format", "FORMAT", common=True)
    )


@dataclass(config=_MODEL)
class FeaturesConfig:
    include: list[Text] = setting(help="CPU features to watch besides the built-in list", factory=list)
    exclude: list[Text] = setting(help="CPU features not to watch", factory=list)


@dataclass(config=_MODEL)
class QemuConfig:
    binary: Text = setting(
        "qemu-system-x86_64", "QEMU system emulator to use", flag=Flag("qemu.binary", "PATH", common=True)
    )
    accelerators: list[Literal["kvm", "tcg"]] = setting(
        help="accelerators to try proving, in order of preference", factory=lambda: ["kvm", "tcg"]
    )
    probe_timeout_seconds: Number = number(
        15.0, "how long a proof guest or QMP probe may take before it counts as failed", gt=0, le=3600
    )
    refresh_interval_seconds: Number = number(
        3600.0, "re-probe models and accelerators this often (QEMU upgrades, module reloads)", gt=0, le=YEAR
    )
    model_catalog: StrictBool = setting(
        False,
        "also export QEMU's CPU model catalog (kvmcpu_cpu_model_info, _x86_64_level, _features, _rank; "
        "about 350 series, the same on every host with the same QEMU): turn it on on one or two hosts "
        "per QEMU version, the fleet rules read it from there (docs/fleet.md)",
        flag=Flag("qemu.model-catalog"),
    )


@dataclass(config=_MODEL)
class QmpSocketConfig:
    guest: Annotated[Text, Field(min_length=1)]
    path: Text


@dataclass(config=_MODEL)
class GuestsConfig:
    qmp_sockets: list[QmpSocketConfig] = setting(
        help="QMP sockets the operator created for the exporter (never libvirt's own monitor)", factory=list
    )
    process_names: list[Text] = setting(
        help="process names treated as QEMU guests besides qemu-system-*", factory=lambda: ["qemu-kvm", "kvm"]
    )
    full_feature_matrix: StrictBool = setting(
        False,
        help="also export the per-guest feature matrix (kvmcpu_guest_cpu_feature{guest,feature} and "
        "_hidden): about 2 x watched features series per guest; off by default, the matrix is "
        "exported once per CPU configuration instead",
    )


@dataclass(config=_MODEL)
class ProfileConfig:
    name: Annotated[Text, AfterValidator(_matches(_PROFILE_NAME, "a valid profile name"))]
    #: QEMU -cpu spec; "auto" = host where KVM is proven, else max
    cpu: Annotated[Text, AfterValidator(_matches(_CPU_SPEC, "a QEMU -cpu spec"))] = "auto"
    #: accelerator: "auto" (kvm when proven, else tcg), "kvm" or "tcg"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    #: "none" (no NIC) or "isolated" (virtio-net on a private bridge in its own netns)
    network: Literal["none", "isolated"] = "none"
    #: whether this profile is expected to expose AES-NI (alerts compare against it)
    expects_aesni: StrictBool | None = None


def default_profiles() -> list[ProfileConfig]:
    return [
        ProfileConfig(name="aesni", cpu="auto", expects_aesni=True),
        ProfileConfig(name="noaesni", cpu="auto,-aes", expects_aesni=False),
    ]


def _unique_profiles(profiles: list[ProfileConfig]) -> list[ProfileConfig]:
    seen: set[str] = set()
    for p in profiles:
        if p.name in seen:
            raise ValueError(f"duplicate profile {p.name!r}")
        seen.add(p.name)
    return profiles


def _ciphers(ciphers: list[str]) -> list[str]:
    if not ciphers:
        raise ValueError("at least one cipher is needed")
    for c in ciphers:
        if not CIPHER_SPEC.fullmatch(c):
            raise ValueError(f"{c!r} is not a cryptsetup cipher spec like aes-xts-plain")
    return ciphers


@dataclass(config=_MODEL)
class CanaryConfig:
    enabled: StrictBool = setting(True, "run canary guests on a schedule", flag=Flag("canary.enabled"))
    interval_seconds: Number = number(
        900.0, "seconds between canary ticks", gt=0, le=YEAR, flag=Flag("canary.interval", "SECONDS")
    )
    jitter_seconds: Number = number(
        60.0,
        "random delay added to each tick, so a fleet does not benchmark in lockstep",
        ge=0,
        le=YEAR,
        flag=Flag("canary.jitter", "SECONDS"),
    )
    profiles: Annotated[list[ProfileConfig], AfterValidator(_unique_profiles)] = setting(
        help="the CPU configurations the canary guest boots with", factory=default_profiles
    )
    ciphers: Annotated[list[Text], AfterValidator(_ciphers)] = setting(
        help="cryptsetup cipher specs to benchmark", factory=lambda: list(SEED_CIPHERS)
    )
    size_mib: StrictInt = integer(
        64,
        "RAM disk size the guest encrypts per cipher and op, in MiB",
        ge=1,
        le=65536,
        flag=Flag("canary.size-mib", "MIB"),
    )
    rounds: StrictInt = integer(
        3, "dd rounds per cipher and op", ge=1, le=100, flag=Flag("canary.rounds", "N")
    )
    timeout_seconds: Number = number(
        300.0,
        "give up on a canary guest after this long",
        gt=0,
        le=86400,
        flag=Flag("canary.timeout", "SECONDS"),
    )
    memory_mib: StrictInt = integer(0, "guest RAM in MiB; 0 = sized from the RAM disk", ge=0, le=1048576)
    busy_load_per_core: Number = number(
        0.8,
        "skip a tick when the 1-minute load per core is above this",
        ge=0,
        le=1000,
        flag=Flag("canary.busy-load-per-core", "LOAD"),
    )
    busy_cpu_percent: Number = number(
        80.0,
        "skip a tick when sampled host CPU use (percent) is above this",
        ge=0,
        le=100,
        flag=Flag("canary.busy-cpu-percent", "PCT"),
    )
    duty_cycle_percent: Number = number(
        5.0,
        "canary CPU time budget, percent of one core averaged over an hour",
        gt=0,
        le=100,
        flag=Flag("canary.duty-cycle-percent", "PCT"),
    )
    throughput_histogram: StrictBool = setting(
        False,
        "also export every dd round as the kvmcpu_canary_throughput_bytes_per_second histogram "
        "(24 buckets: about 600 series with 2 profiles, 6 ciphers, 2 ops; the store keeps it either way)",
        flag=Flag("canary.throughput-histogram"),
    )
    nice: StrictInt = integer(19, "nice value of the canary QEMU", ge=-20, le=19)
    cpu_affinity: list[Annotated[StrictInt, Field(ge=0)]] = setting(
        help="CPUs the canary QEMU may run on ([] = any)", factory=list
    )
    run_as_user: Text = setting(
        "nobody", "user every QEMU (canary, proofs, probes) runs as when the daemon runs as root"
    )
    allow_root: StrictBool = setting(
        False,
        "allow run_as_user to be root or empty (QEMU then runs as root: logged and exposed as a metric)",
    )
    kernel: OptText = setting(None, "explicit canary kernel instead of the built image")
    initrd: OptText = setting(None, "explicit canary initramfs instead of the built image")


@dataclass(config=_MODEL)
class Config:
    web: WebConfig = setting(help="the HTTP endpoint", factory=WebConfig)
    paths: PathsConfig = setting(help="where to read and write", factory=PathsConfig)
    log: LogConfig = setting(help="logging", factory=LogConfig)
    collectors: dict[Text, StrictBool] = setting(
        help=f"collector name -> on/off; {DISABLE_DEFAULTS}: true runs only the ones turned on", factory=dict
    )
    features: FeaturesConfig = setting(help="the CPU feature watch list", factory=FeaturesConfig)
    qemu: QemuConfig = setting(help="the QEMU binary and its probes", factory=QemuConfig)
    guests: GuestsConfig = setting(help="how running guests are found", factory=GuestsConfig)
    canary: CanaryConfig = setting(help="the canary benchmark guests", factory=CanaryConfig)

    def collector_enabled(self, name: str, default: bool = True) -> bool:
        if self.collectors.get(DISABLE_DEFAULTS, False):
            default = False
        return self.collectors.get(name, default)


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
