//! The Dockerfile and the Kubernetes manifests: the kustomize base and the
//! production overlay, rendered as `kubectl apply -k` would apply them. Every
//! manifest parses, has the fields the project relies on, references only
//! what exists, meets the Pod Security "restricted" profile, is selected by a
//! NetworkPolicy that admits what it needs, runs the binary with flags it
//! has, and passes Kubernetes' own schemas (scripts/validate-manifests).
//!
//! No kustomize binary is at hand, so `render` implements the part of
//! kustomize the layout uses (resources, strategic-merge patches matched by
//! kind and name, `$patch: delete`, images) and refuses everything else, so a
//! kustomization that grows a feature the renderer lacks fails here instead of
//! being checked wrongly.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use serde_json::{Map, Value};

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

const BASE: &str = "deploy/kubernetes/base";
const PRODUCTION: &str = "deploy/kubernetes/overlays/production";

/// Every document of a YAML file (empty documents skipped).
fn read_yaml(path: &Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn id(v: &Value) -> (String, String) {
    (
        v["kind"].as_str().unwrap_or_default().to_string(),
        v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// A kustomization, built.
struct Rendered {
    label: String,
    docs: Vec<Value>,
    /// Resources a `$patch: delete` took out (the placeholder Secret of the
    /// base): created out of band, so the workloads may still name them.
    deleted: Vec<Value>,
}

impl Rendered {
    fn get(&self, kind: &str, name: &str) -> Option<&Value> {
        self.docs
            .iter()
            .find(|d| id(d) == (kind.to_string(), name.to_string()))
    }

    /// What a reference of this kind may point at: a rendered resource, or a
    /// Secret created out of band (its keys are the deleted placeholder's).
    fn referable(&self, kind: &str, name: &str) -> Option<&Value> {
        self.get(kind, name).or_else(|| {
            self.deleted
                .iter()
                .find(|d| kind == "Secret" && id(d) == (kind.to_string(), name.to_string()))
        })
    }

    fn workloads(&self) -> impl Iterator<Item = &Value> {
        self.docs
            .iter()
            .filter(|d| matches!(d["kind"].as_str(), Some("Deployment" | "StatefulSet")))
    }
}

/// `kustomize build DIR`, for what this repository's kustomizations use.
fn render(dir: &Path) -> Result<Rendered, String> {
    let label = dir.display().to_string();
    let k = read_yaml(&dir.join("kustomization.yaml"))?;
    let [k] = k.as_slice() else {
        return Err(format!("{label}: one kustomization document"));
    };
    let k = k.as_object().ok_or(format!("{label}: not a mapping"))?;
    for key in k.keys() {
        if !matches!(
            key.as_str(),
            "apiVersion" | "kind" | "resources" | "patches" | "images"
        ) {
            return Err(format!(
                "{label}: `{key}` is not supported by this test's renderer"
            ));
        }
    }
    if k.get("kind") != Some(&Value::from("Kustomization")) {
        return Err(format!("{label}: kind is not Kustomization"));
    }
    let list = |key: &str| -> Vec<Value> {
        k.get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut docs = Vec::new();
    let mut deleted = Vec::new();
    for r in list("resources") {
        let path = dir.join(r.as_str().ok_or(format!("{label}: resource {r}"))?);
        if path.is_dir() {
            let sub = render(&path)?;
            docs.extend(sub.docs);
            deleted.extend(sub.deleted);
        } else {
            docs.extend(read_yaml(&path)?);
        }
    }
    for d in &docs {
        let (kind, name) = id(d);
        if kind.is_empty() || name.is_empty() {
            return Err(format!("{label}: a resource without kind or name: {d}"));
        }
        if docs
            .iter()
            .filter(|o| id(o) == (kind.clone(), name.clone()))
            .count()
            > 1
        {
            return Err(format!("{label}: {kind} {name} twice"));
        }
    }
    for p in list("patches") {
        let p = p.as_object().ok_or(format!("{label}: patch {p}"))?;
        if p.keys().any(|k| k != "path") {
            return Err(format!(
                "{label}: only `patches: - path:` (strategic merge, matched by kind and name) is supported"
            ));
        }
        let file = dir.join(p["path"].as_str().ok_or(format!("{label}: patch path"))?);
        for patch in read_yaml(&file)? {
            let (kind, name) = id(&patch);
            let at = docs
                .iter()
                .position(|d| id(d) == (kind.clone(), name.clone()))
                .ok_or(format!(
                    "{}: no {kind} {name} in the resources to patch",
                    file.display()
                ))?;
            let mut patch = patch;
            let directive = patch.as_object_mut().unwrap().remove("$patch");
            match directive.as_ref().and_then(Value::as_str) {
                Some("delete") => deleted.push(docs.remove(at)),
                None => merge(&mut docs[at], &patch, "")
                    .map_err(|e| format!("{}: {kind} {name}: {e}", file.display()))?,
                Some(other) => return Err(format!("{}: $patch: {other}", file.display())),
            }
        }
    }
    for image in list("images") {
        let name = image["name"]
            .as_str()
            .ok_or(format!("{label}: images entry {image}"))?;
        let mut matched = 0;
        for d in &mut docs {
            // Only resources with a pod template: indexing `d["spec"]...`
            // mutably would add an empty spec to every other resource.
            let Some(pod) = d.pointer_mut("/spec/template/spec") else {
                continue;
            };
            for field in ["initContainers", "containers"] {
                for c in pod[field].as_array_mut().into_iter().flatten() {
                    let current = c["image"].as_str().unwrap_or_default().to_string();
                    let (repo, tag) = split_image(&current);
                    if repo != name {
                        continue;
                    }
                    matched += 1;
                    let repo = image["newName"].as_str().unwrap_or(repo);
                    let reference = match (image["digest"].as_str(), image["newTag"].as_str()) {
                        (Some(digest), _) => format!("{repo}@{digest}"),
                        (None, Some(tag)) => format!("{repo}:{tag}"),
                        (None, None) => format!("{repo}{tag}"),
                    };
                    c["image"] = Value::from(reference);
                }
            }
        }
        if matched == 0 {
            return Err(format!("{label}: images: no container runs {name}"));
        }
    }
    Ok(Rendered {
        label,
        docs,
        deleted,
    })
}

/// `repo:tag` or `repo@digest` into the repository and the rest (with its
/// `:` or `@`); a port in the registry host is not a tag.
fn split_image(image: &str) -> (&str, &str) {
    if let Some(at) = image.find('@') {
        return image.split_at(at);
    }
    match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => image.split_at(colon),
        _ => (image, ""),
    }
}

/// The merge key of a list field, where strategic merge merges items rather
/// than replacing the list.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "volumes" | "env" | "imagePullSecrets" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        _ => None,
    }
}

/// A strategic-merge patch: maps merge recursively, `null` removes a field,
/// lists with a merge key merge item by item (`$patch: delete` removes one),
/// other lists are replaced. A container the base does not have is an error,
/// not a new container: a misspelt name must not slip through.
fn merge(base: &mut Value, patch: &Value, path: &str) -> Result<(), String> {
    let Some(patch) = patch.as_object() else {
        *base = patch.clone();
        return Ok(());
    };
    if !base.is_object() {
        *base = Value::Object(Map::new());
    }
    let base = base.as_object_mut().unwrap();
    for (k, v) in patch {
        let here = format!("{path}.{k}");
        if k.starts_with('$') {
            return Err(format!("{here}: directive not supported"));
        }
        if matches!(k.as_str(), "ports" | "tolerations" | "hostAliases") && v.is_array() {
            return Err(format!("{here}: merging this list is not supported"));
        }
        match (v, merge_key(k)) {
            (Value::Null, _) => {
                base.remove(k);
            }
            (Value::Array(items), Some(key)) => {
                let list = base
                    .entry(k.clone())
                    .or_insert_with(|| Value::Array(Vec::new()))
                    .as_array_mut()
                    .ok_or(format!("{here}: not a list in the base"))?;
                for item in items {
                    let wanted = item
                        .get(key)
                        .ok_or(format!("{here}: an item without {key}"))?;
                    let shown = wanted.as_str().map_or(wanted.to_string(), String::from);
                    let found = list.iter().position(|b| b.get(key) == Some(wanted));
                    let mut item = item.clone();
                    let directive = item.as_object_mut().and_then(|o| o.remove("$patch"));
                    match (directive.as_ref().and_then(Value::as_str), found) {
                        (Some("delete"), Some(i)) => {
                            list.remove(i);
                        }
                        (Some(d), _) => {
                            return Err(format!("{here}[{key}={shown}]: $patch: {d} matches nothing or is not supported"))
                        }
                        (None, Some(i)) => merge(&mut list[i], &item, &format!("{here}[{shown}]"))?,
                        (None, None) if matches!(k.as_str(), "containers" | "initContainers") => {
                            return Err(format!(
                                "{here}: the base has no container {shown}"
                            ))
                        }
                        (None, None) => list.push(item),
                    }
                }
            }
            (Value::Object(_), _) => {
                merge(base.entry(k.clone()).or_insert(Value::Null), v, &here)?;
            }
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(())
}

/// The long flags `switchyard <role> --help` lists.
fn flags_of(role: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([role, "--help"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| {
            w.trim_end_matches(',')
                .split('=')
                .next()
                .unwrap()
                .split('<')
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn is_switchyard(c: &Value) -> bool {
    let image = c["image"].as_str().unwrap_or_default();
    split_image(image).0.rsplit('/').next() == Some("switchyard")
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|a| a.as_str().unwrap())
        .collect()
}

/// The value following `flag` in `args`.
fn arg<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter().position(|a| *a == flag).map(|i| args[i + 1])
}

/// The mount of `c` that `path` is at or under.
fn mount_of<'a>(c: &'a Value, path: &str) -> Option<&'a Value> {
    c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| {
            let at = m["mountPath"].as_str().unwrap();
            path == at || path.starts_with(&format!("{}/", at.trim_end_matches('/')))
        })
}

/// The keys of a ConfigMap or Secret.
fn keys_of(v: &Value) -> Vec<String> {
    ["data", "stringData"]
        .iter()
        .flat_map(|f| v[f].as_object().into_iter().flatten())
        .map(|(k, _)| k.clone())
        .collect()
}

/// The strings of a list, skipping anything that is not one (the checks
/// below report the list as wrong rather than panic on it).
fn str_list(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// Every container of a pod spec, with the field it is listed in.
fn all_containers(pod: &Value) -> Vec<(&'static str, &Value)> {
    ["initContainers", "containers", "ephemeralContainers"]
        .into_iter()
        .flat_map(|f| pod[f].as_array().into_iter().flatten().map(move |c| (f, c)))
        .collect()
}

/// What keeps a workload's pod template from the Pod Security "restricted"
/// profile (plus a read-only root filesystem and no service account token),
/// one line each, naming the container and the field. A container's
/// securityContext overrides the pod's, as the kubelet applies them.
fn restricted_problems(w: &Value) -> Vec<String> {
    let pod = &w["spec"]["template"]["spec"];
    let psc = &pod["securityContext"];
    let mut out = Vec::new();
    if pod["automountServiceAccountToken"] != false {
        out.push("pod: automountServiceAccountToken must be false".to_string());
    }
    for f in ["hostNetwork", "hostPID", "hostIPC"] {
        if pod[f] == true {
            out.push(format!("pod: {f} must not be true"));
        }
    }
    for v in pod["volumes"].as_array().into_iter().flatten() {
        if !v["hostPath"].is_null() {
            out.push(format!("pod: volume {}: no hostPath volumes", v["name"]));
        }
    }
    let containers = all_containers(pod);
    if containers.is_empty() {
        out.push("pod: no containers".to_string());
    }
    for (field, c) in containers {
        let who = format!("{field} {}", c["name"].as_str().unwrap_or("?"));
        let csc = &c["securityContext"];
        let effective = |k: &str| {
            if csc[k].is_null() {
                &psc[k]
            } else {
                &csc[k]
            }
        };
        let seccomp = &effective("seccompProfile")["type"];
        if seccomp != "RuntimeDefault" {
            out.push(format!(
                "{who}: securityContext.seccompProfile.type must be RuntimeDefault (here or on the pod), is {seccomp}"
            ));
        }
        if effective("runAsNonRoot") != true {
            out.push(format!(
                "{who}: securityContext.runAsNonRoot must be true (here or on the pod)"
            ));
        }
        match effective("runAsUser").as_u64() {
            Some(uid) if uid != 0 => {}
            _ => out.push(format!(
                "{who}: securityContext.runAsUser must be a non-root uid (here or on the pod), is {}",
                effective("runAsUser")
            )),
        }
        if csc["allowPrivilegeEscalation"] != false {
            out.push(format!(
                "{who}: securityContext.allowPrivilegeEscalation must be false"
            ));
        }
        if csc["privileged"] == true {
            out.push(format!(
                "{who}: securityContext.privileged must not be true"
            ));
        }
        if !str_list(&csc["capabilities"]["drop"]).contains(&"ALL") {
            out.push(format!(
                "{who}: securityContext.capabilities.drop must hold ALL"
            ));
        }
        let added: Vec<&str> = str_list(&csc["capabilities"]["add"]);
        if added.iter().any(|a| *a != "NET_BIND_SERVICE") {
            out.push(format!(
                "{who}: securityContext.capabilities.add may hold NET_BIND_SERVICE only, holds {added:?}"
            ));
        }
        if csc["readOnlyRootFilesystem"] != true {
            out.push(format!(
                "{who}: securityContext.readOnlyRootFilesystem must be true"
            ));
        }
        for p in c["ports"].as_array().into_iter().flatten() {
            if p["hostPort"].as_u64().is_some_and(|h| h != 0) {
                out.push(format!("{who}: ports: no hostPort"));
            }
        }
    }
    out
}

/// Whether a NetworkPolicy's podSelector selects a workload's pods.
fn policy_selects(policy: &Value, w: &Value) -> bool {
    let selector = &policy["spec"]["podSelector"];
    assert!(
        selector["matchExpressions"].is_null(),
        "NetworkPolicy {}: matchExpressions is not supported by this test",
        policy["metadata"]["name"]
    );
    let labels = &w["spec"]["template"]["metadata"]["labels"];
    selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| &labels[k] == v)
}

/// Whether a rule's `ports` admit this port (a rule without `ports` admits
/// every port; `port` is a number, or a container port's name).
fn rule_admits(rule: &Value, port: u64, name: Option<&str>, protocol: &str) -> bool {
    let Some(ports) = rule["ports"].as_array() else {
        return true;
    };
    ports.iter().any(|p| {
        let proto = p["protocol"].as_str().unwrap_or("TCP");
        let hit = match (&p["port"], p["endPort"].as_u64()) {
            (Value::Null, _) => true,
            (Value::Number(n), Some(end)) => n.as_u64().is_some_and(|n| (n..=end).contains(&port)),
            (Value::Number(n), None) => n.as_u64() == Some(port),
            (Value::String(s), _) => Some(s.as_str()) == name,
            _ => false,
        };
        hit && proto == protocol
    })
}

/// The port of a database URL (the scheme's default when it names none).
fn db_port(url: &str) -> Option<u64> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = host.split(['/', '?']).next()?;
    match host.rsplit_once(':') {
        Some((_, p)) => p.parse().ok(),
        None => match scheme {
            "postgres" | "postgresql" => Some(5432),
            "mysql" | "mariadb" => Some(3306),
            _ => None,
        },
    }
}

/// The NetworkPolicies: every workload is selected by one for ingress and
/// for egress; each port a policy admits in is one its pods declare; each
/// switchyard container's admin port is admitted, the comparator's (its
/// /parity lists row keys) only from pods of the namespace, and the router's
/// ingest port (loopback) by no rule; each container may send what it talks
/// to: DNS, the brokers, its databases.
fn check_network_policies(r: &Rendered) {
    let label = &r.label;
    let policies: Vec<&Value> = r
        .docs
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .collect();
    for p in &policies {
        let (_, name) = id(p);
        let selected: Vec<&Value> = r.workloads().filter(|w| policy_selects(p, w)).collect();
        assert!(
            !selected.is_empty(),
            "{label}: NetworkPolicy {name} selects no workload"
        );
        // Each port admitted in is declared by a container of the selected pods.
        for rule in p["spec"]["ingress"].as_array().into_iter().flatten() {
            for port in rule["ports"].as_array().into_iter().flatten() {
                let declared = selected.iter().any(|w| {
                    all_containers(&w["spec"]["template"]["spec"])
                        .iter()
                        .flat_map(|(_, c)| c["ports"].as_array().into_iter().flatten())
                        .any(|cp| {
                            cp["protocol"].as_str().unwrap_or("TCP")
                                == port["protocol"].as_str().unwrap_or("TCP")
                                && match &port["port"] {
                                    Value::Number(_) => cp["containerPort"] == port["port"],
                                    Value::String(_) => cp["name"] == port["port"],
                                    _ => false,
                                }
                        })
                });
                assert!(
                    declared,
                    "{label}: NetworkPolicy {name} admits port {} in, which no container it selects declares",
                    port["port"]
                );
            }
        }
    }
    let brokers = r
        .get("ConfigMap", "switchyard-endpoints")
        .and_then(|c| c["data"]["kafka-brokers"].as_str())
        .unwrap_or_default();
    for w in r.workloads() {
        let (kind, name) = id(w);
        let file = format!("{label}: {kind} {name}");
        let mine: Vec<&&Value> = policies.iter().filter(|p| policy_selects(p, w)).collect();
        for direction in ["Ingress", "Egress"] {
            assert!(
                mine.iter()
                    .any(|p| str_list(&p["spec"]["policyTypes"]).contains(&direction)),
                "{file}: no NetworkPolicy restricts its {direction}"
            );
        }
        let rules = |field: &str| -> Vec<&Value> {
            mine.iter()
                .flat_map(|p| p["spec"][field].as_array().into_iter().flatten())
                .collect()
        };
        let (ingress, egress) = (rules("ingress"), rules("egress"));
        let may_send = |port: u64, protocol: &str| {
            egress
                .iter()
                .any(|rule| rule_admits(rule, port, None, protocol))
        };
        assert!(
            may_send(53, "UDP"),
            "{file}: its NetworkPolicy admits no DNS (53/UDP) out"
        );
        let pod = &w["spec"]["template"]["spec"];
        for (_, c) in all_containers(pod) {
            if !is_switchyard(c) {
                continue;
            }
            let cname = c["name"].as_str().unwrap_or("?");
            let args = str_list(&c["args"]);
            let role = args.first().copied().unwrap_or_default();
            let admin: u64 = arg(&args, "--admin-listen")
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("{file}: {cname}: --admin-listen"));
            let admin_name = c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["containerPort"] == admin)
                .and_then(|p| p["name"].as_str());
            let admitting: Vec<&&Value> = ingress
                .iter()
                .filter(|rule| rule_admits(rule, admin, admin_name, "TCP"))
                .collect();
            assert!(
                !admitting.is_empty(),
                "{file}: {cname}: no NetworkPolicy admits its admin port {admin}"
            );
            if role == "compare" {
                for rule in &admitting {
                    let from = rule["from"].as_array().map(Vec::as_slice).unwrap_or(&[]);
                    assert!(
                        !from.is_empty()
                            && from.iter().all(|peer| peer["podSelector"].is_object()
                                && peer["namespaceSelector"].is_null()
                                && peer["ipBlock"].is_null()),
                        "{file}: {cname}: its admin port {admin} (/parity lists row keys) is admitted from beyond the namespace: {rule}"
                    );
                }
            }
            if role == "route" {
                if let Some(listen) = arg(&args, "--listen")
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse::<u64>().ok())
                {
                    assert!(
                        ingress.iter().all(|rule| rule["ports"].is_array()
                            && !rule_admits(rule, listen, None, "TCP")),
                        "{file}: {cname}: the ingest port {listen} is loopback only; no rule may admit it"
                    );
                }
            }
            // What it talks to: the brokers, and the databases of its URLs.
            let mut wanted: Vec<(String, u64)> = Vec::new();
            for e in c["env"].as_array().into_iter().flatten() {
                let cm = &e["valueFrom"]["configMapKeyRef"];
                if cm["name"] == "switchyard-endpoints" && cm["key"] == "kafka-brokers" {
                    for b in brokers.split(',').filter(|b| !b.is_empty()) {
                        let port = b.rsplit(':').next().and_then(|p| p.parse().ok());
                        wanted.push((
                            format!("broker {b}"),
                            port.unwrap_or_else(|| panic!("{file}: broker {b} names no port")),
                        ));
                    }
                }
                let s = &e["valueFrom"]["secretKeyRef"];
                if let (Some(sname), Some(key)) = (s["name"].as_str(), s["key"].as_str()) {
                    if let Some(url) = r
                        .referable("Secret", sname)
                        .and_then(|s| s["stringData"][key].as_str())
                    {
                        if let Some(port) = db_port(url) {
                            wanted.push((format!("{} ({key})", e["name"]), port));
                        }
                    }
                }
            }
            for (what, port) in wanted {
                assert!(
                    may_send(port, "TCP"),
                    "{file}: {cname}: its NetworkPolicy admits no egress to port {port}, which {what} needs"
                );
            }
        }
    }
}

