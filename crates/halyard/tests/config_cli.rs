//! Command line and configuration file handling (DESIGN 6: an unknown key or a bad value is
//! an error that names the key and the line).

mod common;

use common::*;
use halyard_codec::{ProtocolVersion, ReasonCode};

/// `serve` with an unknown key exits non-zero; stderr names the key and its line.
#[tokio::test]
async fn unknown_key_fails_naming_key_and_line() {
    let path = write_temp_config("max_keepalive = 10\n\nbogus_key = 1\n");
    let (status, _, stderr) = run_halyard(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--config",
        path.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&path);
    assert!(!status.success());
    assert!(stderr.contains("bogus_key"), "{stderr}");
    assert!(stderr.contains("line 3"), "{stderr}");
}

/// A value of the wrong type exits non-zero; stderr names the key and its line.
#[tokio::test]
async fn bad_value_type_fails_naming_key_and_line() {
    let path = write_temp_config("# comment\nmax_inflight = \"lots\"\n");
    let (status, _, stderr) = run_halyard(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--config",
        path.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&path);
    assert!(!status.success());
    assert!(stderr.contains("max_inflight"), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
}

/// An out-of-range value (u16 key given 70000) exits non-zero naming key and line.
#[tokio::test]
async fn out_of_range_value_fails_naming_key_and_line() {
    let path = write_temp_config("max_keepalive = 70000\n");
    let (status, _, stderr) = run_halyard(&["check-config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert!(!status.success());
    assert!(stderr.contains("max_keepalive"), "{stderr}");
    assert!(stderr.contains("line 1"), "{stderr}");
}

/// `check-config` accepts a valid file with every documented key and exits 0.
#[tokio::test]
async fn check_config_accepts_valid_file() {
    let path = write_temp_config(
        "listen = [\"127.0.0.1:0\"]\nconnect_timeout_ms = 500\nmax_outbound_buffer = 65536\n\
         max_keepalive = 60\nmax_inflight = 10\nreceive_maximum = 100\nmax_queued_messages = 50\n\
         max_packet_size = 10000\nmax_topic_length = 100\nmax_topic_levels = 10\n\
         topic_alias_maximum = 5\nretain_available = true\nmax_session_expiry = 3600\n\
         allow_zero_length_client_id = false\n",
    );
    let (status, stdout, stderr) = run_halyard(&["check-config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert!(status.success(), "stderr: {stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
}

/// `check-config` rejects an unknown key with a non-zero exit naming key and line.
#[tokio::test]
async fn check_config_rejects_unknown_key() {
    let path = write_temp_config("max_keepalive = 10\nmax_keepalvie = 5\n");
    let (status, _, stderr) = run_halyard(&["check-config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert!(!status.success());
    assert!(stderr.contains("max_keepalvie"), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
}

/// `check-config` also reads the ACL file the config names, and a bad line there fails the
/// check, naming the file's line.
#[tokio::test]
async fn check_config_rejects_a_bad_acl_file() {
    let acl = unique_temp_path("acl", "txt");
    std::fs::write(
        &acl,
        "topic readwrite #
topic sometimes x
",
    )
    .expect("write acl");
    let path = write_temp_config(&format!(
        "[auth]\nacl_file = {:?}\n",
        acl.display().to_string()
    ));
    let (status, _, stderr) = run_halyard(&["check-config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&acl);
    assert!(!status.success(), "a bad ACL passed the check");
    assert!(stderr.contains("line 2"), "{stderr}");
}

/// A missing config file is an error, not a silent default.
#[tokio::test]
async fn missing_config_file_fails() {
    let path = unique_temp_path("missing", "toml");
    let (status, _, stderr) = run_halyard(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--config",
        path.to_str().unwrap(),
    ]);
    assert!(!status.success());
    assert!(!stderr.is_empty());
}

/// `halyard --help` exits 0 and documents the subcommands.
#[tokio::test]
async fn help_exits_0() {
    let (status, stdout, _) = run_halyard(&["--help"]);
    assert!(status.success());
    assert!(stdout.contains("serve"), "{stdout}");
    assert!(stdout.contains("check-config"), "{stdout}");
}

/// `halyard --version` exits 0.
#[tokio::test]
async fn version_exits_0() {
    let (status, stdout, _) = run_halyard(&["--version"]);
    assert!(status.success());
    assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{stdout}");
}

/// An unknown subcommand or flag exits non-zero.
#[tokio::test]
async fn unknown_flag_fails() {
    let (status, _, _) = run_halyard(&["serve", "--no-such-flag"]);
    assert!(!status.success());
}

/// HALYARD_<KEY> environment variables override the defaults (DESIGN 6):
/// HALYARD_MAX_KEEPALIVE=10 -> MQTT 5 Server Keep Alive 10.
#[tokio::test]
async fn environment_override_applies() {
    let broker = Broker::start_with_env(&[("HALYARD_MAX_KEEPALIVE", "10")]);
    let mut conn = connect_packet(ProtocolVersion::V5, "env", true);
    conn.keep_alive = 60;
    let (_c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    assert_eq!(ack.properties.server_keep_alive, Some(10));
}

/// A bad environment value is an error naming the variable.
#[tokio::test]
async fn bad_environment_value_fails_naming_variable() {
    let (status, _, stderr) = run_halyard_env(
        &["serve", "--listen", "127.0.0.1:0"],
        &[("HALYARD_MAX_INFLIGHT", "many")],
    );
    assert!(!status.success());
    assert!(stderr.contains("HALYARD_MAX_INFLIGHT"), "{stderr}");
}

/// The config file's values reach the broker (max_keepalive from the file).
#[tokio::test]
async fn config_file_values_applied() {
    let broker = Broker::start_with_config("# limits\nmax_keepalive = 7\n");
    let mut conn = connect_packet(ProtocolVersion::V5, "file", true);
    conn.keep_alive = 60;
    let (_c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert_eq!(ack.properties.server_keep_alive, Some(7));
}

/// Operator-facing errors (issue 16): each cause once, the config key named, the config's
/// own words, and why a host name is not an address.
#[test]
fn errors_name_the_key_once_in_the_configs_words() {
    // An address in use: the OS error once, not "...: Address already in use ... (os error
    // 98): Address already in use (os error 98)".
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr").to_string();
    let (status, _, stderr) = run_halyard(&[
        "serve",
        "--listen",
        &addr,
        "--no-http",
        "--data-dir",
        unique_temp_path("inuse", "d").to_str().unwrap(),
    ]);
    assert!(!status.success());
    assert_eq!(stderr.matches("os error").count(), 1, "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");

    let missing = unique_temp_path("passwd", "txt");
    let path = write_temp_config(&format!(
        "[auth]\npassword_file = {:?}\n",
        missing.display().to_string()
    ));
    let (status, _, stderr) = run_halyard(&["check-config", path.to_str().unwrap()]);
    assert!(!status.success());
    assert!(stderr.contains("auth.password_file"), "{stderr}");
    assert_eq!(stderr.matches("os error").count(), 1, "{stderr}");

    let path = write_temp_config("[[listener]]\nkind = \"tls\"\naddress = \"127.0.0.1:0\"\n");
    let (status, _, stderr) = run_halyard(&["check-config", path.to_str().unwrap()]);
    assert!(!status.success());
    assert!(stderr.contains("kind \"tls\" needs cert_file"), "{stderr}");
    assert!(!stderr.contains("Tls"), "{stderr}");

    let path = write_temp_config("listen = [\"localhost:1883\"]\n");
    let (status, _, stderr) = run_halyard(&["check-config", path.to_str().unwrap()]);
    assert!(!status.success());
    assert!(stderr.contains("an IP address is required"), "{stderr}");
    let (status, _, stderr) = run_halyard(&["serve", "--listen", "localhost:1883"]);
    assert_eq!(
        status.code(),
        Some(2),
        "a command-line error, as clap reports them"
    );
    assert!(stderr.contains("an IP address is required"), "{stderr}");
}
