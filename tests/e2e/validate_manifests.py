"""Checks everything under envoy/ that can be checked without a cluster or connector-authz.

    tests/e2e/validate_manifests.sh      # installs what it needs, then runs this

- Envoy templates: each renders with the documented placeholders and passes
  `envoy --mode validate`; front-proxy.yaml runs against echo upstreams with no
  connector-authz and must fail closed (503), route and rewrite, and reject %2F.
- Kubernetes manifests: `kubernetes-validate --strict` (schemas ship in the wheel, offline).
- Istio resources are CRDs that kubernetes-validate has no schema for (it only warns), so
  their structure is checked here, with the facts the files must agree on across each other:
  provider name, service host and port, pod labels, config and cache paths.
- Dockerfile: final stage is distroless, non-root (same uid as deployment.yaml), ENTRYPOINT
  /connector-authz. It is not built: no docker daemon or image registry on CI.
- The ConfigMap's config.yaml: keys and addresses; `connector-authz check-config` too when a
  binary is found ($CONNECTOR_AUTHZ_BIN or target/{release,debug}/connector-authz).

Ends with "N passed, N failed" and exits 1 if any check failed.
"""

import glob
import os
import subprocess
import sys
import tempfile
import traceback

import yaml

sys.path.insert(0, os.path.dirname(__file__))
from harness import REPO, EchoUpstream, Envoy, envoy_binary, free_port, render  # noqa: E402

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def load(path):
    with open(os.path.join(REPO, path)) as f:
        return yaml.safe_load(f)


def only_keys(where, mapping, allowed):
    unknown = set(mapping) - set(allowed)
    assert not unknown, f"{where}: unexpected keys {sorted(unknown)} (allowed: {sorted(allowed)})"


PLACEHOLDERS = {
    "envoy/front-proxy.yaml": ["LISTEN_PORT", "ADMIN_PORT", "AUTHZ_PORT", "AI_UPSTREAM_PORT", "OBS_UPSTREAM_PORT"],
    "envoy/sidecar.yaml": ["LISTEN_PORT", "ADMIN_PORT", "AUTHZ_PORT", "BACKEND_PORT"],
}


def envoy_validate(template, values):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(render(template, **values))
        f.flush()
        out = subprocess.run([envoy_binary(), "--mode", "validate", "-c", f.name],
                             capture_output=True, text=True)
    assert out.returncode == 0, f"envoy --mode validate {template}:\n{out.stdout}{out.stderr}"
    for line in (out.stdout + out.stderr).splitlines():
        assert "deprecated" not in line.lower(), f"{template}: {line}"


for _template, _keys in PLACEHOLDERS.items():
    def _check(template=_template, keys=_keys):
        envoy_validate(template, {k: 10000 + i for i, k in enumerate(keys)})
    _check.__name__ = f"envoy --mode validate {_template}"
    check(_check)

    def _missing(template=_template, keys=_keys):
        out = subprocess.run([os.path.join(REPO, "scripts", "render-envoy-config.sh"),
                              os.path.join(REPO, template)], capture_output=True, text=True)
        assert out.returncode == 1, "rendering without values must fail"
        for key in keys:
            assert "${%s}" % key in out.stderr, f"{key} not reported as missing: {out.stderr}"
    _missing.__name__ = f"{_template}: placeholders are exactly the documented ones"
    check(_missing)


@check
def front_proxy_fails_closed_and_rejects_escaped_slash():
    import json
    with EchoUpstream("ai") as ai, EchoUpstream("obs") as obs:
        dead_authz = free_port()  # nothing listens: connector-authz is "down"
        with Envoy("envoy/front-proxy.yaml", AUTHZ_PORT=dead_authz,
                   AI_UPSTREAM_PORT=ai.port, OBS_UPSTREAM_PORT=obs.port) as envoy:
            status, _, _ = envoy.get("/ai/v2/code/completions")
            assert status == 503, f"connector-authz down must give 503 (status_on_error), got {status}"
            status, _, _ = envoy.get("/observability/v1/x")
            assert status == 503, status
            status, _, _ = envoy.get("/ai/v2%2Fcode/completions")
            assert status == 400, f"%2F must be rejected (400), got {status}"
            stats = envoy.stats()
            assert stats.get("http.gateway.ext_authz.connector_authz.error", 0) >= 2, stats
            assert stats.get("http.gateway.ext_authz.connector_authz.failure_mode_allowed", 0) == 0
    lines = [json.loads(l) for l in envoy.log.splitlines() if l.startswith("{")]
    assert any(l["flags"] == "UAEX" and l["upstream"] == "ai_gateway" for l in lines), envoy.log


