#!/usr/bin/env bash
# Offline checks of deploy/: renders the kustomize base and overlays,
# validates the rendered objects against the Kubernetes OpenAPI schemas
# (kubernetes-validate), checks the CRD objects' key fields, checks the
# Grafana dashboard's JSON, the metric names used by the dashboard and the
# alert rules, and the alert rules with promtool. Exits non-zero on any failure.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."   # the repository root
K8S_VERSIONS=(1.29.0 1.32.0)   # oldest we support, kubectl's own
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need kubectl; then echo "check: kubectl is required" >&2; exit 1; fi
if ! need kubernetes-validate; then
  echo "check: installing kubernetes-validate (pip)"
  python3 -m pip install --quiet kubernetes-validate
fi
if ! need promtool; then
  echo "check: installing promtool (Debian package prometheus)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# CRD kinds kubernetes-validate has no schema for: it reports them as WARN
# "Couldn't find schema" and passes them. Any other WARN (a typo in a core
# apiVersion or kind, say) is a failure here.
crd_kinds='ScaledObject|TriggerAuthentication|ServiceMonitor|RabbitmqCluster'

for dir in deploy/k8s deploy/k8s/overlays/hpa deploy/k8s/overlays/rabbitmq; do
  name="$(echo "$dir" | tr '/' '_')"
  kubectl kustomize "$dir" > "$out/$name.yaml"
  echo "check: rendered $dir ($(grep -c '^kind:' "$out/$name.yaml") objects)"
  for v in "${K8S_VERSIONS[@]}"; do
    log="$out/$name-$v.log"
    if ! kubernetes-validate --strict --quiet -k "$v" "$out/$name.yaml" > "$log" 2>&1; then
      cat "$log" >&2; echo "check: $dir does not validate against Kubernetes $v" >&2; exit 1
    fi
    if grep -v "^WARN .*Couldn't find schema for kind \($(echo "$crd_kinds" | sed 's/|/\\|/g')\) " "$log" | grep -q .; then
      cat "$log" >&2; echo "check: $dir: unexpected kubernetes-validate output against $v" >&2; exit 1
    fi
    echo "check: $dir valid against Kubernetes $v (strict; not schema-checked: $(grep -o 'kind [A-Za-z]*' "$log" | cut -d' ' -f2 | sort -u | tr '\n' ' '))"
  done
done

# The CRD objects have no schema offline: check the fields that matter.
python3 - "$out" <<'PY'
import sys, yaml
out = sys.argv[1]
def load(name):
    return [d for d in yaml.safe_load_all(open(f"{out}/{name}.yaml")) if d]
def kinds(docs, kind):
    return [d for d in docs if d["kind"] == kind]
base = load("deploy_k8s")
hpa = load("deploy_k8s_overlays_hpa")
rmq = load("deploy_k8s_overlays_rabbitmq")
errors = []
def check(cond, msg):
    if not cond: errors.append(msg)

deploys = {d["metadata"]["name"]: d for d in kinds(base, "Deployment")}
check(set(deploys) == {"syncfleet-producer", "syncfleet-worker"}, f"deployments: {sorted(deploys)}")
for d in base + hpa + rmq:
    check(d["metadata"].get("namespace", "syncfleet") == "syncfleet" and (d["kind"] != "Namespace" or d["metadata"]["name"] == "syncfleet"),
          f"{d['kind']}/{d['metadata']['name']} not in namespace syncfleet")
    check("app.kubernetes.io/component" in d["metadata"].get("labels", {}) or d["kind"] == "Namespace",
          f"{d['kind']}/{d['metadata']['name']} has no component label")
so, = kinds(base, "ScaledObject")
check(so["spec"]["scaleTargetRef"]["name"] == "syncfleet-worker", "ScaledObject target")
check((so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (1, 20), "ScaledObject min/max")
trig, = so["spec"]["triggers"]
m = trig["metadata"]
check(trig["type"] == "rabbitmq" and m.get("protocol") == "http" and m.get("mode") == "QueueLength"
      and m.get("queueName") == "syncfleet.work" and m.get("value") == "50", f"ScaledObject trigger {trig}")
ta, = kinds(base, "TriggerAuthentication")
check(trig["authenticationRef"]["name"] == ta["metadata"]["name"], "authenticationRef")
secret, = kinds(base, "Secret")
for ref in ta["spec"]["secretTargetRef"]:
    check(ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], f"TriggerAuthentication ref {ref}")
