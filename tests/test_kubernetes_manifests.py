"""The Kubernetes reference deployment (etc/deploy/kubernetes/) and its image
(etc/deploy/Containerfile): every manifest is valid for Kubernetes (its JSON
schemas, strict: an unknown field is an error), and the pieces agree with each
other and with chatproxy's configuration as the pod sees it. That configuration
is rebuilt under a temporary directory from the Deployment's volumes (the profile
ConfigMap made from etc/pega-chat.ini as the documented command makes it, the
site ConfigMap, the TLS Secret with a test certificate instead of its
placeholder, the emptyDir volumes), then loaded and validated as twistd would."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import chatproxy
from chatproxy.config import Config, load_config
from chatproxy.proxy.validate import validate

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "etc" / "deploy" / "kubernetes"
CONTAINERFILE = ROOT / "etc" / "deploy" / "Containerfile"
# The oldest Kubernetes the manifests claim (docs/operations.md) and the newest
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", "1.37")
# The profile ConfigMap is made from the shipped profile, as configmap-site.yaml says.
PROFILE_COMMAND = "--from-file=10-pega-chat.ini=etc/pega-chat.ini"
# After drain_timeout the master kills workers still draining 10 s later and stops 5 s after that.
MASTER_STOP_MARGIN = 15


def documents() -> list[tuple[str, dict[str, Any]]]:
    """Every YAML document of etc/deploy/kubernetes/ (file name, object)."""
    found = []
    for path in sorted(KUBE.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append((path.name, doc))
    return found


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of ``kind`` (and ``name``) in the manifests."""
    matches = [doc for _, doc in documents()
               if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def profile_configmap() -> dict[str, Any]:
    """The ConfigMap chatproxy-profile as `kubectl create configmap ... --from-file` makes it."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "chatproxy-profile"},
            "data": {"10-pega-chat.ini": (ROOT / "etc" / "pega-chat.ini").read_text()}}


def pod_spec() -> dict[str, Any]:
    return the("Deployment")["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    return containers[0]


def endpoint_port(endpoint: str) -> tuple[int, str | None]:
    """(port, interface) of a ``tcp:`` endpoint string, also inside ``haproxy:``."""
    parts = endpoint.split(":")
    if parts[0] == "haproxy":
        parts = parts[1:]
    assert parts[0] in ("tcp", "tcp6"), f"not a tcp endpoint: {endpoint}"
    port, interface = None, None
    for part in parts[1:]:
        key, _, value = part.rpartition("=")
        if key in ("", "port"):
            port = int(value)
        elif key == "interface":
            interface = value
    assert port is not None, f"no port in {endpoint}"
    return port, interface


def prestop_sleep() -> int:
    """The seconds the preStop hook sleeps (an exec of sleep, or the sleep action)."""
    hook = container()["lifecycle"]["preStop"]
    if "sleep" in hook:
        return int(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep", "/usr/bin/sleep") and len(command) == 2, command
    return int(command[1])


def containerfile_instructions() -> dict[str, list[str]]:
    """The Containerfile's instructions (continuation lines joined, comments dropped), by name."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in CONTAINERFILE.read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip():
            name, _, rest = line.strip().partition(" ")
            found.setdefault(name.upper(), []).append(rest.strip())
    return found


def cpu_count(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


class Pod:
    """The pod's file system, rebuilt under ``root``, and the configuration chatproxy loads there."""

    def __init__(self, root: Path, pki: Any) -> None:
        self.root = root
        self.mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
        self.files: dict[str, Path] = {}  # pod path -> file under root
        self.volume_kinds: dict[str, str] = {}  # mount path -> volume kind
        configmaps = {"chatproxy-profile": profile_configmap()["data"],
                      "chatproxy-site": the("ConfigMap", "chatproxy-site")["data"]}
        tls = the("Secret", "chatproxy-tls")
        assert tls["type"] == "kubernetes.io/tls"
        # The Secret's placeholder data replaced by a real certificate and key, as the operator does.
        secrets = {"chatproxy-tls": {"tls.crt": pki.chat_cert.read_text(), "tls.key": pki.chat_key.read_text()}}
        for volume in pod_spec()["volumes"]:
            mount = self.mounts[volume["name"]]
            directory = self.host(mount)
            directory.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in volume:
                self.volume_kinds[mount] = "emptyDir"
                continue
            self.volume_kinds[mount] = "projected"
            for source in volume["projected"]["sources"]:
                (kind, ref), = source.items()
                data = (configmaps if kind == "configMap" else secrets).get(ref["name"])
                if data is None:
                    assert ref.get("optional"), f"{kind} {ref['name']} is not part of the deployment"
                    continue
                for item in ref["items"]:
                    target = directory / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(data[item["key"]])
                    self.files[f"{mount}/{item['path']}"] = target
        # Absolute paths in the INI files name the pod's file system: point them into root.
        pattern = re.compile(r"(=\s*)(/\S*)")
        for pod_path, path in self.files.items():
            if pod_path.endswith(".ini"):
                path.write_text(pattern.sub(lambda m: m.group(1) + str(self.host(m.group(2))), path.read_text()))

    def host(self, pod_path: str) -> Path:
        """Where a path of the pod is under root (unchanged when no volume holds it)."""
        for mount in self.mounts.values():
            if pod_path == mount or pod_path.startswith(mount.rstrip("/") + "/"):
                return self.root / pod_path.lstrip("/")
        return Path(pod_path)

    def config(self) -> Config:
        """The configuration the container's command loads (its --config arguments), validated."""
        arguments = container()["args"]
        paths = [self.host(arguments[i + 1]) for i, a in enumerate(arguments) if a == "--config"]
        assert paths, arguments
        config = load_config(paths)
        validate(config)
        return config


@pytest.fixture
def pod(tmp_path: Path, pki: Any) -> Pod:
    """The pod's file system under tmp_path."""
    return Pod(tmp_path, pki)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_are_valid_kubernetes_objects(version):
    """Every YAML document under etc/deploy/kubernetes/ (and the profile ConfigMap the
    documented kubectl command makes) validates against Kubernetes' own schemas for that
    version in strict mode (an unknown or misplaced field is an error); no object sets a
    namespace; the expected kinds are all there, once each."""
    docs = documents() + [("(kubectl create configmap chatproxy-profile)", profile_configmap())]
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {where}: {e.message}")
        assert "namespace" not in doc["metadata"], f"{name} sets a namespace"
    kinds = sorted(doc["kind"] for _, doc in documents())
    assert kinds == sorted(["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                            "Secret", "Service"])


def test_profile_configmap_command_is_documented():
    """configmap-site.yaml and docs/operations.md tell how to make the ConfigMap
    chatproxy-profile from etc/pega-chat.ini, under the key the Deployment projects."""
    keys = [item["key"] for source in pod_spec()["volumes"][0]["projected"]["sources"]
            if source.get("configMap", {}).get("name") == "chatproxy-profile" for item in source["configMap"]["items"]]
    assert keys == ["10-pega-chat.ini"]
    for doc in (KUBE / "configmap-site.yaml", ROOT / "docs" / "operations.md"):
        text = doc.read_text()
        assert "kubectl create configmap chatproxy-profile" in text and PROFILE_COMMAND in text, doc


def test_configuration_in_the_pod_loads_and_validates(pod):
    """The files the Deployment mounts in /etc/chatproxy/ (profile, site file, certificate and
    key) make a configuration that load_config reads and validate accepts (filters built,
    the waf with Debian's ModSecurity and CRS; certificate and key loaded and matching), with
    the profile's listener, upstream and routes, and the site's values in force."""
    config = pod.config()
    assert sorted(config.listeners) == ["public"]
    assert sorted(route.name for route in config.routes) == ["pega-chat", "pega-mashup", "pega-push"]
    assert config.admin is not None
    assert [p.name for p in map(Path, config.sources)] == ["10-pega-chat.ini", "20-site.ini"]


def test_probes_use_the_admin_listener(pod):
    """The readiness probe is GET /readyz and the liveness probe GET /healthz, both on the
    container port named admin, which is the port of the [admin] endpoint; the admin
    endpoint listens on every address of the pod (the kubelet probes the pod's IP)."""
    config = pod.config()
    port, interface = endpoint_port(config.admin.endpoint)
    assert interface in (None, "0.0.0.0", "::"), f"[admin] listens on {interface} only: the kubelet cannot reach it"
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container()[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == port, f"{probe} port {get['port']} is not [admin]'s {port}"


def test_container_ports_match_the_listeners(pod):
    """The container ports are exactly the listeners' and the admin endpoint's ports, the
    https one unprivileged (the container has no root and no capability); the Service sends
    its ports to the https listener by name, and the Containerfile EXPOSEs the same ports."""
    config = pod.config()
    listener_ports = {endpoint_port(listener.endpoint)[0] for listener in config.listeners.values()}
    admin_port = endpoint_port(config.admin.endpoint)[0]
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert sorted(ports.values()) == sorted(listener_ports | {admin_port})
    assert all(port > 1024 for port in ports.values())
    assert ports["https"] == endpoint_port(config.listeners["public"].endpoint)[0]
    service = the("Service")
    for entry in service["spec"]["ports"]:
        assert ports.get(entry["targetPort"], entry["targetPort"]) in listener_ports, entry
    assert admin_port not in {ports.get(e["targetPort"], e["targetPort"]) for e in service["spec"]["ports"]}
    exposed = {int(p.split("/")[0]) for line in containerfile_instructions()["EXPOSE"] for p in line.split()}
    assert exposed == set(ports.values())


def test_grace_period_covers_prestop_and_drain(pod):
    """terminationGracePeriodSeconds (counted from the preStop hook's start) is longer than
    the preStop sleep plus drain_timeout, with the master's margin for killing workers that
    still drain after drain_timeout; the preStop hook sleeps, it does not signal chatproxy
    (the kubelet's SIGTERM after it starts the drain)."""
    config = pod.config()
    grace = pod_spec()["terminationGracePeriodSeconds"]
    sleep = prestop_sleep()
    assert 0 < sleep < grace
    assert grace > sleep + config.settings.drain_timeout
    assert grace >= sleep + config.settings.drain_timeout + MASTER_STOP_MARGIN


def test_tls_secret_is_mounted_where_the_site_file_expects_it(pod):
    """The certificate and key of the https listener are the files the Deployment projects
    from the Secret chatproxy-tls (type kubernetes.io/tls: tls.crt and tls.key), readable by
    the pod's group only; the Secret in the repository holds clearly marked placeholders."""
    config = pod.config()
    listener = config.listeners["public"]
    projected = {}
    for source in pod_spec()["volumes"][0]["projected"]["sources"]:
        if source.get("secret", {}).get("name") == "chatproxy-tls":
            mount = pod.mounts[pod_spec()["volumes"][0]["name"]]
            projected = {item["key"]: pod.files[f"{mount}/{item['path']}"] for item in source["secret"]["items"]}
    assert listener.tls
    assert listener.certificate == projected["tls.crt"] and listener.key == projected["tls.key"]
    secret = the("Secret", "chatproxy-tls")
    assert sorted(secret["stringData"]) == ["tls.crt", "tls.key"]
    assert all(value.startswith("PLACEHOLDER") for value in secret["stringData"].values())
    volume = pod_spec()["volumes"][0]
    assert volume["projected"]["defaultMode"] == 0o440
    assert pod_spec()["securityContext"]["fsGroup"] == pod_spec()["securityContext"]["runAsGroup"]


def test_workers_match_the_cpu_limit(pod):
    """[chatproxy] workers is set explicitly (not auto, which counts the node's CPUs) to the
    container's CPU limit, and the CPU request is not above it."""
    config = pod.config()
    resources = container()["resources"]
    limit = cpu_count(resources["limits"]["cpu"])
    assert config.settings.workers == limit
    assert cpu_count(resources["requests"]["cpu"]) <= limit
    assert "memory" in resources["requests"] and "memory" in resources["limits"]


def test_hardened_and_writes_only_to_its_volumes(pod):
    """The pod runs as the image's numeric non-root user with a read-only root file system,
    no capabilities, no privilege escalation and the runtime's seccomp profile; what
    chatproxy writes (state_directory, the master's directory in /tmp) is on emptyDir
    volumes, and the configuration volume is read-only."""
    config = pod.config()
    pod_security, security = pod_spec()["securityContext"], container()["securityContext"]
    assert pod_security["runAsNonRoot"] is True and security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"] and "add" not in security["capabilities"]
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    user = containerfile_instructions()["USER"][-1]
    assert user == f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"
    assert f"--uid {pod_security['runAsUser']}" in " ".join(containerfile_instructions()["RUN"])
    state = next(mount for mount in pod.mounts.values() if pod.host(mount) == config.settings.state_directory)
    assert pod.volume_kinds[state] == "emptyDir"
    assert pod.volume_kinds["/tmp"] == "emptyDir"
    config_mount = next(m for m in container()["volumeMounts"] if m["mountPath"] == "/etc/chatproxy")
    assert config_mount["readOnly"] is True


def test_objects_select_the_deployments_pods():
    """The Deployment's selector matches its pod template; the Service, the
    PodDisruptionBudget and the spread constraints select those pods; the autoscaler scales
    the Deployment and keeps at least its replicas; there are 2 replicas or more, rolled
    out without taking one away first, spread over zones."""
    deployment = the("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert the("Service")["spec"]["selector"] == selector
    assert the("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    spread = pod_spec()["topologySpreadConstraints"]
    assert all(c["labelSelector"]["matchLabels"] == selector for c in spread)
    assert "topology.kubernetes.io/zone" in {c["topologyKey"] for c in spread}
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = the("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert hpa["minReplicas"] >= deployment["spec"]["replicas"]
    service = the("Service")["spec"]
    assert service["type"] == "LoadBalancer" and service["externalTrafficPolicy"] == "Local"


def test_containerfile_matches_the_deployment():
    """The Containerfile builds on python:3.11-slim-bookworm with Debian's libmodsecurity3 and
    modsecurity-crs, installs this checkout with pip into /opt/chatproxy, and runs twistd
    exactly as the Deployment's command and arguments do; the Deployment's image is the
    chatproxy-gateway image of this version; the build command in its comment is the one
    docs/operations.md gives."""
    instructions = containerfile_instructions()
    assert instructions["FROM"] == ["python:3.11-slim-bookworm"]
    run = " ".join(instructions["RUN"])
    assert "apt-get install -y --no-install-recommends libmodsecurity3 modsecurity-crs" in run
    assert "python3 -m venv /opt/chatproxy" in run and "/opt/chatproxy/bin/pip install" in run
    entrypoint = json.loads(instructions["ENTRYPOINT"][-1]) + json.loads(instructions["CMD"][-1])
    assert entrypoint == container()["command"] + container()["args"]
    assert shlex.join(entrypoint) == "/opt/chatproxy/bin/twistd --nodaemon --pidfile= chatproxy --config /etc/chatproxy/"
    assert container()["image"].endswith(f"/chatproxy-gateway:{chatproxy.__version__}")
    build = "docker build -f etc/deploy/Containerfile -t chatproxy-gateway:VERSION ."
    assert build in CONTAINERFILE.read_text()
    assert build in (ROOT / "docs" / "operations.md").read_text()
    # What the COPY instructions take in is what `pip install .` needs.
    copied = {part for line in instructions["COPY"] for part in line.split()[:-1]}
    assert copied == {"pyproject.toml", "setup.cfg", "README.md", "chatproxy", "twisted"}
