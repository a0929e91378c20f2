"""Configuration: built-in defaults, overlaid by the YAML file, overlaid by command-line flags.

Every problem is collected and reported at once before the daemon binds its port, so an operator
fixing a fleet's config sees the whole list in one run, not one per restart.

- ``model``: the schema (typed pydantic dataclasses; ranges, help texts, flag names)
- ``parse``: YAML data -> Config plus problems worded with their location
- ``checks``: what only this host can answer (files, CPUs, users, collectors)
- ``flags``: argparse flags generated from the schema; the flag -> config overlay
- ``settings``: the whole load (config + web config) that ``serve`` starts and reloads from
- ``yamlfile``: the one YAML reader; ``problems``: how problems reach the operator
"""

from exporter.config.checks import validate
from exporter.config.model import (
    CIPHER_SPEC,
    DEFAULT_CACHE_DIR,
    DEFAULT_LISTEN,
    DEFAULT_STATE_DIR,
    LOG_FORMATS,
    LOG_LEVELS,
    SEED_CIPHERS,
    CanaryConfig,
    Config,
    FeaturesConfig,
    GuestsConfig,
    LogConfig,
    PathsConfig,
    ProfileConfig,
    QemuConfig,
    QmpSocketConfig,
    WebConfig,
    default_profiles,
    parse_listen_address,
)
from exporter.config.parse import load_file, parse_config
from exporter.config.problems import report_config_problems

__all__ = [
    "CIPHER_SPEC",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_LISTEN",
    "DEFAULT_STATE_DIR",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "SEED_CIPHERS",
    "CanaryConfig",
    "Config",
    "FeaturesConfig",
    "GuestsConfig",
    "LogConfig",
    "PathsConfig",
    "ProfileConfig",
    "QemuConfig",
    "QmpSocketConfig",
    "WebConfig",
    "default_profiles",
    "load_file",
    "parse_config",
    "parse_listen_address",
    "report_config_problems",
    "validate",
]
