"""Deployment files, checked as far as this machine allows: no Docker engine, no cluster, no PID-1
systemd. Each file is parsed, cross-checked against the repository and the CLI, and handed to the
real validator where one exists (systemd-analyze, promtool, amtool)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from exporter.app.cli import build_parser
from exporter.config import Config, load_file

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose"


def cli_accepts(args: list[str]) -> None:
    """The flags a deployment file passes must be ones the exporter understands."""
    try:
        build_parser().parse_args(args)
    except SystemExit as err:
        raise AssertionError(f"kvm-cpu-exporter rejects {args}") from err


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def test_dockerfile_structure() -> None:
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    st = stages(ins)
    assert len(st) >= 2, "multi-stage: a builder and a runtime stage"
    froms = [s[0][1].split() for s in st]
    assert froms[0][-2:] == ["AS", "builder"]
    final_base = froms[-1][0].replace("${DEBIAN_IMAGE}", args.get("DEBIAN_IMAGE", ""))
    # pinned: an exact Debian 12 point release (and optionally its digest), never a moving tag
    assert re.fullmatch(r"debian:12\.\d+-slim(@sha256:[0-9a-f]{64})?", final_base), final_base
    builder = " ".join(a for _, a in st[0])
    assert "pip wheel" in builder and "canary build" in builder and "/var/cache/kvm-cpu-exporter" in builder
    final = st[-1]
    final_text = "\n".join(f"{k} {a}" for k, a in final)
    assert "qemu-system-x86" in final_text and "cryptsetup" not in final_text  # the guest carries its own
    users = [a for k, a in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the runtime must not run as root"
    assert "--groups kvm" in final_text
    assert any(k == "EXPOSE" and "10437" in a.split() for k, a in final)
    assert any(k == "VOLUME" and "/var/lib/kvm-cpu-exporter" in a for k, a in final)
    entry = [a for k, a in final if k == "ENTRYPOINT"]
    assert entry and isinstance(json.loads(entry[-1]), list), "ENTRYPOINT in exec form"
    cmd = [json.loads(a) for k, a in final if k == "CMD"]
    assert cmd
    cli_accepts(cmd[-1])
    health = [a for k, a in final if k == "HEALTHCHECK"]
    assert health and "/-/healthy" in health[-1]
    assert "curl" not in health[-1] and "wget" not in health[-1]


def healthcheck_command() -> list[str]:
    (health,) = [a for k, a in stages(dockerfile_instructions())[-1] if k == "HEALTHCHECK"]
    exec_form = json.loads(health[health.index("CMD") + 3 :].strip())
    assert exec_form[0].endswith("/python") and exec_form[1] == "-c"
    compile(exec_form[2], "HEALTHCHECK", "exec")
    return [sys.executable, *exec_form[1:]]


@pytest.mark.slow
def test_dockerfile_healthcheck_against_a_real_daemon(start_daemon: Any) -> None:
    cmd = healthcheck_command()
    d = start_daemon(
        "--no-canary.enabled", "--no-collector.canary", "--no-collector.guests", "--no-collector.qemu"
    )
    ok = subprocess.run(cmd, env={**os.environ, "KVMCPU_HEALTHCHECK_PORT": str(d.port)}, timeout=30)
    assert ok.returncode == 0
    down = subprocess.run(cmd, env={**os.environ, "KVMCPU_HEALTHCHECK_PORT": str(free_port())}, timeout=30)
    assert down.returncode == 1


def dockerignored() -> set[str]:
    return {
        ln.strip().rstrip("/")
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }


def test_dockerfile_copies_only_what_exists_and_is_in_the_context() -> None:
    ignored = dockerignored()
    copies = [a for k, a in dockerfile_instructions() if k in ("COPY", "ADD")]
    local = [a for a in copies if "--from=" not in a]
    assert local
    for arg in local:
        parts = [p for p in shlex.split(arg) if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} missing from the repository"
            assert src.split("/")[0] not in ignored, f"COPY source {src} is excluded by .dockerignore"
    for name in (".git", ".venv", "tests"):
        assert name in ignored


# --------------------------------------------------------------------------- lock file and image

LOCK = ROOT / "requirements.lock"


def lock_pins(path: Path = LOCK) -> dict[str, tuple[str, list[str]]]:
    """Normalised name -> (pinned version, sha256 hashes) from a pip-compile --generate-hashes file."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", line)
        if m:
            current = canonicalize_name(m.group(1))
            pins[current] = (m.group(2), [])
        for digest in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            assert current is not None, line
            pins[current][1].append(digest)
    return pins


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_lock_pins_every_dependency_of_pyproject_with_hashes() -> None:
    pins = lock_pins()
    assert pins, "requirements.lock is empty"
    for name, (version, hashes) in pins.items():
        assert hashes, f"{name}=={version} has no hash: regenerate with bash scripts/dev.sh lock"
    for spec in pyproject()["project"]["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, (
            f"{req.name} is in pyproject.toml but not in requirements.lock: bash scripts/dev.sh lock"
        )
        assert req.specifier.contains(pins[name][0], prereleases=True), (
            f"{name}=={pins[name][0]} violates {spec}"
        )


