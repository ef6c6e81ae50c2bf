//! The shipped container image and Kubernetes base start as shipped (issue 16): the binary
//! is run with the image's entrypoint and command, the shipped configuration files, and the
//! environment Docker or Kubernetes gives the process. There is no container engine here, so
//! what the image would do is reconstructed from the Dockerfile and the manifests themselves.
//!
//! The shipped files listen on fixed ports of every interface; to run them beside other
//! tests, `serve` gets a copy in which exactly those addresses become 127.0.0.1:0 and the
//! data directory a temporary one. `check-config` checks the files unchanged.

mod common;

use std::path::{Path, PathBuf};

use common::cluster::{free_ports, wait_ready, READY_TIMEOUT, START_ATTEMPTS};
use common::*;

/// The workspace root (this crate is crates/halyard).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative))
        .unwrap_or_else(|error| panic!("cannot read {relative}: {error}"))
}

/// Whether `config` leaves `storage.fsync` at its default, `"always"`.
fn keeps_fsync_always(config: &str) -> bool {
    config.lines().all(|line| {
        let line = line.trim_start();
        !line.starts_with("fsync") || line.replace(' ', "") == "fsync=\"always\""
    })
}

/// The JSON array of a Dockerfile instruction (`CMD ["serve", ...]`).
fn dockerfile_array(dockerfile: &str, instruction: &str) -> Vec<String> {
    let line = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{instruction} ")))
        .unwrap_or_else(|| panic!("no {instruction} in the Dockerfile"));
    serde_json::from_str(line).unwrap_or_else(|error| panic!("{instruction} {line}: {error}"))
}

/// `shipped` with each of `addresses` (which must each appear once) turned into
/// 127.0.0.1:0 and `data_dir = "/data"` into `data_dir`, written to a temp file.
fn runnable_copy(shipped: &str, addresses: &[&str], data_dir: &Path) -> PathBuf {
    let replacements: Vec<(&str, String)> = addresses
        .iter()
        .map(|address| (*address, "127.0.0.1:0".to_owned()))
        .collect();
    runnable_copy_with(shipped, &replacements, data_dir)
}

/// `shipped` with each quoted address of `replacements` (which must each appear once)
/// replaced, and `data_dir = "/data"` turned into `data_dir`, written to a temp file.
fn runnable_copy_with(shipped: &str, replacements: &[(&str, String)], data_dir: &Path) -> PathBuf {
    let mut text = shipped.to_owned();
    for (address, replacement) in replacements {
        let quoted = format!("\"{address}\"");
        assert_eq!(text.matches(&quoted).count(), 1, "{address} in {shipped}");
        text = text.replace(&quoted, &format!("\"{replacement}\""));
    }
    let data = "data_dir = \"/data\"";
    assert_eq!(text.matches(data).count(), 1, "{data} in {shipped}");
    text = text.replace(
        data,
        &format!("data_dir = {:?}", data_dir.display().to_string()),
    );
    write_temp_config(&text)
}

/// `args` with the image's config path replaced by `config`.
fn with_config(args: &[String], config: &Path) -> Vec<String> {
    args.iter()
        .map(|arg| match arg.as_str() {
            "/etc/halyard/halyard.toml" => config.display().to_string(),
            other => other.to_owned(),
        })
        .collect()
}

/// The admin API token the broker logged when it generated one.
fn logged_token(logs: &str) -> String {
    let line = logs
        .lines()
        .find(|line| line.contains("generated an admin API token"))
        .unwrap_or_else(|| panic!("no generated token in the logs:\n{logs}"));
    let (_, rest) = line.split_once("token=").expect("a token field");
    rest.split_whitespace().next().expect("token").to_owned()
}

/// The environment of a process in `docker run IMAGE`: Docker's PATH and HOSTNAME, and HOME
/// from the image's passwd entry for uid 10001.
const CONTAINER_ENV: [(&str, &str); 3] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOSTNAME", "3f2c9a1b7d4e"),
    ("HOME", "/data"),
];