def without_ext_authz(text):
    config = yaml.safe_load(text)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_authz"]
    return yaml.safe_dump(config)


@check
def front_proxy_routes_rewrites_and_drops_forged_headers():
    """The route table and path handling alone, with the ext_authz filter taken out."""
    import json
    with EchoUpstream("ai") as ai, EchoUpstream("obs") as obs:
        with Envoy("envoy/front-proxy.yaml", transform=without_ext_authz, AUTHZ_PORT=free_port(),
                   AI_UPSTREAM_PORT=ai.port, OBS_UPSTREAM_PORT=obs.port) as envoy:
            status, _, body = envoy.get("/ai/v2//code/./completions?x=1",
                                        {"x-gitlab-authz-subject": "forged", "x-gitlab-realm": "saas"})
            assert status == 200, (status, body)
            echo = json.loads(body)
            assert echo["upstream"] == "ai" and echo["path"] == "/v2/code/completions?x=1", echo
            assert "x-gitlab-authz-subject" not in echo["headers"], echo["headers"]
            assert echo["headers"]["x-gitlab-realm"] == "saas"
            status, _, body = envoy.get("/observability/v1/traces")
            assert status == 200 and json.loads(body)["path"] == "/observability/v1/traces", body
            status, _, _ = envoy.get("/elsewhere")
            assert status == 404, status


@check
def sidecar_forwards_paths_unchanged():
    import json
    with EchoUpstream("backend") as backend:
        with Envoy("envoy/sidecar.yaml", transform=without_ext_authz, AUTHZ_PORT=free_port(),
                   BACKEND_PORT=backend.port) as envoy:
            status, _, body = envoy.get("/ai/v2/code/completions")
            assert status == 200 and json.loads(body)["path"] == "/ai/v2/code/completions", body


@check
def kubernetes_manifests_validate_strict():
    files = sorted(f for f in glob.glob(os.path.join(REPO, "envoy", "kubernetes", "*.yaml"))
                   if os.path.basename(f) != "kustomization.yaml")
    assert files, "no manifests in envoy/kubernetes/"
    out = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", *files],
                         capture_output=True, text=True)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "WARN" not in text and "ERROR" not in text, text
    assert text.count("passed") == len(files), text


def deployment():
    return load("envoy/kubernetes/deployment.yaml")