def test_lock_is_regenerated_by_the_documented_command() -> None:
    """The header pip-compile writes is the command scripts/dev.sh lock runs, word for word."""
    header = re.search(r"^#\s+(pip-compile .+)$", LOCK.read_text(), re.MULTILINE)
    assert header, "requirements.lock lacks pip-compile's header"
    dev = (ROOT / "scripts" / "dev.sh").read_text()
    m = re.search(r"^LOCK_COMMAND=\(([^)]*)\)", dev, re.MULTILINE)
    assert m, "scripts/dev.sh defines LOCK_COMMAND"
    assert header.group(1).split() == shlex.split(m.group(1))
    assert (
        "bash scripts/dev.sh lock"
        in (ROOT / "README.md").read_text() + (ROOT / "docs" / "deploy.md").read_text()
    )


def test_tests_run_the_locked_versions() -> None:
    """scripts/dev.sh installs the lock before the dev tools, so this interpreter has what ships."""
    from importlib.metadata import PackageNotFoundError, version

    drift = []
    for name, (pinned, _) in lock_pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "missing"
        if installed != pinned:
            drift.append(f"{name}: lock {pinned}, installed {installed}")
    assert drift == [], "run bash scripts/dev.sh setup"
    dev = (ROOT / "scripts" / "dev.sh").read_text()
    lock_at = dev.index("--require-hashes --no-deps -r requirements.lock")
    assert lock_at < dev.index('install -q -e ".[dev]"')


def test_dockerfile_installs_the_lock_before_the_code() -> None:
    ins = dockerfile_instructions()
    builder = stages(ins)[0]
    steps = [f"{k} {a}" for k, a in builder]
    lock_copy = next(i for i, s in enumerate(steps) if s.startswith("COPY") and "requirements.lock" in s)
    lock_install = next(
        i for i, s in enumerate(steps) if "--require-hashes" in s and "requirements.lock" in s
    )
    code_copy = next(i for i, s in enumerate(steps) if s.startswith("COPY") and "exporter" in s.split())
    assert lock_copy < lock_install < code_copy, "dependency layer first: a code change must not reinstall it"
    assert "--no-deps" in steps[lock_install]
    project_install = [s for s in steps[code_copy:] if "pip install" in s]
    assert project_install and all("--no-deps" in s for s in project_install), (
        "only the lock brings dependencies"
    )
    assert "requirements.lock" not in dockerignored()