/// Every check, over one rendering. Returns the roles it found, in order.
fn check(r: &Rendered) -> Vec<String> {
    let label = &r.label;
    assert!(r.docs.len() >= 6, "{label}: {} resources", r.docs.len());
    let mut flags: HashMap<String, Vec<String>> = HashMap::new();
    let mut roles_seen = Vec::new();
    for m in &r.docs {
        assert!(
            m["apiVersion"].is_string() && m["kind"].is_string(),
            "{label}: {m}"
        );
        assert!(m["metadata"]["name"].is_string(), "{label}: {m}");
    }
    for m in r.workloads() {
        let (kind, name) = id(m);
        let file = format!("{label}: {kind} {name}");
        let spec = &m["spec"];
        assert!(spec["replicas"].as_u64().is_some_and(|r| r >= 1), "{file}");
        assert_eq!(
            spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"],
            "{file}: selector"
        );
        let pod = &spec["template"]["spec"];
        let ann = &spec["template"]["metadata"]["annotations"];
        assert_eq!(
            ann["prometheus.io/scrape"], "true",
            "{file}: scrape annotation"
        );
        let scrape_port = ann["prometheus.io/port"].as_str().unwrap().to_string();

        // Pod hardening: the Pod Security "restricted" profile, every container.
        let problems = restricted_problems(m);
        assert!(
            problems.is_empty(),
            "{file}: not Pod Security \"restricted\":\n  {}",
            problems.join("\n  ")
        );
        let psc = &pod["securityContext"];

        // Volumes: what each refers to exists, and each is mounted.
        let claims: Vec<String> = spec["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        let pod_volumes: Vec<&Value> = pod["volumes"].as_array().into_iter().flatten().collect();
        let volumes: Vec<String> = pod_volumes
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .chain(claims.iter().cloned())
            .collect();
        for v in &pod_volumes {
            if let Some(cm) = v["configMap"]["name"].as_str() {
                assert!(
                    r.get("ConfigMap", cm).is_some(),
                    "{file}: volume {}: ConfigMap {cm} is not rendered",
                    v["name"]
                );
            }
            if let Some(s) = v["secret"]["secretName"].as_str() {
                let secret = r
                    .referable("Secret", s)
                    .unwrap_or_else(|| panic!("{file}: volume {}: Secret {s}", v["name"]));
                // Readable by the pod's group only, which must be the user's.
                assert_eq!(
                    v["secret"]["defaultMode"], 0o440,
                    "{file}: volume {}: defaultMode 0440",
                    v["name"]
                );
                assert_eq!(
                    psc["fsGroup"], 10001,
                    "{file}: a Secret volume needs fsGroup 10001 to be readable"
                );
                for item in v["secret"]["items"].as_array().into_iter().flatten() {
                    let key = item["key"].as_str().unwrap();
                    assert!(
                        keys_of(secret).contains(&key.to_string()),
                        "{file}: volume {}: Secret {s} has no key {key}",
                        v["name"]
                    );
                }
            }
        }
        let containers = pod["containers"].as_array().unwrap();
        for v in &volumes {
            assert!(
                containers.iter().any(|c| c["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| m["name"] == v.as_str())),
                "{file}: volume {v} is mounted by no container"
            );
        }

        for c in containers {
            let cname = c["name"].as_str().unwrap();
            // A switchyard probe that runs a command runs the binary's own
            // health check: the image has no curl or wget.
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                let command = str_list(&c[probe]["exec"]["command"]);
                if is_switchyard(c) && !command.is_empty() {
                    assert!(
                        command[0].ends_with("switchyard") && command.get(1) == Some(&"health"),
                        "{file}: {cname} {probe} runs {command:?}, not `switchyard health`"
                    );
                }
            }
            for vm in c["volumeMounts"].as_array().into_iter().flatten() {
                let vname = vm["name"].as_str().unwrap().to_string();
                assert!(volumes.contains(&vname), "{file}: volume {vname}");
                // A file mounted out of a ConfigMap is one of its keys.
                if let Some(sub) = vm["subPath"].as_str() {
                    if let Some(cm) = pod_volumes
                        .iter()
                        .find(|v| v["name"] == vname.as_str())
                        .and_then(|v| v["configMap"]["name"].as_str())
                    {
                        assert!(
                            keys_of(r.get("ConfigMap", cm).unwrap()).contains(&sub.to_string()),
                            "{file}: {cname} mounts {sub}, which ConfigMap {cm} does not have"
                        );
                    }
                }
            }
            for e in c["env"].as_array().into_iter().flatten() {
                let ename = e["name"].as_str().unwrap();
                for (k, kind) in [("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")] {
                    let Some(name) = e["valueFrom"][k]["name"].as_str() else {
                        continue;
                    };
                    let target = r.referable(kind, name).unwrap_or_else(|| {
                        panic!("{file}: {cname} {ename}: {kind} {name} is not in the rendering")
                    });
                    let key = e["valueFrom"][k]["key"].as_str().unwrap();
                    assert!(
                        keys_of(target).contains(&key.to_string()),
                        "{file}: {cname} {ename}: {kind} {name} has no key {key}"
                    );
                }
                // Credentials come from Secrets, never from the manifest.
                if ename.contains("DB_URL") || ename.contains("PASSWORD") || ename == "LD_SDK_KEY" {
                    assert!(
                        e["valueFrom"]["secretKeyRef"].is_object(),
                        "{file}: {cname} {ename} must come from a Secret"
                    );
                }
            }
            if !is_switchyard(c) {
                continue;
            }
            let args = strings(&c["args"]);
            if args.is_empty() {
                continue;
            }
            let role = args[0];
            roles_seen.push(role.to_string());
            let known = flags
                .entry(role.to_string())
                .or_insert_with(|| flags_of(role));
            assert!(
                !known.is_empty(),
                "`switchyard {role} --help` lists no flag"
            );
            for a in args.iter().filter(|a| a.starts_with("--")) {
                assert!(
                    known.iter().any(|k| k == a),
                    "{file}: `switchyard {role}` has no {a}"
                );
            }
            for a in &args {
                assert!(
                    !(a.contains("://") && a.contains('@')) && *a != "--db-password",
                    "{file}: {role}: credentials on the command line: {a}"
                );
            }
            // Secrets are files mounted from Secrets, named by the file flags:
            // every Kafka client reads its properties so, every database
            // client its passwords.
            let mut file_flags: Vec<&str> = match role {
                "load" | "ingest" => vec!["--db-password-file"],
                "compare" => vec!["--old-db-password-file", "--new-db-password-file"],
                _ => vec![],
            };
            if matches!(role, "route" | "load" | "ingest" | "compare") {
                file_flags.push("--kafka-config-file");
            }
            for flag in file_flags {
                let path =
                    arg(&args, flag).unwrap_or_else(|| panic!("{file}: {role} has no {flag}"));
                let mount = mount_of(c, path)
                    .unwrap_or_else(|| panic!("{file}: {role} {flag} {path} is on no volume"));
                let volume = pod_volumes
                    .iter()
                    .find(|v| v["name"] == mount["name"])
                    .unwrap_or_else(|| panic!("{file}: {role}: volume {}", mount["name"]));
                assert!(
                    volume["secret"]["secretName"].is_string(),
                    "{file}: {role} {flag} {path} is not on a Secret volume"
                );
                let name = path.rsplit('/').next().unwrap_or_default();
                assert!(
                    volume["secret"]["items"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|i| i["path"] == name),
                    "{file}: {role} {flag}: the Secret volume {} has no file {name}",
                    mount["name"]
                );
            }
            // No password in an environment variable, not even inside a URL.
            for e in c["env"].as_array().into_iter().flatten() {
                let ename = e["name"].as_str().unwrap();
                assert!(
                    !ename.contains("PASSWORD") && ename != "SWITCHYARD_KAFKA_CONFIG",
                    "{file}: {role} {ename}: secrets come from files"
                );
                let r_ = &e["valueFrom"]["secretKeyRef"];
                if let (Some(sname), Some(key)) = (r_["name"].as_str(), r_["key"].as_str()) {
                    if let Some(url) = r
                        .referable("Secret", sname)
                        .and_then(|s| s["stringData"][key].as_str())
                    {
                        let userinfo = url
                            .split_once("://")
                            .and_then(|(_, rest)| rest.split_once('@'))
                            .map(|(u, _)| u)
                            .unwrap_or_default();
                        assert!(
                            !userinfo.contains(':'),
                            "{file}: {role} {ename}: the URL holds a password"
                        );
                    }
                }
            }
            // Every path the role reads or writes is on a volume (the root
            // filesystem is read-only).
            let config_env = c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["name"] == "SWITCHYARD_CONFIG")
                .and_then(|e| e["value"].as_str());
            for (what, path) in [
                ("--offline-dir", arg(&args, "--offline-dir")),
                ("--flags-dir", arg(&args, "--flags-dir")),
                ("--config", arg(&args, "--config")),
                ("SWITCHYARD_CONFIG", config_env),
            ] {
                if let Some(path) = path {
                    assert!(
                        mount_of(c, path).is_some(),
                        "{file}: {role} {what} {path} is on no volume"
                    );
                }
            }
            let admin = arg(&args, "--admin-listen").unwrap_or("");
            let admin_port = admin.rsplit(':').next().unwrap();
            assert_eq!(
                c["readinessProbe"]["httpGet"]["path"], "/readyz",
                "{file}: {role}"
            );
            assert_eq!(
                c["livenessProbe"]["httpGet"]["path"], "/healthz",
                "{file}: {role}"
            );
            for probe in ["readinessProbe", "livenessProbe"] {
                assert_eq!(
                    c[probe]["httpGet"]["port"]
                        .as_u64()
                        .map(|p| p.to_string())
                        .as_deref(),
                    Some(admin_port),
                    "{file}: {role} {probe} probes its admin port"
                );
            }
            assert!(
                c["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["containerPort"]
                        .as_u64()
                        .map(|p| p.to_string())
                        .as_deref()
                        == Some(admin_port)),
                "{file}: {role} declares its admin port"
            );
            assert_eq!(c["securityContext"]["runAsNonRoot"], true, "{file}: {role}");
            let res = &c["resources"];
            assert!(
                res["requests"]["memory"].is_string(),
                "{file}: {role} resources"
            );
            assert!(
                res["requests"]["cpu"].is_string(),
                "{file}: {role} requests cpu"
            );
            assert!(
                res["limits"]["memory"].is_string(),
                "{file}: {role} memory limit"
            );
            if role == "route" {
                let listen = arg(&args, "--listen").unwrap();
                assert!(
                    listen.starts_with("127.0.0.1:"),
                    "the router listens on loopback only: {listen}"
                );
                assert_eq!(
                    scrape_port, admin_port,
                    "{file}: Prometheus scrapes the router's admin port"
                );
                let mounts: Vec<&str> = c["volumeMounts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v["name"].as_str().unwrap())
                    .collect();
                assert!(
                    mounts.contains(&"offline"),
                    "the router writes to the shared volume"
                );
                assert!(
                    claims.contains(&"offline".to_string()),
                    "{file}: the offline files are on the pod's own persistent volume"
                );
                let loader = containers
                    .iter()
                    .find(|c| c["args"][0] == "load")
                    .expect("the loader beside the router");
                assert!(
                    loader["volumeMounts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|v| v["name"] == "offline"),
                    "the loader reads the same volume"
                );
                assert_eq!(
                    arg(&strings(&loader["args"]), "--offline-dir"),
                    arg(&args, "--offline-dir"),
                    "the loader reads the folder the router writes"
                );
            } else if role != "load" {
                assert_eq!(
                    scrape_port, admin_port,
                    "{file}: Prometheus scrapes {role}'s admin port"
                );
            }
        }
    }
    // Each Service selects a workload and targets a port it declares.
    for s in r.docs.iter().filter(|d| d["kind"] == "Service") {
        let (_, name) = id(s);
        let selector = &s["spec"]["selector"];
        let w = r
            .workloads()
            .find(|w| {
                let labels = &w["spec"]["template"]["metadata"]["labels"];
                selector
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| &labels[k] == v)
            })
            .unwrap_or_else(|| panic!("{label}: Service {name} selects no workload"));
        for p in s["spec"]["ports"].as_array().unwrap() {
            let target = p["targetPort"].as_u64().unwrap();
            assert!(
                w["spec"]["template"]["spec"]["containers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                    .any(|cp| cp["containerPort"].as_u64() == Some(target)),
                "{label}: Service {name} targets port {target}, which no container declares"
            );
        }
    }
    // The flags ConfigMap holds the flag files of flags/, valid, for every
    // routing flag.
    let flags_cm = &r
        .get("ConfigMap", "switchyard-flags")
        .expect("the flags ConfigMap")["data"];
    for key in [
        "switchyard-kill-switch",
        "switchyard-kafka-only",
        "switchyard-dual-write",
    ] {
        let text = flags_cm[format!("{key}.json")].as_str().unwrap();
        let f: Value = serde_json::from_str(text).unwrap();
        assert_eq!(f["key"], key);
        assert_eq!(
            text,
            std::fs::read_to_string(repo(&format!("flags/{key}.json"))).unwrap(),
            "{label}: the ConfigMap's {key} is flags/{key}.json"
        );
    }
    // The configuration ConfigMap is the embedded one, and it parses.
    let cfg = r
        .get("ConfigMap", "switchyard-config")
        .expect("the configuration ConfigMap")["data"]["switchyard.toml"]
        .as_str()
        .unwrap();
    assert_eq!(
        cfg,
        std::fs::read_to_string(repo("config/switchyard.toml")).unwrap(),
        "{label}: the ConfigMap is config/switchyard.toml"
    );
    switchyard::config::PipelineConfig::parse("configmap", cfg)
        .expect("the ConfigMap's configuration");
    check_network_policies(r);
    roles_seen.sort();
    roles_seen
}

/// The YAML files of a folder, by name relative to it.
fn yaml_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

/// Every file of a kustomization folder is used (a manifest left out of
/// `resources` would be silently missing from the cluster), except examples.
fn every_file_is_listed(dir: &str) {
    let k = &read_yaml(&repo(dir).join("kustomization.yaml")).unwrap()[0];
    let listed: Vec<String> = strings(&k["resources"])
        .into_iter()
        .map(String::from)
        .chain(
            k["patches"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| p["path"].as_str().unwrap().to_string()),
        )
        .collect();
    for f in yaml_files(&repo(dir)) {
        assert!(
            f == "kustomization.yaml" || f.ends_with(".example.yaml") || listed.contains(&f),
            "{dir}/{f} is in no `resources` or `patches` of its kustomization"
        );
    }
}

#[test]
fn the_base_is_well_formed_and_uses_real_flags() {
    let base = render(&repo(BASE)).unwrap();
    assert_eq!(check(&base), ["compare", "ingest", "load", "route"]);
    every_file_is_listed(BASE);
    assert!(base.deleted.is_empty());
}

#[test]
fn the_production_overlay_as_applied_is_well_formed_and_hardened() {
    let base = render(&repo(BASE)).unwrap();
    let prod = render(&repo(PRODUCTION)).unwrap();
    assert_eq!(check(&prod), ["compare", "ingest", "load", "route"]);
    every_file_is_listed(PRODUCTION);

    // The overlay changes no command line and no probe: production runs what
    // the base (and this test) checked.
    for w in base.workloads() {
        let (kind, name) = id(w);
        let pw = prod.get(&kind, &name).expect("every base workload");
        let containers = |w: &Value| -> BTreeMap<String, Value> {
            w["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| (c["name"].as_str().unwrap().to_string(), c.clone()))
                .collect()
        };
        let (bc, pc) = (containers(w), containers(pw));
        assert_eq!(
            bc.keys().collect::<Vec<_>>(),
            pc.keys().collect::<Vec<_>>(),
            "{kind} {name}: containers"
        );
        for (cname, c) in &bc {
            for field in ["args", "readinessProbe", "livenessProbe", "ports"] {
                assert_eq!(c[field], pc[cname][field], "{kind} {name} {cname} {field}");
            }
            if is_switchyard(c) {
                assert_eq!(
                    pc[cname]["image"], "registry.example.com/platform/switchyard:0.1.0",
                    "{kind} {name} {cname}: the registry's image"
                );
            }
        }
    }

    // No credentials in what is applied: the placeholder Secrets are deleted,
    // and the real ones are created out of band with the keys the workloads read.
    assert!(
        prod.docs.iter().all(|d| d["kind"] != "Secret"),
        "production applies no Secret"
    );
    let rendered = serde_json::to_string(&prod.docs).unwrap();
    assert!(!rendered.contains("CHANGE-ME"), "a placeholder credential");
    let placeholders: Vec<&Value> = ["switchyard-db", "switchyard-kafka"]
        .iter()
        .map(|n| base.get("Secret", n).unwrap())
        .collect();
    assert_eq!(
        prod.deleted.iter().collect::<Vec<_>>(),
        placeholders,
        "exactly the placeholder Secrets are deleted"
    );
    let mut examples = HashMap::new();
    for (file, placeholder) in [
        ("secret-db.example.yaml", placeholders[0]),
        ("secret-kafka.example.yaml", placeholders[1]),
    ] {
        let docs = read_yaml(&repo(PRODUCTION).join(file)).unwrap();
        let [example] = docs.as_slice() else {
            panic!("one Secret in {file}")
        };
        assert_eq!(id(example), id(placeholder), "{file}");
        let mut keys = keys_of(example);
        let mut placeholder_keys = keys_of(placeholder);
        keys.sort();
        placeholder_keys.sort();
        assert_eq!(keys, placeholder_keys, "{file} has the base's keys");
        examples.insert(id(example).1, example.clone());
    }
    let example = &examples["switchyard-db"];
    assert!(
        examples["switchyard-kafka"]["stringData"]["client.properties"]
            .as_str()
            .is_some_and(|p| p.contains("security.protocol=SASL_SSL")),
        "the production Kafka example is secured"
    );

    // The example URLs verify the server's certificate and host name, against
    // a CA file mounted in every container that uses them.
    let mut checked = 0;
    for w in prod.workloads() {
        let pod = &w["spec"]["template"]["spec"];
        for c in pod["containers"].as_array().unwrap() {
            for e in c["env"].as_array().into_iter().flatten() {
                let r = &e["valueFrom"]["secretKeyRef"];
                if r["name"] != "switchyard-db" {
                    continue;
                }
                let key = r["key"].as_str().unwrap();
                let url = example["stringData"][key].as_str().unwrap();
                let who = format!("{} {} {key}", c["name"], e["name"]);
                let query: HashMap<&str, &str> = url
                    .split_once('?')
                    .map(|(_, q)| q)
                    .unwrap_or_default()
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .collect();
                let ca = if url.starts_with("postgres://") {
                    assert_eq!(query.get("sslmode"), Some(&"verify-full"), "{who}: {url}");
                    let opts = sqlx::postgres::PgConnectOptions::from_str(url).unwrap();
                    assert!(format!("{opts:?}").contains("VerifyFull"), "{who}");
                    query["sslrootcert"]
                } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
                    assert_eq!(
                        query.get("ssl-mode"),
                        Some(&"VERIFY_IDENTITY"),
                        "{who}: {url}"
                    );
                    let opts = sqlx::mysql::MySqlConnectOptions::from_str(
                        &url.replacen("mariadb:", "mysql:", 1),
                    )
                    .unwrap();
                    assert!(format!("{opts:?}").contains("VerifyIdentity"), "{who}");
                    query["ssl-ca"]
                } else {
                    panic!("{who}: {url}: not a PostgreSQL or MySQL URL")
                };
                let mount =
                    mount_of(c, ca).unwrap_or_else(|| panic!("{who}: {ca} is on no volume"));
                let volume = pod["volumes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|v| v["name"] == mount["name"])
                    .unwrap();
                let cm = prod
                    .get("ConfigMap", volume["configMap"]["name"].as_str().unwrap())
                    .unwrap();
                let file = ca
                    .strip_prefix(mount["mountPath"].as_str().unwrap())
                    .unwrap()
                    .trim_start_matches('/');
                assert!(
                    keys_of(cm).contains(&file.to_string()),
                    "{who}: the CA volume has no {file}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(
        checked, 4,
        "load, ingest and compare (twice) read database URLs"
    );
}

/// A throwaway kustomization over the real base, with one patch or one
/// images entry.
fn overlay_with(extra: &str, patch: &str) -> Result<Rendered, String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\n{extra}",
            repo(BASE).display()
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("patch.yaml"), patch).unwrap();
    render(dir.path())
}

#[test]
fn the_renderer_merges_and_refuses_what_matches_nothing() {
    let patches = "patches:\n  - path: patch.yaml\n";
    // A patch merges into the named container and adds to its lists.
    let good = overlay_with(
        patches,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: switchyard-ingest\nspec:\n  template:\n    spec:\n      containers:\n        - name: ingest\n          resources:\n            limits:\n              cpu: \"3\"\n          env:\n            - name: EXTRA\n              value: x\n          volumeMounts:\n            - mountPath: /etc/switchyard/switchyard.toml\n              $patch: delete\n",
    )
    .unwrap();
    let c = &good.get("Deployment", "switchyard-ingest").unwrap()["spec"]["template"]["spec"]
        ["containers"][0];
    assert_eq!(c["resources"]["limits"]["cpu"], "3");
    assert_eq!(
        c["resources"]["limits"]["memory"], "512Mi",
        "merged, not replaced"
    );
    assert_eq!(c["env"].as_array().unwrap().len(), 4);
    assert_eq!(c["env"][3]["name"], "EXTRA");
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert_eq!(
        mounts,
        [
            "/etc/switchyard/secrets/db",
            "/etc/switchyard/secrets/kafka"
        ],
        "the deleted mount only"
    );
    assert_eq!(c["args"][0], "ingest");

    // A misspelt container, a resource the base lacks, an unknown kind, an
    // image no container runs, a kustomize feature the renderer lacks: errors.
    for (extra, patch, expect) in [
        (
            patches,
            "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: api\nspec:\n  template:\n    spec:\n      containers:\n        - name: switchyard-router\n          resources: {}\n",
            "no container switchyard-router",
        ),
        (
            patches,
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: switchyard-ingester\nspec:\n  replicas: 2\n",
            "no Deployment switchyard-ingester",
        ),
        (
            patches,
            "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: switchyard-ingest\nspec:\n  replicas: 2\n",
            "no StatefulSet switchyard-ingest",
        ),
        (
            "images:\n  - name: switchyrd\n    newTag: \"1\"\n",
            "",
            "no container runs switchyrd",
        ),
        ("namePrefix: prod-\n", "", "namePrefix"),
    ] {
        let err = overlay_with(extra, patch).err().unwrap_or_else(|| {
            panic!("rendered, but should have failed with {expect}: {extra}{patch}")
        });
        assert!(err.contains(expect), "{err}");
    }
    // And the checks fail on a rendering that breaks a reference.
    let broken = overlay_with(
        patches,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: switchyard-compare\nspec:\n  template:\n    spec:\n      volumes:\n        - name: config\n          configMap:\n            name: switchyard-configuration\n",
    )
    .unwrap();
    let failed = std::panic::catch_unwind(|| check(&broken)).unwrap_err();
    let message = failed.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("switchyard-configuration"), "{message}");
}

/// A Dockerfile's `ARG NAME=default` lines before its first `FROM`.
fn global_args(dockerfile: &str) -> HashMap<String, String> {
    dockerfile
        .lines()
        .take_while(|l| !l.starts_with("FROM "))
        .filter_map(|l| l.strip_prefix("ARG "))
        .filter_map(|a| a.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn the_dockerfile_builds_small_and_runs_as_a_user() {
    let d = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let froms: Vec<&str> = d.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: {froms:?}");
    assert!(froms[0].contains(" AS build"), "{froms:?}");
    // Each base image is pinned by digest, or is an ARG the operator pins
    // (the default names the tag; the file says how to pin it).
    let args = global_args(&d);
    let mut images = Vec::new();
    for from in &froms {
        let image = from.split_whitespace().nth(1).unwrap();
        let resolved = match image.strip_prefix("${").and_then(|a| a.strip_suffix('}')) {
            Some(name) => {
                assert!(
                    d.contains("--build-arg ")
                        && d.contains(&format!("{name}="))
                        && d.contains("@sha256:"),
                    "{from}: the Dockerfile must say how to pin {name} by digest"
                );
                args.get(name)
                    .unwrap_or_else(|| panic!("{from}: no `ARG {name}=...` before the first FROM"))
                    .clone()
            }
            None => {
                let digest = image.split_once("@sha256:").map(|(_, h)| h).unwrap_or("");
                assert!(
                    digest.len() == 64 && digest.chars().all(|c| c.is_ascii_hexdigit()),
                    "{from}: a base image pinned by digest (name@sha256:<64 hex>) or an ARG"
                );
                image.to_string()
            }
        };
        images.push(resolved);
    }
    assert!(images[0].starts_with("rust:1.95"), "{images:?}");
    assert!(
        images[1].starts_with("debian:") && images[1].contains("slim"),
        "a small runtime image: {}",
        images[1]
    );
    // The runtime stage installs no HTTP client or shell tool: the health
    // check is the binary's.
    let runtime = &d[d.rfind("\nFROM ").unwrap()..];
    for tool in ["curl", "wget", "netcat", "busybox"] {
        assert!(
            !runtime
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .any(|l| l.split_whitespace().any(|w| w == tool)),
            "the runtime image installs {tool}"
        );
    }
    assert!(
        d.contains("cargo build --release --locked"),
        "built from the lock file"
    );
    assert!(
        d.contains("COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard")
    );
    assert!(
        d.contains("COPY config/switchyard.toml") && d.contains("COPY flags "),
        "default schema and flags"
    );
    let user = d.lines().find(|l| l.starts_with("USER ")).expect("USER");
    assert!(!user.contains("root") && user.contains("10001"), "{user}");
    let health = d
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK"))
        .find(|l| l.trim_start().starts_with("CMD"))
        .expect("a HEALTHCHECK with a CMD");
    assert!(
        health.contains(r#"["/usr/local/bin/switchyard", "health""#),
        "the health check runs the binary (exec form, no shell): {health}"
    );
    assert!(d.contains("ENTRYPOINT [\"/usr/local/bin/switchyard\"]"));
    // Every path the build copies exists.
    for l in d
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = l.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(repo(src).exists(), "COPY {src}: not in the repository");
        }
    }
}

/// The README's example database URLs verify the server: its certificate
/// against a CA file, and its name (loopback URLs of local set-ups aside).
#[test]
fn the_readme_database_urls_verify_tls() {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let mut checked = 0;
    for scheme in ["postgres://", "postgresql://", "mysql://", "mariadb://"] {
        for (at, _) in readme.match_indices(scheme) {
            let url: String = readme[at..]
                .chars()
                .take_while(|c| !c.is_whitespace() && !matches!(c, '"' | '\'' | '`' | ')'))
                .collect();
            let host = url[scheme.len()..]
                .rsplit_once('@')
                .map_or(&url[scheme.len()..], |(_, h)| h);
            if host.is_empty()
                || host.starts_with("127.")
                || host.starts_with("localhost")
                || host.starts_with('…')
            {
                continue;
            }
            let query = url.split_once('?').map(|(_, q)| q).unwrap_or_default();
            let params: Vec<&str> = query.split('&').collect();
            let wanted: &[&str] = if scheme.starts_with("postgres") {
                &["sslmode=verify-full", "sslrootcert="]
            } else {
                &["ssl-mode=VERIFY_IDENTITY", "ssl-ca="]
            };
            for w in wanted {
                assert!(
                    params.iter().any(|p| p.starts_with(w)),
                    "README: {url} lacks {w}"
                );
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "the README shows a PostgreSQL and a MySQL URL"
    );
}

/// `check` on a rendering it must refuse: the panic's message.
fn check_fails(r: &Rendered) -> String {
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(r)))
        .expect_err("the checks passed a rendering they must refuse");
    failed
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| failed.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// The base with one workload's pod template changed.
fn base_with(kind: &str, name: &str, change: impl FnOnce(&mut Value)) -> Rendered {
    let mut r = render(&repo(BASE)).unwrap();
    let w = r
        .docs
        .iter_mut()
        .find(|d| id(d) == (kind.to_string(), name.to_string()))
        .unwrap();
    change(&mut w["spec"]["template"]["spec"]);
    r
}

#[test]
fn a_pod_missing_any_restricted_setting_fails_naming_workload_and_field() {
    type Change = Box<dyn FnOnce(&mut Value)>;
    let remove = |at: &'static str, field: &'static str| -> Change {
        Box::new(move |pod: &mut Value| {
            pod.pointer_mut(at)
                .and_then(Value::as_object_mut)
                .map(|o| o.remove(field))
                .expect("the field to remove");
        })
    };
    let set = |at: &'static str, value: Value| -> Change {
        Box::new(move |pod: &mut Value| {
            // Index by index, so the last key may be new.
            let mut v = pod;
            for segment in at.split('/').skip(1) {
                v = match segment.parse::<usize>() {
                    Ok(i) => &mut v[i],
                    Err(_) => &mut v[segment],
                };
            }
            *v = value;
        })
    };
    let cases: Vec<(&str, &str, Change, &str)> = vec![
        (
            "Deployment",
            "switchyard-ingest",
            remove("/securityContext", "seccompProfile"),
            "containers ingest: securityContext.seccompProfile.type",
        ),
        (
            "Deployment",
            "switchyard-compare",
            set(
                "/containers/0/securityContext/seccompProfile",
                serde_json::json!({"type": "Unconfined"}),
            ),
            "containers compare: securityContext.seccompProfile.type",
        ),
        (
            "StatefulSet",
            "api",
            // The API container relies on the pod's runAsNonRoot.
            remove("/securityContext", "runAsNonRoot"),
            "containers api: securityContext.runAsNonRoot",
        ),
        (
            "StatefulSet",
            "api",
            set("/containers/1/securityContext/runAsUser", Value::from(0)),
            "containers switchyard-route: securityContext.runAsUser",
        ),
        (
            "StatefulSet",
            "api",
            remove("/containers/2/securityContext", "allowPrivilegeEscalation"),
            "containers switchyard-load: securityContext.allowPrivilegeEscalation",
        ),
        (
            "Deployment",
            "switchyard-ingest",
            set(
                "/containers/0/securityContext/capabilities",
                serde_json::json!({"drop": ["NET_RAW"]}),
            ),
            "containers ingest: securityContext.capabilities.drop",
        ),
        (
            "Deployment",
            "switchyard-compare",
            set(
                "/containers/0/securityContext/readOnlyRootFilesystem",
                Value::from(false),
            ),
            "containers compare: securityContext.readOnlyRootFilesystem",
        ),
        (
            "Deployment",
            "switchyard-ingest",
            remove("", "automountServiceAccountToken"),
            "pod: automountServiceAccountToken",
        ),
        (
            "StatefulSet",
            "api",
            // An init container is a container too.
            Box::new(|pod: &mut Value| {
                pod["initContainers"] = serde_json::json!([{
                    "name": "wait-for-db",
                    "image": "busybox:1",
                    "command": ["true"],
                }]);
            }),
            "initContainers wait-for-db: securityContext.allowPrivilegeEscalation",
        ),
    ];
    for (kind, name, change, field) in cases {
        let message = check_fails(&base_with(kind, name, change));
        assert!(
            message.contains(&format!("{kind} {name}")) && message.contains(field),
            "expected {kind} {name} and {field} in: {message}"
        );
    }
}

/// A rendered NetworkPolicy, to break in a test.
fn policy<'a>(r: &'a mut Rendered, name: &str) -> &'a mut Value {
    r.docs
        .iter_mut()
        .find(|d| id(d) == ("NetworkPolicy".into(), name.into()))
        .unwrap_or_else(|| panic!("no NetworkPolicy {name}"))
}

#[test]
fn a_workload_without_its_network_policy_fails() {
    // No policy for the comparator.
    let mut r = render(&repo(BASE)).unwrap();
    r.docs
        .retain(|d| id(d) != ("NetworkPolicy".into(), "switchyard-compare".into()));
    let message = check_fails(&r);
    assert!(
        message.contains("Deployment switchyard-compare") && message.contains("NetworkPolicy"),
        "{message}"
    );
    // /parity reachable from another namespace.
    let mut r = render(&repo(BASE)).unwrap();
    let p = policy(&mut r, "switchyard-compare");
    p["spec"]["ingress"][0]["from"] = serde_json::json!([{"namespaceSelector": {}}]);
    let message = check_fails(&r);
    assert!(message.contains("beyond the namespace"), "{message}");
    // A port no container declares.
    let mut r = render(&repo(BASE)).unwrap();
    let p = policy(&mut r, "switchyard-ingest");
    p["spec"]["ingress"][0]["ports"][0]["port"] = Value::from(9191);
    let message = check_fails(&r);
    assert!(
        message.contains("9191") && message.contains("no container"),
        "{message}"
    );
    // No egress to the database.
    let mut r = render(&repo(BASE)).unwrap();
    let p = policy(&mut r, "switchyard-ingest");
    p["spec"]["egress"][1]["ports"] = serde_json::json!([{"port": 9092, "protocol": "TCP"}]);
    let message = check_fails(&r);
    assert!(message.contains("port 5432"), "{message}");
}

/// Runs scripts/validate-manifests on these files.
fn validate(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(repo("scripts/validate-manifests"))
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("scripts/validate-manifests: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Each resource of a rendering in its own JSON file under `dir`.
fn write_resources(docs: &[Value], dir: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    docs.iter()
        .enumerate()
        .map(|(i, d)| {
            let (kind, name) = id(d);
            let path = dir.join(format!("{i:02}-{}-{name}.json", kind.to_lowercase()));
            std::fs::write(&path, serde_json::to_string_pretty(d).unwrap()).unwrap();
            path
        })
        .collect()
}

/// The base and every overlay as rendered, each resource validated against
/// Kubernetes' own schemas (`--strict`: an unknown field is an error).
/// `scripts/validate-manifests` installs the validator when it is missing; one
/// that cannot be installed fails this test.
#[test]
fn the_rendered_manifests_pass_the_kubernetes_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let mut kustomizations = vec![repo(BASE)];
    let overlays = repo("deploy/kubernetes/overlays");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&overlays)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no overlay under {}", overlays.display());
    kustomizations.extend(found);
    let mut files = Vec::new();
    for k in &kustomizations {
        let r = render(k).unwrap();
        let name = k.file_name().unwrap().to_string_lossy().into_owned();
        files.extend(write_resources(&r.docs, &dir.path().join(name)));
    }
    let (ok, out) = validate(&files);
    assert!(ok, "the rendered manifests do not validate:\n{out}");
    assert_eq!(
        out.matches(" passed for resource ").count(),
        files.len(),
        "every resource was validated:\n{out}"
    );
}

/// The validator refuses what the renderer lets through: a misspelt field
/// in a container, an unknown field in metadata, a kind with no schema.
#[test]
fn the_schema_validation_refuses_unknown_fields_and_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let r = render(&repo(BASE)).unwrap();
    let mut compare = r.get("Deployment", "switchyard-compare").unwrap().clone();
    compare["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] =
        compare["spec"]["template"]["spec"]["containers"][0]["readinessProbe"].clone();
    let mut cm = r.get("ConfigMap", "switchyard-endpoints").unwrap().clone();
    cm["metadata"]["labelz"] = serde_json::json!({"a": "b"});
    let unknown = serde_json::json!({
        "apiVersion": "v1",
        "kind": "NetworkPolicyy",
        "metadata": {"name": "x"},
    });
    let good = r.get("ConfigMap", "switchyard-config").unwrap().clone();
    let files = write_resources(&[compare, cm, unknown, good], dir.path());
    let (ok, out) = validate(&files);
    assert!(!ok, "validated what it must refuse:\n{out}");
    let line_of = |f: &Path| -> String {
        let f = f.display().to_string();
        out.lines()
            .filter(|l| l.contains(&f))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        line_of(&files[0]).contains("'readinessProbes' was unexpected"),
        "{out}"
    );
    assert!(
        line_of(&files[1]).contains("'labelz' was unexpected"),
        "{out}"
    );
    assert!(line_of(&files[2]).contains("was not validated"), "{out}");
    assert!(line_of(&files[3]).contains("passed for resource"), "{out}");
}