for key in ("SYNCFLEET_SOURCE_URL", "SYNCFLEET_DESTINATION_URL", "SYNCFLEET_AMQP_URL", "SYNCFLEET_RABBITMQ_MANAGEMENT_URL"):
    check(key in secret["stringData"], f"secret lacks {key}")
svc, = kinds(base, "Service")
sm, = kinds(base, "ServiceMonitor")
check(all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()), "ServiceMonitor selector does not match the Service")
check({e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}, "ServiceMonitor port")
for d in deploys.values():
    pod = d["spec"]["template"]
    check(all(pod["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items()), f"{d['metadata']['name']} not behind the metrics Service")
    c, = pod["spec"]["containers"]
    check(c["args"][1:] == ["--config", "/etc/syncfleet/syncfleet.toml"], f"{d['metadata']['name']} args")
    check(pod["spec"]["securityContext"]["runAsNonRoot"] is True, "runAsNonRoot")
check(deploys["syncfleet-worker"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120, "worker grace")
check(deploys["syncfleet-producer"]["spec"]["replicas"] == 2, "producer replicas")
check(not kinds(base, "HorizontalPodAutoscaler"), "the base must not have an HPA")
check(not kinds(hpa, "ScaledObject") and len(kinds(hpa, "HorizontalPodAutoscaler")) == 1, "hpa overlay: HPA without ScaledObject")
h, = kinds(hpa, "HorizontalPodAutoscaler")
check(h["spec"]["scaleTargetRef"]["name"] == "syncfleet-worker", "HPA target")
rc, = kinds(rmq, "RabbitmqCluster")
check(rc["spec"]["replicas"] == 3, "RabbitmqCluster replicas")
check(rc["spec"].get("image", "").startswith("rabbitmq:3."), "RabbitmqCluster image: a 3.x release")
check(rc["metadata"]["labels"].get("app.kubernetes.io/name") == "rabbitmq", "RabbitmqCluster labels")
# An overlay must leave syncfleet's objects wired as the base does: the
# Deployments' selectors (immutable once deployed) and pods, the metrics
# Service and the ServiceMonitor.
for name, docs in (("hpa", hpa), ("rabbitmq", rmq)):
    svc_o, = kinds(docs, "Service")
    sm_o, = kinds(docs, "ServiceMonitor")
    check(svc_o["spec"]["selector"] == svc["spec"]["selector"], f"{name} overlay: metrics Service selector")
    check(all(svc_o["metadata"]["labels"].get(k) == v for k, v in sm_o["spec"]["selector"]["matchLabels"].items()),
          f"{name} overlay: ServiceMonitor selector does not match the Service")
    for d in kinds(docs, "Deployment"):
        n = d["metadata"]["name"]
        check(d["spec"]["selector"] == deploys[n]["spec"]["selector"], f"{name} overlay: {n} selector differs from the base's")
        check(all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in svc_o["spec"]["selector"].items()),
              f"{name} overlay: {n} not behind the metrics Service")
if errors:
    print("check: CRD/field checks failed:\n  " + "\n  ".join(errors), file=sys.stderr); sys.exit(1)
print("check: CRD objects and cross-references ok")
PY

python3 -m json.tool deploy/grafana/syncfleet.json > /dev/null
python3 - <<'PY'
import json, re, sys
d = json.load(open("deploy/grafana/syncfleet.json"))
assert d["uid"] == "syncfleet", "dashboard uid"
assert any(v["name"] == "datasource" and v["type"] == "datasource" for v in d["templating"]["list"]), "datasource variable"
# Metric names may only be those of crates/syncfleet-core/src/metrics.rs.
names = set(re.findall(r'pub const \w+: &str = "(\w+)";', open("crates/syncfleet-core/src/metrics.rs").read()))
bad = {}
for path in ("deploy/grafana/syncfleet.json", "deploy/prometheus/alerts.yml"):
    for m in set(re.findall(r"\bsyncfleet_[a-z_]+", open(path).read())):
        base = re.sub(r"_(bucket|sum|count)$", "", m)
        if m not in names and base not in names:
            bad.setdefault(path, []).append(m)
if bad:
    print(f"check: unknown metric names: {bad}", file=sys.stderr); sys.exit(1)
print(f"check: dashboard ok ({len(d['panels'])} panels), metric names ok")
PY

promtool check rules deploy/prometheus/alerts.yml
echo "check: all deploy checks passed"