#[test]
fn dockerfile_builds_dependencies_first_and_never_masks_a_failure() {
    let dockerfile = read("Dockerfile");
    assert!(!dockerfile.contains("|| true"), "a failed build must fail");
    let stubs = dockerfile
        .find("RUN scripts/docker-stub-sources && cargo build")
        .expect("a dependency layer built from stub sources");
    let sources = dockerfile.find("COPY crates ./crates").expect("sources");
    assert!(
        stubs < sources,
        "dependencies must build before the sources are copied"
    );
    assert!(dockerfile.contains("COPY deploy/halyard.toml /etc/halyard/halyard.toml"));
    // The stubs must name every target the manifests declare: cargo metadata loads the
    // workspace from the manifests and the stubs alone, as the dependency layer does.
    let scratch = unique_temp_path("docker-layer", "d");
    let workspace: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    let members = workspace["workspace"]["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|member| format!("{}/Cargo.toml", member.as_str().expect("a path")));
    let files: Vec<String> = ["Cargo.toml".to_owned(), "Cargo.lock".to_owned()]
        .into_iter()
        .chain(members)
        .collect();
    for file in &files {
        let from = format!("COPY {file} ");
        assert!(
            dockerfile.contains(&from) || file.starts_with("Cargo."),
            "{file} not copied"
        );
        let target = scratch.join(file);
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
        std::fs::copy(root().join(file), &target).expect("copy manifest");
    }
    let status = std::process::Command::new(root().join("scripts/docker-stub-sources"))
        .current_dir(&scratch)
        .status()
        .expect("run the stub script");
    assert!(status.success());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--offline",
            "--locked",
            "--no-deps",
            "--format-version",
            "1",
        ])
        .current_dir(&scratch)
        .output()
        .expect("run cargo metadata");
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn container_starts_as_shipped_and_its_token_works() {
    let dockerfile = read("Dockerfile");
    assert_eq!(
        dockerfile_array(&dockerfile, "ENTRYPOINT"),
        ["/usr/local/bin/halyard"]
    );
    let command = dockerfile_array(&dockerfile, "CMD");
    assert_eq!(command, ["serve", "--config", "/etc/halyard/halyard.toml"]);
    let shipped = read("deploy/halyard.toml");
    assert!(
        keeps_fsync_always(&shipped),
        "README: acknowledged only once on disk"
    );

    // The file exactly as shipped, with the container's environment.
    let path = root().join("deploy/halyard.toml");
    let (status, stdout, stderr) = run_halyard_env(
        &["check-config", path.to_str().expect("utf-8")],
        &CONTAINER_ENV,
    );
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "ok");

    let data_dir = unique_temp_path("container-data", "d");
    let config = runnable_copy(
        &shipped,
        &["0.0.0.0:1883", "0.0.0.0:8080", "0.0.0.0:8083"],
        &data_dir,
    );
    let args = with_config(&command, &config);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let broker = Broker::start_with_args(&args, &CONTAINER_ENV, data_dir);
    let _ = broker.listener_addr("ws");
    let token = logged_token(&broker.logs());
    assert_eq!(token.len(), 64, "{token}");
    let api = broker.http_addr();
    assert_eq!(http(api, "GET", "/readyz", None, None).0, 200);
    assert_eq!(http(api, "GET", "/api/v1/broker", None, None).0, 401);
    assert_eq!(
        http(api, "GET", "/api/v1/broker", Some(&token), None).0,
        200
    );
    let _ = std::fs::remove_file(config);
}

/// The environment Kubernetes gives the broker's pod: the `kubernetes` Service's links
/// (always there), the links of our Service `halyard` for every port service.yaml declares
/// (there unless `enableServiceLinks: false`, which the Deployment sets; injected here
/// anyway, as a cluster that ignores it or an older manifest would), and the Secret.
fn pod_environment(token: Option<&str>) -> Vec<(String, String)> {
    let service = read("deploy/kubernetes/base/service.yaml");
    let mut ports: Vec<(String, u16)> = Vec::new();
    let mut name = None;
    for line in service.lines().map(str::trim) {
        if let Some(value) = line.strip_prefix("- name: ") {
            name = Some(value.to_owned());
        } else if let (Some(value), Some(port_name)) = (line.strip_prefix("port: "), name.take()) {
            ports.push((port_name, value.parse().expect("port number")));
        }
    }
    assert!(!ports.is_empty(), "no ports in service.yaml");
    let ip = "10.96.41.7";
    let mut env = vec![
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1".to_owned()),
        ("KUBERNETES_SERVICE_PORT", "443".to_owned()),
        ("KUBERNETES_SERVICE_PORT_HTTPS", "443".to_owned()),
        ("KUBERNETES_PORT", "tcp://10.96.0.1:443".to_owned()),
        ("KUBERNETES_PORT_443_TCP", "tcp://10.96.0.1:443".to_owned()),
        ("KUBERNETES_PORT_443_TCP_PROTO", "tcp".to_owned()),
        ("KUBERNETES_PORT_443_TCP_PORT", "443".to_owned()),
        ("KUBERNETES_PORT_443_TCP_ADDR", "10.96.0.1".to_owned()),
        ("HOSTNAME", "halyard-7d9f8b6c5-x2kqp".to_owned()),
        ("HALYARD_SERVICE_HOST", ip.to_owned()),
        ("HALYARD_SERVICE_PORT", ports[0].1.to_string()),
        ("HALYARD_PORT", format!("tcp://{ip}:{}", ports[0].1)),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value))
    .collect::<Vec<_>>();
    for (port_name, port) in &ports {
        let upper = port_name.to_ascii_uppercase().replace('-', "_");
        env.push((format!("HALYARD_SERVICE_PORT_{upper}"), port.to_string()));
        let prefix = format!("HALYARD_PORT_{port}_TCP");
        env.push((prefix.clone(), format!("tcp://{ip}:{port}")));
        env.push((format!("{prefix}_PROTO"), "tcp".to_owned()));
        env.push((format!("{prefix}_PORT"), port.to_string()));
        env.push((format!("{prefix}_ADDR"), ip.to_owned()));
    }
    if let Some(token) = token {
        env.push(("HALYARD_HTTP_TOKEN".to_owned(), token.to_owned()));
    }
    env
}