def container(name):
    return next(c for c in deployment()["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def authz_config():
    return yaml.safe_load(load("envoy/kubernetes/configmap.yaml")["data"]["config.yaml"])


@check
def istio_mesh_config_provider():
    doc = load("envoy/istio/mesh-config.yaml")
    assert doc["apiVersion"] == "install.istio.io/v1alpha1" and doc["kind"] == "IstioOperator"
    mesh = doc["spec"]["meshConfig"]
    providers = [p for p in mesh["extensionProviders"] if p["name"] == "connector-authz"]
    assert len(providers) == 1, mesh["extensionProviders"]
    grpc = providers[0]["envoyExtAuthzGrpc"]
    only_keys("envoyExtAuthzGrpc", grpc,
              ["service", "port", "timeout", "failOpen", "statusOnError", "includeRequestBodyInCheck"])
    assert grpc["failOpen"] is False
    assert isinstance(grpc["statusOnError"], str), "Istio wants statusOnError as a string"
    assert grpc["timeout"].endswith("s")
    assert grpc["port"] == int(authz_config()["listen"]["grpc"].rsplit(":", 1)[1]), \
        "provider port must be connector-authz's listen.grpc port"


@check
def istio_service_entry_points_at_loopback():
    se = load("envoy/istio/service-entry.yaml")
    assert se["apiVersion"] == "networking.istio.io/v1" and se["kind"] == "ServiceEntry"
    only_keys("ServiceEntry.spec", se["spec"],
              ["hosts", "addresses", "ports", "location", "resolution", "endpoints", "workloadSelector", "exportTo", "subjectAltNames"])
    grpc = load("envoy/istio/mesh-config.yaml")["spec"]["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"]
    assert se["spec"]["hosts"] == [grpc["service"]], "ServiceEntry host must be the provider's service"
    assert [p["number"] for p in se["spec"]["ports"]] == [grpc["port"]]
    assert se["spec"]["ports"][0]["protocol"] == "GRPC"
    assert [e["address"] for e in se["spec"]["endpoints"]] == ["127.0.0.1"]
    assert se["spec"]["resolution"] == "STATIC"


@check
def istio_authorization_policy():
    ap = load("envoy/istio/authorization-policy.yaml")
    assert ap["apiVersion"] == "security.istio.io/v1" and ap["kind"] == "AuthorizationPolicy"
    spec = ap["spec"]
    only_keys("AuthorizationPolicy.spec", spec, ["selector", "targetRef", "targetRefs", "rules", "action", "provider"])
    assert spec["action"] == "CUSTOM"
    assert spec["provider"]["name"] == "connector-authz", "provider.name must match mesh-config.yaml"
    assert spec["rules"], "CUSTOM with no rules never calls connector-authz"
    for rule in spec["rules"]:
        only_keys("rule", rule, ["from", "to", "when"])
        for to in rule.get("to", []):
            only_keys("rule.to", to, ["operation"])
            only_keys("operation", to["operation"],
                      ["hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"])
    pod_labels = deployment()["spec"]["template"]["metadata"]["labels"]
    for k, v in spec["selector"]["matchLabels"].items():
        assert pod_labels.get(k) == v, f"selector {k}={v} does not select the Deployment's pods"
    # The application port only: connector-authz's admin port (/metrics, /readyz) must not
    # go through ext_authz, which would deny it (no_route).
    app_ports = {str(p["containerPort"]) for p in container("ai-gateway")["ports"]}
    admin_port = str(int(authz_config()["listen"]["admin"].rsplit(":", 1)[1]))
    for rule in spec["rules"]:
        for to in rule.get("to", []):
            ports = to["operation"].get("ports")
            assert ports, f"rule without ports also sends the admin port {admin_port} to ext_authz: {rule}"
            assert set(ports) <= app_ports and admin_port not in ports, (ports, app_ports)


@check
def configmap_config_matches_design():
    cfg = authz_config()
    only_keys("config.yaml", cfg, ["listen", "issuers", "keys", "tokens", "backends", "unit_primitives", "enforce_min_version"])
    only_keys("listen", cfg["listen"], ["grpc", "admin"])
    assert cfg["listen"]["grpc"] == "127.0.0.1:9191", "gRPC stays on loopback in a sidecar"
    assert cfg["listen"]["admin"] == "0.0.0.0:9192", "kubelet probes the pod IP"
    assert [i["url"] for i in cfg["issuers"]] == ["https://customers.gitlab.com", "https://gitlab.com"]
    only_keys("keys", cfg["keys"], ["refresh_interval", "min_refresh_interval", "fetch_timeout", "cache_dir"])
    only_keys("tokens", cfg["tokens"], ["algorithms", "leeway", "max_bytes"])
    assert cfg["tokens"]["algorithms"] == ["RS256"]
    assert cfg["unit_primitives"] == IMAGE_REGISTRY, "the registry the image ships"
    with open(os.path.join(REPO, "config", "connector-authz.yaml")) as f:
        shipped = yaml.safe_load(f)
    assert cfg["backends"] == shipped["backends"], "routes differ from config/connector-authz.yaml"
    for backend in cfg["backends"]:
        only_keys("backend", backend, ["name", "audience", "backend_service", "routes", "forward_claims", "mode"])
        for route in backend["routes"]:
            only_keys("route", route, ["prefix", "path", "methods", "require", "require_any",
                                       "user_tokens", "unit_primitive_header", "public"])
            assert ("prefix" in route) != ("path" in route), route


@check
def deployment_wires_config_ports_and_cache():
    c = container("connector-authz")
    cfg = authz_config()
    args = split_flags(c["args"])
    assert "serve" in args and "--config" in args, args
    config_path = args[args.index("--config") + 1]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment()["spec"]["template"]["spec"]["volumes"]}
    assert os.path.dirname(config_path) == mounts["config"], "--config must be inside the ConfigMap mount"
    assert volumes["config"]["configMap"]["name"] == load("envoy/kubernetes/configmap.yaml")["metadata"]["name"]
    assert os.path.basename(config_path) in load("envoy/kubernetes/configmap.yaml")["data"]
    assert mounts["key-cache"] == cfg["keys"]["cache_dir"] and "emptyDir" in volumes["key-cache"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 9191, "admin": 9192}
    assert int(cfg["listen"]["admin"].rsplit(":", 1)[1]) == ports["admin"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["resources"]["requests"] and c["resources"]["limits"]


def split_flags(args):
    """`--flag=value` as two arguments, as clap reads it."""
    out = []
    for a in args:
        out.extend(a.split("=", 1) if a.startswith("--") and "=" in a else [a])
    return out


def duration_seconds(text):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit) and text[: -len(unit)].isdigit():
            return int(text[: -len(unit)]) * units[unit]
    raise AssertionError(f"not a duration this check reads: {text}")


def env_vars_the_binary_reads():
    """Every variable named in a std::env / EnvFilter read in src/, and the proxy variables
    that reqwest's default client reads (hyper-util's proxy matcher: upper and lower case)."""
    import re
    names = set()
    for path in glob.glob(os.path.join(REPO, "src", "**", "*.rs"), recursive=True):
        with open(path) as f:
            text = f.read()
        names.update(re.findall(r'(?:env::var(?:_os)?|try_from_env)\(\s*"([A-Za-z0-9_]+)"', text))
    for proxy in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"):
        names.update({proxy, proxy.lower()})
    return names


@check
def deployment_sets_only_variables_the_binary_reads_and_shuts_down_in_time():
    c = container("connector-authz")
    read = env_vars_the_binary_reads()
    assert "CONNECTOR_AUTHZ_LOG" in read, f"the log filter variable is not found in src/: {sorted(read)}"
    for env in c.get("env", []):
        assert env["name"] in read, f"deployment.yaml sets {env['name']}, which connector-authz never reads"
    assert any(e["name"] == "CONNECTOR_AUTHZ_LOG" for e in c.get("env", []))
    args = split_flags(c["args"])
    assert args[args.index("--log-format") + 1] == "json", "kubectl logs wants JSON"
    delay = duration_seconds(args[args.index("--shutdown-delay") + 1]) if "--shutdown-delay" in args else 5
    drain = duration_seconds(args[args.index("--drain-timeout") + 1]) if "--drain-timeout" in args else 10
    assert delay > 0, "without a shutdown delay rollouts fail Checks"
    grace = deployment()["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    assert grace > delay + drain, f"terminationGracePeriodSeconds {grace} <= shutdown delay {delay} + drain {drain}"
    for other in deployment()["spec"]["template"]["spec"]["containers"]:
        sleep = other.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert sleep < grace, f"{other['name']}: preStop sleep {sleep} >= grace {grace}"


def namespaced_manifests(directory):
    files = sorted(glob.glob(os.path.join(REPO, directory, "*.yaml")))
    docs = {}
    for path in files:
        name = os.path.basename(path)
        with open(path) as f:
            doc = yaml.safe_load(f)
        if name == "kustomization.yaml" or doc.get("kind") == "IstioOperator":
            continue
        docs[name] = doc
    return docs


@check
def kustomizations_set_the_namespace_for_every_manifest():
    for directory in ("envoy/kubernetes", "envoy/istio"):
        kust = load(f"{directory}/kustomization.yaml")
        assert kust["kind"] == "Kustomization" and kust.get("namespace"), kust
        docs = namespaced_manifests(directory)
        assert sorted(kust["resources"]) == sorted(docs), \
            f"{directory}/kustomization.yaml lists {sorted(kust['resources'])}, the directory has {sorted(docs)}"
        for name, doc in docs.items():
            ns = doc["metadata"].get("namespace")
            assert ns in (None, kust["namespace"]), f"{directory}/{name} hard-codes namespace {ns}"
    assert load("envoy/kubernetes/kustomization.yaml")["namespace"] == load("envoy/istio/kustomization.yaml")["namespace"]


@check
def kubectl_kustomize_renders_both():
    import shutil
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return "skipped: no kubectl (kubectl kustomize renders the kustomizations offline)"
    for directory in ("envoy/kubernetes", "envoy/istio"):
        out = subprocess.run([kubectl, "kustomize", os.path.join(REPO, directory)], capture_output=True, text=True)
        assert out.returncode == 0, f"kubectl kustomize {directory}:\n{out.stderr}"
        namespace = load(f"{directory}/kustomization.yaml")["namespace"]
        rendered = list(yaml.safe_load_all(out.stdout))
        assert rendered and all(d["metadata"]["namespace"] == namespace for d in rendered), out.stdout


@check
def istio_egress_covers_every_network_issuer():
    from urllib.parse import urlparse
    se = load("envoy/istio/egress.yaml")
    assert se["kind"] == "ServiceEntry" and se["spec"]["location"] == "MESH_EXTERNAL"
    assert [p["number"] for p in se["spec"]["ports"]] == [443]
    hosts = set(se["spec"]["hosts"])
    for issuer in authz_config()["issuers"]:
        if "jwks_file" in issuer:
            continue
        for url in (issuer["url"], issuer.get("jwks_uri")):
            if url:
                assert urlparse(url).hostname in hosts, f"{url}: host not in envoy/istio/egress.yaml"


@check
def dockerfile_runs_non_root_binary():
    """Docker cannot run here (no daemon, no registry): check the final stage's text."""
    with open(os.path.join(REPO, "Dockerfile")) as f:
        lines = [l.strip() for l in f if l.strip() and not l.lstrip().startswith("#")]
    final = lines[max(i for i, l in enumerate(lines) if l.startswith("FROM ")):]
    assert "distroless" in final[0], final[0]
    user = next(l.split()[1] for l in final if l.startswith("USER "))
    uid = int(user.split(":")[0])
    assert uid != 0, "runs as root"
    assert uid == container("connector-authz")["securityContext"]["runAsUser"], \
        "Dockerfile USER and deployment.yaml runAsUser differ"
    assert 'ENTRYPOINT ["/connector-authz"]' in final
    assert any(l.startswith("COPY --from=") and l.endswith(" /connector-authz") for l in final)


# Where the Dockerfile puts the registry; check-config reads the repository's copy instead.
IMAGE_REGISTRY = "/usr/share/connector-authz/cloud_connector"


def connector_authz_binary():
    if os.environ.get("CONNECTOR_AUTHZ_BIN"):
        return os.environ["CONNECTOR_AUTHZ_BIN"]
    for profile in ("release", "debug"):
        path = os.path.join(REPO, "target", profile, "connector-authz")
        if os.access(path, os.X_OK):
            return path
    return None


@check
def configmap_config_passes_check_config():
    binary = connector_authz_binary()
    if binary is None:
        return "skipped: no connector-authz binary (set CONNECTOR_AUTHZ_BIN or cargo build)"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        text = load("envoy/kubernetes/configmap.yaml")["data"]["config.yaml"]
        assert IMAGE_REGISTRY in text
        f.write(text.replace(IMAGE_REGISTRY, os.path.join(REPO, "config", "cloud_connector")))
        f.flush()
        out = subprocess.run([binary, "check-config", "--config", f.name], capture_output=True, text=True)
    assert out.returncode == 0, f"check-config failed:\n{out.stdout}{out.stderr}"


def main():
    passed = failed = skipped = 0
    for fn in CHECKS:
        name = fn.__name__.replace("_", " ") if " " not in fn.__name__ else fn.__name__
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            failed += 1
            print(f"FAIL {name}: {e}")
            if not isinstance(e, AssertionError):
                traceback.print_exc()
            continue
        if isinstance(result, str) and result.startswith("skipped"):
            skipped += 1
            print(f"SKIP {name}: {result}")
        else:
            passed += 1
            print(f"ok   {name}")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
