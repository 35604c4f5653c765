"""deploy/kubernetes cannot run here (no cluster). Every overlay, alone and with the scale-to-zero component, is
rendered with `kubectl kustomize` from the operator's secret files (written here with random values), each object
is validated against its schema (core kinds: kubernetes-validate's offline schemas; KEDA's: its published CRDs in
tests/fixtures/keda, unknown fields refused as `kubectl apply` does), and checked against the code it deploys:
commands and settings parse, probes hit real routes on the right ports, the queue names are the broker's."""

from __future__ import annotations

import base64
import copy
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from server.api.routes import score, system
from server.cli import build_parser
from server.commands.service import settings_from
from server.queue.keys import GROUP, Keys
from server.queue.messages import TaskKind
from server.settings import Settings
from server.worker_http import worker_app
from server.worker_metrics import WorkerMetrics
from tests.service_stack import drop_service_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
KEDA_CRDS = ROOT / "tests" / "fixtures" / "keda"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
COMPONENTS = sorted(p.name for p in (DEPLOY / "components").iterdir() if (p / "kustomization.yaml").is_file())
VARIANTS = [(o, ()) for o in OVERLAYS] + [(o, (c,)) for o in OVERLAYS for c in COMPONENTS]
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())  # the oldest the README names, and the newest
CORE_KINDS = {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet", "PodDisruptionBudget"}
KEDA_KINDS = {"ScaledObject": "scaledobjects", "TriggerAuthentication": "triggerauthentications"}
DB_URL = re.compile(r"^(?P<scheme>rediss?)://(?P<userinfo>[^@/]*@)?(?P<host>[^:/]+):(?P<port>\d+)/(?P<db>\d+)")


def kubectl() -> str:
    """The manifests' tests fail, never skip, without kubectl (.ci/run checks for it first)."""
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is not installed: the Kubernetes manifests are rendered with `kubectl kustomize`; "
                    "install kubectl (it ships kustomize)")
    return found


def kustomization(overlay: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "overlays" / overlay / "kustomization.yaml").read_text())


def generator_files(overlay: str) -> dict[str, str]:
    """Secret key -> the file the operator writes, of every Secret the overlay generates."""
    return {key: path for gen in kustomization(overlay).get("secretGenerator", [])
            for key, _, path in (f.partition("=") for f in gen.get("files", []))}


def operator_secrets(overlay: str) -> dict[str, str]:
    """Fresh random values for the overlay's secret files, consistent with each other as an operator's are."""
    password = secrets.token_hex(16)
    values = {"password": password, "api-keys": f"k-{secrets.token_hex(8)},k-{secrets.token_hex(8)}",
              "address": "redis.example.net:6380", "url": f"redis://:{password}@redis.example.net:6380/0"}
    files = generator_files(overlay)
    unknown = set(files) - set(values)
    assert not unknown, f"{overlay}: secret keys this test does not know how to fill: {unknown}"
    return {files[key]: values[key] for key in files}