#[test]
fn kubernetes_pod_starts_with_its_injected_environment() {
    let deployment = read("deploy/kubernetes/base/deployment.yaml");
    assert!(deployment.contains("enableServiceLinks: false"));
    assert!(
        deployment.contains("optional: true"),
        "the token Secret is optional"
    );
    let args_line = deployment
        .lines()
        .find_map(|line| line.trim().strip_prefix("args: "))
        .expect("container args");
    let command: Vec<String> = serde_json::from_str(args_line).expect("args as a JSON array");
    assert_eq!(command, ["serve", "--config", "/etc/halyard/halyard.toml"]);
    let shipped = read("deploy/kubernetes/base/halyard.toml");
    assert!(
        keeps_fsync_always(&shipped),
        "README: acknowledged only once on disk"
    );
    // Every port the Service exposes has a listener in the shipped config.
    let service = read("deploy/kubernetes/base/service.yaml");
    for line in service.lines().map(str::trim) {
        if let Some(port) = line.strip_prefix("port: ") {
            assert!(shipped.contains(&format!("0.0.0.0:{port}")), "port {port}");
        }
    }
    assert!(!read("deploy/kubernetes/base/kustomization.yaml").contains("change-me"));

    let secret = "d41d8cd98f00b204e9800998ecf8427e";
    for token in [Some(secret), None] {
        let env = pod_environment(token);
        assert!(env
            .iter()
            .any(|(key, _)| key == "HALYARD_PORT_8083_TCP_ADDR"));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let path = root().join("deploy/kubernetes/base/halyard.toml");
        let (status, _, stderr) =
            run_halyard_env(&["check-config", path.to_str().expect("utf-8")], &env);
        assert!(status.success(), "{stderr}");

        let data_dir = unique_temp_path("pod-data", "d");
        let config = runnable_copy(
            &shipped,
            &["0.0.0.0:1883", "0.0.0.0:8080", "0.0.0.0:8083"],
            &data_dir,
        );
        let args = with_config(&command, &config);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let broker = Broker::start_with_args(&args, &env, data_dir);
        let token = match token {
            Some(secret) => {
                assert!(!broker.logs().contains("generated an admin API token"));
                secret.to_owned()
            }
            None => logged_token(&broker.logs()),
        };
        let api = broker.http_addr();
        assert_eq!(http(api, "GET", "/livez", None, None).0, 200);
        assert_eq!(
            http(api, "GET", "/api/v1/broker", Some(&token), None).0,
            200
        );
        let _ = std::fs::remove_file(config);
    }
}