def test_image_labels_and_tags_name_this_version() -> None:
    from exporter import __version__

    final = stages(dockerfile_instructions())[-1]
    args = dict(a.split("=", 1) for k, a in final if k == "ARG" and "=" in a)
    assert args["VERSION"] == __version__
    labels = " ".join(a for k, a in final if k == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "source", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert f'org.opencontainers.image.licenses="{pyproject()["project"]["license"]}"' in labels  # SPDX string
    env = " ".join(a for k, a in final if k == "ENV")
    assert "KVMCPU_BUILD_REVISION=${REVISION}" in env and "KVMCPU_BUILD_DATE=${CREATED}" in env

    image = "ghcr.io/kvm-cpu-exporter/kvm-cpu-exporter"
    pod = next(
        d for d in yaml.safe_load_all((K8S / "daemonset.yaml").read_text()) if d and d["kind"] == "DaemonSet"
    )
    spec = pod["spec"]["template"]["spec"]
    for c in spec["containers"] + spec.get("initContainers", []):
        assert c["image"] == f"{image}:{__version__}", c["image"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {"name": image, "newTag": __version__} in kustomization["images"]
    exporter_service = yaml.safe_load((COMPOSE / "compose.yml").read_text())["services"]["exporter"]
    assert exporter_service["image"] == f"{image}:{__version__}"
    assert str(exporter_service["build"]["args"]["VERSION"]) == __version__
    for path in [*K8S.glob("*.yaml"), *COMPOSE.glob("*.yml")]:
        assert not re.search(r"image:\s*\S+:latest\b", path.read_text()), f"{path.name} uses :latest"


# --------------------------------------------------------------------------- systemd

UNIT = DEPLOY / "systemd" / "kvm-cpu-exporter.service"
_BAD_VERIFY = re.compile(r"Unknown (key|section|lvalue)|Failed to parse|Invalid|is not valid|Ignoring", re.I)


def verify_unit(text: str, tmp_path: Path) -> str:
    """systemd-analyze verify on a copy whose ExecStart points at a binary that exists here."""
    copy = tmp_path / UNIT.name
    copy.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", text, flags=re.M))
    run = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    return run.stdout + run.stderr


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.slow
def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    text = UNIT.read_text()
    report = verify_unit(text, tmp_path)
    assert not _BAD_VERIFY.search(report), report
    # the check above can fail: a misspelt directive is reported
    assert _BAD_VERIFY.search(verify_unit(text.replace("PrivateTmp=yes", "PrivateTemp=yes"), tmp_path))
    s = unit_settings(text)
    expected = {
        "User": "kvm-cpu-exporter",
        "SupplementaryGroups": "kvm",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "StateDirectory": "kvm-cpu-exporter",
        "CacheDirectory": "kvm-cpu-exporter",
        "DeviceAllow": "/dev/kvm rw",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "DevicePolicy": "closed",
        "RestartPreventExitStatus": "2",
    }
    for key, value in expected.items():
        assert value in s.get(key, []), f"{key}={value} missing"
    for key in (
        "RestrictAddressFamilies",
        "SystemCallFilter",
        "MemoryMax",
        "CPUWeight",
        "CapabilityBoundingSet",
    ):
        assert key in s, key
    assert "@system-service" in s["SystemCallFilter"][0] and "seccomp" in s["SystemCallFilter"][0]
    assert "MemoryDenyWriteExecute" not in s  # would kill QEMU's TCG code generator
    exec_start = shlex.split(s["ExecStart"][0])
    assert exec_start[0] == "/opt/kvm-cpu-exporter/bin/kvm-cpu-exporter"
    cli_accepts([a for a in exec_start[1:] if not a.startswith("$")])
    copy = tmp_path / UNIT.name
    sec = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", sec.stdout + sec.stderr)
    assert level, sec.stdout + sec.stderr
    assert float(level.group(1)) <= 3.0, sec.stdout


def test_env_file_sets_only_the_documented_variable() -> None:
    env = DEPLOY / "systemd" / "kvm-cpu-exporter.env"
    assigned = [ln.split("=", 1)[0] for ln in env.read_text().splitlines() if ln and not ln.startswith("#")]
    assert assigned == ["KVMCPU_ARGS"] and "$KVMCPU_ARGS" in UNIT.read_text()


# --------------------------------------------------------------------------- config example


def _dataclass_keys(cls: type[Any], prefix: str = "") -> set[str]:
    keys = set()
    for f in dataclasses.fields(cls):
        keys.add(prefix + f.name)
        typ = getattr(sys.modules["exporter.config"], str(f.type), None)
        if dataclasses.is_dataclass(typ):
            keys |= _dataclass_keys(typ, f"{prefix}{f.name}.")  # type: ignore[arg-type]
    return keys


def _yaml_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for k, v in data.items():
        keys.add(prefix + k)
        if isinstance(v, dict) and k != "collectors":
            keys |= _yaml_keys(v, f"{prefix}{k}.")
    return keys


def test_config_example_has_every_key_at_its_default() -> None:
    path = DEPLOY / "config.example.yml"
    cfg, problems = load_file(path)
    assert problems == []
    from exporter.collectors.scrape import COLLECTORS

    expected = Config()
    expected.collectors = {n: s.default_enabled for n, s in COLLECTORS.items()}
    assert cfg == expected, "the example must show the built-in defaults"
    assert _yaml_keys(yaml.safe_load(path.read_text())) == _dataclass_keys(Config)


# --------------------------------------------------------------------------- Kubernetes


def k8s_docs() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":  # a kustomize file, not an API object
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            for key in ("apiVersion", "kind"):
                assert doc.get(key), f"{path.name}: {key} missing"
            assert doc["metadata"]["name"], f"{path.name}: metadata.name missing"
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def test_kubernetes_daemonset() -> None:
    docs = k8s_docs()
    ds = docs["DaemonSet/kvm-cpu-exporter"]
    assert ds["apiVersion"] == "apps/v1"
    selector = ds["spec"]["selector"]["matchLabels"]
    pod = ds["spec"]["template"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    spec = pod["spec"]
    assert spec["hostPID"] is True and spec["nodeSelector"]
    assert spec["automountServiceAccountToken"] is False
    # no kvm GID written down anywhere: QEMU gets the group of the node's /dev/kvm at run time
    assert "supplementalGroups" not in yaml.safe_dump(ds)
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec.get("initContainers", []) + spec["containers"]:
        assert c["image"] and c["name"]
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{c['name']} mounts undefined volume {m['name']}"
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    for init in spec.get("initContainers", []):
        assert init["securityContext"]["runAsNonRoot"] is True
    (main,) = spec["containers"]
    assert main["securityContext"]["privileged"] is False
    # root, to run a guest's own QEMU in the guest's root; only these capabilities (why: daemonset.yaml)
    caps = main["securityContext"]["capabilities"]
    assert main["securityContext"]["runAsUser"] == 0 and caps["drop"] == ["ALL"]
    assert set(caps["add"]) == {
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "KILL",
        "SETGID",
        "SETUID",
        "SYS_CHROOT",
        "SYS_PTRACE",
    }
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    # /dev/kvm is a device grant of a device plugin, not a bare hostPath the device cgroup blocks
    assert main["resources"]["limits"]["devices.kubevirt.io/kvm"] == "1"
    assert not [v for v in spec["volumes"] if v.get("hostPath", {}).get("path") == "/dev/kvm"]
    assert main["resources"]["limits"]["memory"] and main["resources"]["requests"]["cpu"]
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"metrics": 10437}
    assert main["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert main["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    for probe in (main["readinessProbe"], main["livenessProbe"]):
        assert probe["httpGet"]["port"] in ports
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    for host_path, flag in (("/proc", "--path.procfs"), ("/sys", "--path.sysfs")):
        (mount,) = [
            m for m in main["volumeMounts"] if volumes[m["name"]].get("hostPath", {}).get("path") == host_path
        ]
        assert mount.get("readOnly") is True
        assert f"{flag}={mount['mountPath']}" in main["args"]
    assert "/dev/kvm" not in mounts
    cli_accepts(main["args"])


def _json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """The two RFC 6902 operations the overlays use (add, remove), as kustomize applies them."""
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        target = doc
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        if op["op"] == "remove":
            del target[int(last) if isinstance(target, list) else last]
        elif isinstance(target, list):
            target.append(op["value"]) if last == "-" else target.insert(int(last), op["value"])
        else:
            target[last] = op["value"]
    return doc


def test_kubernetes_overlay_without_device_plugin() -> None:
    """Clusters without a KVM device plugin: the overlay trades the grant for a hostPath device and
    still gives a DaemonSet the API server accepts."""
    import kubernetes_validate

    overlay = K8S.parent / "kubernetes-overlays" / "without-device-plugin"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert [(overlay / r).resolve() for r in kustomization["resources"]] == [K8S.resolve()]
    (patch,) = kustomization["patches"]
    assert patch["target"] == {"kind": "DaemonSet", "name": "kvm-cpu-exporter"}
    ds = _json_patch(k8s_docs()["DaemonSet/kvm-cpu-exporter"], yaml.safe_load(patch["patch"]))
    spec = ds["spec"]["template"]["spec"]
    (main,) = spec["containers"]
    assert "devices.kubevirt.io/kvm" not in main["resources"]["limits"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in main["volumeMounts"] if m["mountPath"] == "/dev/kvm"]
    assert volumes[mount["name"]]["hostPath"] == {"path": "/dev/kvm", "type": "CharDevice"}
    kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


def test_kube_prometheus_stack_selects_the_monitor_and_the_rules() -> None:
    """kube-prometheus-stack's Prometheus picks ServiceMonitors and PrometheusRules by the label
    release=<its Helm release>; kustomization.yaml shows the patch for another release name."""
    operator = [d for d in k8s_docs().values() if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {d["kind"] for d in operator} == {"ServiceMonitor", "PrometheusRule"}
    for d in operator:
        assert d["metadata"]["labels"]["release"] == "kube-prometheus-stack", d["metadata"]["name"]
    commented = "\n".join(
        line.removeprefix("# ")
        for line in (K8S / "kustomization.yaml").read_text().splitlines()
        if line.startswith("# ") and not line.startswith("# kubectl")
    )
    example = yaml.safe_load(commented[commented.index("patches:") :])
    (patch,) = example["patches"]
    assert patch["target"] == {"group": "monitoring.coreos.com"}
    for d in operator:
        assert (
            _json_patch(d, yaml.safe_load(patch["patch"]))["metadata"]["labels"]["release"]
            == "my-prometheus-release"
        )


#: oldest Kubernetes minor the manifests must validate against (strict: unknown fields are errors)
K8S_VERSION = "1.28.0"


def test_kubernetes_core_objects_validate_against_the_api_schema() -> None:
    import kubernetes_validate

    checked = []
    for key, doc in k8s_docs().items():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs of the Prometheus Operator: covered structurally below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked.append(key.split("/")[0])
    assert {"Namespace", "ServiceAccount", "DaemonSet", "Service"} <= set(checked)
    broken = k8s_docs()["DaemonSet/kvm-cpu-exporter"]
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):  # the check can fail
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kubernetes_service_and_monitor_select_the_pods() -> None:
    docs = k8s_docs()
    pod_labels = docs["DaemonSet/kvm-cpu-exporter"]["spec"]["template"]["metadata"]["labels"]
    svc = docs["Service/kvm-cpu-exporter"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "metrics" and port["port"] == 10437
    sm = docs["ServiceMonitor/kvm-cpu-exporter"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [port["name"]]
    namespaces = {d["metadata"].get("namespace") for d in docs.values() if d["kind"] != "Namespace"}
    assert namespaces == {docs["Namespace/kvm-cpu-exporter"]["metadata"]["name"]}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in kustomization["resources"]:
        assert (K8S / res).is_file(), res
    assert {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"} == set(kustomization["resources"])


def test_prometheusrule_is_generated_from_the_rule_files(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(K8S / "generate.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, "deploy/kubernetes/prometheusrule.yaml is stale: " + run.stderr
    rule_docs = [d for d in yaml.safe_load_all((K8S / "prometheusrule.yaml").read_text()) if d]
    sources = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
    assert [d["spec"]["groups"] for d in rule_docs] == [
        yaml.safe_load(p.read_text())["groups"] for p in sources
    ]
    for doc in rule_docs:  # and what the Operator will load is valid Prometheus rules
        assert doc["kind"] == "PrometheusRule"
        out = tmp_path / f"{doc['metadata']['name']}.yml"
        out.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
        check = subprocess.run(
            ["promtool", "check", "rules", str(out)], capture_output=True, text=True, timeout=60
        )
        assert check.returncode == 0, check.stdout + check.stderr


# --------------------------------------------------------------------------- compose


def test_compose_stack_mounts_exist_and_configs_validate(tmp_path: Path) -> None:
    compose = yaml.safe_load((COMPOSE / "compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"exporter", "prometheus", "alertmanager", "grafana"}
    build = services["exporter"]["build"]
    assert (COMPOSE / build["context"] / build["dockerfile"]).is_file()
    cli_accepts(services["exporter"]["command"])
    mounted: dict[str, str] = {}
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src, target = vol.split(":")[:2]
            if src.startswith("."):
                assert (COMPOSE / src).exists(), f"{name}: {src} does not exist in the repository"
                mounted[target] = str((COMPOSE / src).resolve())
            elif not src.startswith("/"):
                assert src in compose["volumes"], f"{name}: named volume {src} not declared"
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert mounted["/etc/prometheus/rules"] == str((DEPLOY / "prometheus" / "rules").resolve())
    assert mounted["/etc/grafana/provisioning/dashboards"] == str(
        (ROOT / "grafana/provisioning/dashboards").resolve()
    )
    # dashboards are mounted where the project's provider looks for them
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/kvm-cpu-exporter.yml").read_text())
    (dash_path,) = [p["options"]["path"] for p in provider["providers"]]
    assert mounted[dash_path] == str((ROOT / "grafana/dashboards").resolve())
    assert list((ROOT / "grafana/dashboards").glob("*.json"))
    # and the stack's data source has the uid the project's data source has, at the stack's Prometheus
    project_ds = yaml.safe_load((ROOT / "grafana/provisioning/datasources/kvm-cpu-exporter.yml").read_text())
    (stack_ds_file,) = [
        src
        for src, dst in ((v.split(":")[0], v.split(":")[1]) for v in services["grafana"]["volumes"])
        if dst.startswith("/etc/grafana/provisioning/datasources")
    ]
    stack_ds = yaml.safe_load((COMPOSE / stack_ds_file).read_text())
    assert [d["uid"] for d in stack_ds["datasources"]] == [d["uid"] for d in project_ds["datasources"]]
    assert stack_ds["datasources"][0]["url"] == "http://prometheus:9090"
    # promtool resolves rule_files next to the config, as Prometheus does inside the container
    shutil.copy(COMPOSE / "prometheus.yml", tmp_path / "prometheus.yml")
    (tmp_path / "rules").symlink_to(DEPLOY / "prometheus" / "rules")
    check = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0 and "rule files found" in check.stdout, check.stdout + check.stderr
    am = subprocess.run(
        ["amtool", "check-config", str(COMPOSE / "alertmanager.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert am.returncode == 0, am.stdout + am.stderr


# --------------------------------------------------------------------------- scripts/dev.sh run


@pytest.mark.slow
def test_dev_run_hands_the_process_over_to_the_exporter(tmp_path: Path) -> None:
    """`bash scripts/dev.sh run` ends with exec: the PID a supervisor (or `timeout`) signals is the
    exporter itself, and nothing is left running after SIGTERM."""
    import psutil
    from support.prometheus import wait_until

    port = free_port()
    marker = f"--path.state-dir={tmp_path / 'state'}"
    proc = subprocess.Popen(
        [
            "bash",
            "scripts/dev.sh",
            "run",
            f"--web.listen-address=127.0.0.1:{port}",
            marker,
            "--no-canary.enabled",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:

        def healthy() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/healthy", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_until(healthy, 240, "the exporter started by dev.sh run", interval=0.5)
        cmdline = psutil.Process(proc.pid).cmdline()
        assert any(part.endswith("kvm-cpu-exporter") for part in cmdline[:2]) and "serve" in cmdline, cmdline
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])]
    assert left == []