@dataclass
class Render:
    name: str
    objects: list[dict[str, Any]]
    secret_values: list[str]  # what the operator's files held

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: {len(found)} {kind} objects named {name}"
        return found[0]

    def component(self, kind: str, component: str) -> dict[str, Any]:
        found = [o for o in self.all(kind) if o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
        assert len(found) == 1, f"{self.name}: {len(found)} {kind} objects of component {component}"
        return found[0]

    def secret(self, name: str) -> dict[str, str]:
        return {k: base64.b64decode(v).decode() for k, v in self.get("Secret", name)["data"].items()}


def render(root: Path, overlay: str, components: tuple[str, ...]) -> Render:
    tree = root / "kubernetes"
    shutil.copytree(DEPLOY, tree)
    written = operator_secrets(overlay)
    for path, value in written.items():
        (tree / "overlays" / overlay / path).write_text(value)
    target = tree / "overlays" / overlay
    if components:
        target = tree / "overlays" / f"{overlay}-with-components"
        target.mkdir()
        target.joinpath("kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [f"../{overlay}"], "components": [f"../../components/{c}" for c in components]}))
    out = subprocess.run([kubectl(), "kustomize", str(target)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {overlay} {components}: {out.stderr}"
    name = "+".join((overlay, *components))
    return Render(name, [o for o in yaml.safe_load_all(out.stdout) if o], list(written.values()))


@pytest.fixture(scope="module", params=VARIANTS, ids=["+".join((o, *c)) for o, c in VARIANTS])
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Render:
    overlay, components = request.param
    return render(tmp_path_factory.mktemp("kustomize"), overlay, components)


# ---- schemas ------------------------------------------------------------------------------------------------
def strict(schema: Any) -> Any:
    """A CRD's schema that refuses unknown fields, as `kubectl apply`'s strict field validation does."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def keda_validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((KEDA_CRDS / f"keda.sh_{KEDA_KINDS[kind]}.yaml").read_text())
    version = api_version.split("/")[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = strict(served["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate(obj: dict[str, Any]) -> None:
    if obj["kind"] in KEDA_KINDS:
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in keda_validator(obj["kind"], obj["apiVersion"]).iter_errors(obj)]
        assert not errors, f"{obj['kind']} {obj['metadata']['name']}: {errors}"
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def test_every_object_validates_against_its_schema(rendered: Render) -> None:
    kinds = {o["kind"] for o in rendered.objects}
    assert kinds <= CORE_KINDS | set(KEDA_KINDS), f"kinds without a schema here: {kinds - CORE_KINDS - set(KEDA_KINDS)}"
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Secret", *KEDA_KINDS} <= kinds
    for obj in rendered.objects:
        validate(obj)


def test_the_validators_refuse_a_wrong_field(tmp_path: Path) -> None:
    """The checks above would pass vacuously if the validators accepted anything."""
    rendered = render(tmp_path, OVERLAYS[0], ())
    deployment = copy.deepcopy(rendered.all("Deployment")[0])
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    scaled = copy.deepcopy(rendered.all("ScaledObject")[0])
    scaled["spec"]["minReplicas"] = 0
    scaled["spec"]["triggers"][0]["metadata"]["lagCount"] = 64  # KEDA takes strings only
    errors = {e.message for e in keda_validator("ScaledObject", scaled["apiVersion"]).iter_errors(scaled)}
    assert any("'minReplicas' was unexpected" in e for e in errors) and "64 is not of type 'string'" in errors


# ---- what runs in the containers --------------------------------------------------------------------------
def environment(r: Render, container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: ConfigMaps, then env in order, $(VAR) expanded
    from what is already defined (an undefined one fails here, where Kubernetes would leave it unexpanded)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(r.get("ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = r.secret(ref["name"])[ref["key"]]
    return env


def effective_settings(r: Render, container: dict[str, Any]) -> Settings:
    """Settings exactly as the container's `dvreward` command builds them: its flags over its environment."""
    argv = container["command"]
    assert argv[0] == "dvreward", argv
    with pytest.MonkeyPatch.context() as mp:
        drop_service_settings(mp)
        for name, value in environment(r, container).items():
            mp.setenv(name, value)
        return settings_from(build_parser().parse_args(argv[1:]))


def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def only_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod(deployment)["containers"]
    return container


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return found


def test_env_and_configmap_names_are_real_settings(rendered: Render) -> None:
    for cm in rendered.all("ConfigMap"):
        for key in cm["data"]:
            assert key.startswith("DVREWARD_") and key.removeprefix("DVREWARD_").lower() in Settings.model_fields, \
                f"ConfigMap {cm['metadata']['name']}: {key} is not a setting"
    for component in ("api", "worker"):
        container = only_container(rendered.component("Deployment", component))
        expanded = " ".join(i.get("value", "") for i in container.get("env", []))
        for item in container.get("env", []):
            name = item["name"]
            if name.startswith("DVREWARD_"):
                assert name.removeprefix("DVREWARD_").lower() in Settings.model_fields, f"{component}: {name}"
            else:  # a helper variable, there only to be expanded into a setting
                assert f"$({name})" in expanded, f"{component}: {name} is neither a setting nor used by one"


def test_commands_parse_and_settings_are_valid(rendered: Render) -> None:
    api = effective_settings(rendered, only_container(rendered.component("Deployment", "api")))
    worker = effective_settings(rendered, only_container(rendered.component("Deployment", "worker")))
    assert api.redis_url and api.redis_url == worker.redis_url, "API and workers share one Redis"
    assert api.api_keys and all(k.startswith("k-") for k in api.api_keys), "API keys come from their Secret"
    for name in ("queue_prefix", "visibility_timeout_s", "verifier", "decomposer", "pipeline", "request_timeout_s"):
        assert getattr(api, name) == getattr(worker, name), f"API and workers must share {name}"
    assert worker.device == "cuda" and worker.host == api.host == "0.0.0.0"


def test_api_deployment(rendered: Render) -> None:
    deployment = rendered.component("Deployment", "api")
    container = only_container(deployment)
    s = effective_settings(rendered, container)
    assert deployment["spec"]["replicas"] >= 2
    assert port_number(container, "http") == s.port
    routes = {r.path: r for r in [*system.router.routes, *score.router.routes]}  # type: ignore[attr-defined]
    for probe, base in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        url = urlsplit(get["path"])
        assert url.path == base and port_number(container, get["port"]) == s.port, (probe, get)
        accepted = {p.alias for p in routes[url.path].dependant.query_params}  # type: ignore[attr-defined]
        assert set(parse_qs(url.query)) <= accepted, f"{probe}: {url.query} are not parameters of {url.path}"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    stop_delay = sum(int(a) for a in container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
                     .get("command", [])[1:])
    assert pod(deployment)["terminationGracePeriodSeconds"] > s.request_timeout_s + stop_delay, \
        "requests in flight must finish before the API is killed"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == s.port and annotations["prometheus.io/path"] == "/metrics"
    uid = re.search(r"useradd .*--uid (\d+)", (ROOT / "docker" / "api.Dockerfile").read_text())
    assert uid and pod(deployment)["securityContext"]["runAsUser"] == int(uid.group(1)), "the image's own user"

    labels = deployment["spec"]["selector"]["matchLabels"]
    (service,) = [sv for sv in rendered.all("Service") if sv["spec"]["selector"] == labels]
    assert port_number(container, service["spec"]["ports"][0]["targetPort"]) == s.port
    (pdb,) = [p for p in rendered.all("PodDisruptionBudget") if p["spec"]["selector"]["matchLabels"] == labels]
    assert 1 <= pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"], "a drain can proceed, one stays up"


def test_worker_deployment(rendered: Render) -> None:
    deployment = rendered.component("Deployment", "worker")
    container = only_container(deployment)
    s = effective_settings(rendered, container)
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count; `kubectl apply` must not reset it"
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"].get("nvidia.com/gpu", 1) == 1
    assert s.worker_metrics_port > 0
    get = container["readinessProbe"]["httpGet"]
    paths = {r.path for r in worker_app(WorkerMetrics(), lambda: None).routes}  # type: ignore[attr-defined]
    assert get["path"] == "/readyz" and get["path"] in paths
    assert port_number(container, get["port"]) == s.worker_metrics_port
    assert pod(deployment)["terminationGracePeriodSeconds"] > s.batch_timeout_s, \
        "SIGTERM must leave the worker time to finish the batch in hand"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == s.worker_metrics_port
    assert "/metrics" in paths and annotations["prometheus.io/path"] == "/metrics"


def test_api_and_worker_images_share_a_version() -> None:
    """API and workers exchange tasks in a format of their own: every overlay pins both to one tag."""
    for overlay in OVERLAYS:
        tags = {i["name"]: i["newTag"] for i in kustomization(overlay)["images"]}
        assert set(tags) == {"dvreward-api", "dvreward-worker"} and len(set(tags.values())) == 1, (overlay, tags)


# ---- autoscaling ----------------------------------------------------------------------------------------------
def test_scaled_object_reads_the_brokers_streams(rendered: Render) -> None:
    (scaled,) = rendered.all("ScaledObject")
    worker_deployment = rendered.component("Deployment", "worker")
    s = effective_settings(rendered, only_container(worker_deployment))
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == worker_deployment["metadata"]["name"]
    assert 0 <= spec["minReplicaCount"] < spec["maxReplicaCount"] and spec["cooldownPeriod"] > 0
    keys = Keys(s.queue_prefix)
    assert {t["metadata"]["stream"] for t in spec["triggers"]} == {keys.stream(k) for k in TaskKind}
    assert keys.stream(TaskKind.verify) == "dvr:stream:verify", "the default prefix, as the issue names it"
    url = DB_URL.match(s.redis_url or "")
    assert url, s.redis_url
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams" and meta["consumerGroup"] == GROUP
        assert int(meta["lagCount"]) > 0 and int(meta["activationLagCount"]) >= 0
        assert meta["databaseIndex"] == url.group("db"), "KEDA must read the database the services use"
        auth = rendered.get("TriggerAuthentication", trigger["authenticationRef"]["name"])
        refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
        assert set(refs) == {"address", "password"}
        values = {p: rendered.secret(r["name"])[r["key"]] for p, r in refs.items()}
        assert values["address"].rsplit(":", 1)[1] == url.group("port")
        assert (url.group("userinfo") or "").removesuffix("@").lstrip(":") == values["password"], \
            "KEDA authenticates with the services' password"
        if url.group("host") in {sv["metadata"]["name"] for sv in rendered.all("Service")}:
            namespace = worker_deployment["metadata"]["namespace"]
            assert values["address"].split(":")[0] == f"{url.group('host')}.{namespace}.svc.cluster.local", \
                "KEDA runs in its own namespace: it needs the in-cluster Redis by its full name"
        else:
            assert values["address"].split(":")[0] == url.group("host")


def test_scale_to_zero_keeps_the_api_ready_without_workers(rendered: Render) -> None:
    """At zero workers the API must still take requests, or no task would ever wake a worker."""
    (scaled,) = rendered.all("ScaledObject")
    probe = only_container(rendered.component("Deployment", "api"))["readinessProbe"]["httpGet"]["path"]
    needs_worker = parse_qs(urlsplit(probe).query).get("require_worker", ["true"]) != ["false"]
    assert (scaled["spec"]["minReplicaCount"] == 0) == (not needs_worker), (rendered.name, probe)
    assert ("scale-to-zero" in rendered.name) == (scaled["spec"]["minReplicaCount"] == 0)


# ---- Redis and secrets ----------------------------------------------------------------------------------------
def test_in_cluster_redis_persists_and_requires_the_password(rendered: Render) -> None:
    stateful = rendered.all("StatefulSet")
    if not stateful:
        assert "many-nodes" in rendered.name, "only the external-Redis overlay runs without its own Redis"
        return
    (redis,) = stateful
    (container,) = pod(redis)["containers"]
    image, _, tag = container["image"].partition(":")
    assert image == "redis" and int(tag.split(".")[0]) >= 7, "KEDA's lag trigger needs Redis >= 7"
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data = args[args.index("--dir") + 1]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == data]
    assert mount["name"] in {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    env = environment(rendered, container)
    password = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], args[args.index("--requirepass") + 1])
    api = effective_settings(rendered, only_container(rendered.component("Deployment", "api")))
    assert api.redis_url == f"redis://:{password}@{redis['spec']['serviceName']}:6379/0"
    assert password in rendered.secret_values


def test_no_secret_value_outside_secrets(rendered: Render) -> None:
    """The operator's values reach the Secrets and nothing else; the rest refer to them."""
    for obj in rendered.objects:
        if obj["kind"] == "Secret":
            continue
        text = yaml.safe_dump(obj)
        for value in rendered.secret_values:
            assert value not in text, f"a secret value is written into {obj['kind']} {obj['metadata']['name']}"
        for url in re.findall(r"\w+://[^\s'\"]+", text):
            userinfo = urlsplit(url).netloc.rpartition("@")[0]
            assert not userinfo or re.fullmatch(r":?\$\([A-Z_]+\)", userinfo), f"credentials in {url}"
    for secret in rendered.all("Secret"):
        assert re.search(r"-[a-z0-9]{10}$", secret["metadata"]["name"]), "Secrets are generated (hashed names)"


def test_plain_manifests_hold_no_secret() -> None:
    """No committed manifest defines a Secret; generators read only git-ignored files (one non-secret literal:
    where KEDA reaches the in-cluster Redis)."""
    for path in DEPLOY.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), f"{path} defines a Secret"
    for overlay in OVERLAYS:
        for gen in kustomization(overlay).get("secretGenerator", []):
            assert {k.partition("=")[0] for k in gen.get("literals", [])} <= {"address"}, (overlay, gen)
            for spec in gen.get("files", []):
                path = DEPLOY / "overlays" / overlay / spec.partition("=")[2]
                ignore = (path.parent / ".gitignore").read_text().split()
                assert path.parent.name == "secrets" and "*" in ignore, f"{path} is not git-ignored"


def test_readme_walks_an_operator_through_each_overlay() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Kubernetes\n"):]
    section = section[:re.search(r"\n#{2,3} ", section[4:]).start() + 4]  # type: ignore[union-attr]
    for overlay in OVERLAYS:
        assert f"kubectl apply -k deploy/kubernetes/overlays/{overlay}" in section, overlay
        for path in generator_files(overlay).values():
            assert f"deploy/kubernetes/overlays/{overlay}/{path}" in section, f"README does not say to write {path}"
    for component in COMPONENTS:
        assert f"components/{component}" in section
    for needed in ("Redis >= 7", "DVREWARD_WORKER_METRICS_PORT", "/readyz", "KEDA"):
        assert needed in section, needed