#[test]
fn a_typo_in_a_pod_variable_is_still_an_error() {
    let mut env = pod_environment(None);
    env.push(("HALYARD_MAX_INFLGHT".to_owned(), "4".to_owned()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let path = root().join("deploy/kubernetes/base/halyard.toml");
    let (status, _, stderr) =
        run_halyard_env(&["check-config", path.to_str().expect("utf-8")], &env);
    assert!(!status.success());
    assert!(stderr.contains("HALYARD_MAX_INFLGHT"), "{stderr}");
    assert!(!stderr.contains("HALYARD_PORT"), "{stderr}");
}

#[test]
fn the_placeholder_token_is_refused() {
    let path = root().join("deploy/kubernetes/base/halyard.toml");
    let (status, _, stderr) = run_halyard_env(
        &["check-config", path.to_str().expect("utf-8")],
        &[("HALYARD_HTTP_TOKEN", "change-me")],
    );
    assert!(!status.success());
    assert!(stderr.contains("HALYARD_HTTP_TOKEN"), "{stderr}");
    assert!(stderr.contains("placeholder"), "{stderr}");
}

/// The first line of `text` that starts (after indentation) with `key: `, its value.
fn yaml_value<'a>(text: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}: ");
    text.lines()
        .find_map(|line| line.trim().strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {key} in\n{text}"))
}

#[test]
fn cluster_overlay_is_a_statefulset_with_what_raft_needs() {
    let dir = "deploy/kubernetes/cluster";
    let kustomization = read(&format!("{dir}/kustomization.yaml"));
    for resource in [
        "../base",
        "statefulset.yaml",
        "service-peers.yaml",
        "pdb.yaml",
    ] {
        assert!(
            kustomization.contains(&format!("- {resource}\n")),
            "{resource}"
        );
    }
    assert!(kustomization.contains("$patch: delete"));
    let set = read(&format!("{dir}/statefulset.yaml"));
    assert_eq!(yaml_value(&set, "kind"), "StatefulSet");
    assert_eq!(yaml_value(&set, "podManagementPolicy"), "Parallel");
    assert_eq!(yaml_value(&set, "replicas"), "3");
    assert_eq!(yaml_value(&set, "serviceName"), "halyard-peers");
    assert_eq!(yaml_value(&set, "whenDeleted"), "Retain");
    assert_eq!(yaml_value(&set, "whenScaled"), "Retain");
    assert_eq!(yaml_value(&set, "enableServiceLinks"), "false");
    assert!(set.contains("volumeClaimTemplates:"));
    assert!(set.contains("preStop:"));
    let grace: u64 = yaml_value(&set, "terminationGracePeriodSeconds")
        .parse()
        .expect("seconds");
    // The drain after SIGTERM (2 s clients, 5 s cluster writes, 5 s raft.redb) after the
    // 5 s preStop pause.
    assert!(grace >= 17, "terminationGracePeriodSeconds {grace}");
    for path in ["/livez", "/readyz"] {
        assert!(set.contains(&format!("path: {path}")), "{path} probe");
    }
    let peers = read(&format!("{dir}/service-peers.yaml"));
    assert_eq!(yaml_value(&peers, "clusterIP"), "None");
    assert_eq!(yaml_value(&peers, "publishNotReadyAddresses"), "true");
    assert_eq!(yaml_value(&peers, "port"), "7000");
    let pdb = read(&format!("{dir}/pdb.yaml"));
    assert_eq!(yaml_value(&pdb, "kind"), "PodDisruptionBudget");
    assert_eq!(yaml_value(&pdb, "maxUnavailable"), "1");
    let config = read(&format!("{dir}/halyard.toml"));
    assert!(keeps_fsync_always(&config));
    assert!(config.contains("\"0.0.0.0:7000\""));
    for ordinal in 0..3 {
        assert!(
            config.contains(&format!("\"halyard-{ordinal}.halyard-peers:7000\"")),
            "pod {ordinal} in cluster.peers"
        );
    }
}

/// A pod's environment with the hostname of StatefulSet pod `ordinal`; without the
/// `HALYARD_` service links when `service_links` is off (`enableServiceLinks: false`, as
/// shipped). The headless Service has no cluster IP, so Kubernetes injects nothing for it.
fn statefulset_pod_environment(ordinal: usize, service_links: bool) -> Vec<(String, String)> {
    let mut env = pod_environment(None);
    env.retain(|(key, _)| key != "HOSTNAME" && (service_links || !key.starts_with("HALYARD_")));
    env.push(("HOSTNAME".to_owned(), format!("halyard-{ordinal}")));
    env
}

/// The overlay's halyard.toml for pod `ordinal`: listeners on 127.0.0.1:0, the cluster port
/// and every peer name `halyard-N.halyard-peers:7000` turned into `localhost:PORT` (a DNS
/// name, resolved as the pod resolves its peers' names).
fn overlay_copy(shipped: &str, ordinal: usize, ports: &[u16], data_dir: &Path) -> PathBuf {
    let mut replacements = vec![
        ("0.0.0.0:1883", "127.0.0.1:0".to_owned()),
        ("0.0.0.0:8080", "127.0.0.1:0".to_owned()),
        ("0.0.0.0:8083", "127.0.0.1:0".to_owned()),
        ("0.0.0.0:7000", format!("127.0.0.1:{}", ports[ordinal])),
    ];
    let names: Vec<String> = (0..ports.len())
        .map(|n| format!("halyard-{n}.halyard-peers:7000"))
        .collect();
    for (name, port) in names.iter().zip(ports) {
        replacements.push((name.as_str(), format!("localhost:{port}")));
    }
    runnable_copy_with(shipped, &replacements, data_dir)
}

/// Three pods of the overlay, started as the StatefulSet starts them (all at once), with the
/// shipped command line and halyard.toml; an error when one does not come up (a cluster port
/// picked free may have been taken meanwhile, which is rare), for the caller to retry.
fn start_overlay_pods() -> Result<Vec<Broker>, String> {
    let set = read("deploy/kubernetes/cluster/statefulset.yaml");
    let command: Vec<String> =
        serde_json::from_str(yaml_value(&set, "args")).expect("args as a JSON array");
    assert_eq!(command, ["serve", "--config", "/etc/halyard/halyard.toml"]);
    let shipped = read("deploy/kubernetes/cluster/halyard.toml");
    let ports = free_ports(3);
    let mut pods = Vec::new();
    for ordinal in 0..3 {
        // Pods 0 and 1 see the client Service's links (a cluster that ignores
        // enableServiceLinks: false, or an older manifest); pod 2 gets what is shipped.
        let env = statefulset_pod_environment(ordinal, ordinal < 2);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let data_dir = unique_temp_path("pod-data", "d");
        let config = overlay_copy(&shipped, ordinal, &ports, &data_dir);
        let args = with_config(&command, &config);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pod = Broker::try_start_exact(&args, &env, data_dir);
        let _ = std::fs::remove_file(config);
        pods.push(pod?);
    }
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    for (ordinal, pod) in pods.iter().enumerate() {
        if !wait_ready(pod, deadline) {
            return Err(format!("pod {ordinal} not ready:\n{}", pod.logs()));
        }
    }
    Ok(pods)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_overlay_pods_join_by_name_and_carry_a_message_across_nodes() {
    let path = root().join("deploy/kubernetes/cluster/halyard.toml");
    for ordinal in 0..3 {
        let env = statefulset_pod_environment(ordinal, true);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (status, _, stderr) =
            run_halyard_env(&["check-config", path.to_str().expect("utf-8")], &env);
        assert!(status.success(), "pod {ordinal}: {stderr}");
    }
    // A Deployment's pod name has no ordinal: the shipped cluster file refuses it.
    let (status, _, stderr) = run_halyard_env(
        &["check-config", path.to_str().expect("utf-8")],
        &[("HOSTNAME", "halyard-7d9f8b6c5-x2kqp")],
    );
    assert!(!status.success());
    assert!(stderr.contains("does not end in -N"), "{stderr}");

    let mut attempt = 0;
    let pods = loop {
        attempt += 1;
        match start_overlay_pods() {
            Ok(pods) => break pods,
            Err(error) if attempt < START_ATTEMPTS => eprintln!("retrying: {error}"),
            Err(error) => panic!("{error}"),
        }
    };
    for (ordinal, pod) in pods.iter().enumerate() {
        let (code, body) = http(pod.http_addr(), "GET", "/api/v1/cluster", None, None);
        // The admin API needs the token each pod generated.
        assert_eq!(code, 401, "{body}");
        let token = logged_token(&pod.logs());
        let (code, body) = http(
            pod.http_addr(),
            "GET",
            "/api/v1/cluster",
            Some(&token),
            None,
        );
        assert_eq!(code, 200, "{body}");
        let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(status["node_id"], ordinal as u64 + 1, "{status}");
        let members = status["members"].as_array().expect("members");
        assert_eq!(members.len(), 3, "{status}");
        assert!(members.iter().all(|member| member["addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("localhost:"))));
    }

    let mut options = V5Client::options(pods[0].addr(), "k8s-sub");
    options.set_clean_start(true);
    let (mut subscriber, _) = V5Client::connect_with(options).await;
    subscriber
        .client
        .subscribe("k8s/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    subscriber.wait_suback().await;
    let mut publisher = RawClient::connect_v5(pods[2].addr(), "k8s-pub", true).await;
    let publish = publish_packet(
        "k8s/a",
        b"across pods",
        halyard_codec::QoS::AtLeastOnce,
        false,
        Some(1),
    );
    let reason = publisher.publish(publish).await;
    assert!(!reason.is_error(), "PUBACK: {reason:?}");
    let received = subscriber.next_publish().await;
    assert_eq!(&received.payload[..], b"across pods");
    assert_eq!(&received.topic[..], b"k8s/a");
}
