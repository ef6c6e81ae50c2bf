//! What each fsync policy keeps when the process dies without closing the store (as with
//! `kill -9`): a child process writes, commits and aborts; the parent reopens and loads.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{session, temp_dir};
use halyard_core::store::Store;
use halyard_store::{FsyncPolicy, RedbStore};

const DIR_VAR: &str = "HALYARD_STORE_CRASH_DIR";
const POLICY_VAR: &str = "HALYARD_STORE_CRASH_POLICY";

fn policy(name: &str) -> FsyncPolicy {
    match name {
        "always" => FsyncPolicy::Always,
        "interval" => FsyncPolicy::Interval(Duration::from_secs(3600)),
        _ => FsyncPolicy::Never,
    }
}

/// The child's half: does nothing unless started by [`survivors_after_abort`].
#[test]
fn crash_child() {
    let (Ok(dir), Ok(name)) = (std::env::var(DIR_VAR), std::env::var(POLICY_VAR)) else {
        return;
    };
    let mut store = RedbStore::open(dir.as_ref(), policy(&name)).expect("open");
    store.put_session(&session("committed"));
    store.commit().expect("commit");
    store.put_session(&session("uncommitted"));
    std::process::abort();
}

/// Runs the child with `policy` and returns the clients found afterwards.
fn survivors_after_abort(name: &str) -> Vec<String> {
    let dir = temp_dir();
    let status = Command::new(std::env::current_exe().expect("test binary"))
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(DIR_VAR, dir.path())
        .env(POLICY_VAR, name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("child runs");
    assert!(!status.success(), "the child must die by abort");
    let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("reopen");
    let state = store.load().expect("load");
    state
        .sessions
        .into_iter()
        .map(|s| s.record.client_id)
        .collect()
}

#[test]
fn always_keeps_every_commit() {
    assert_eq!(survivors_after_abort("always"), vec!["committed"]);
}

#[test]
fn interval_loses_commits_not_yet_due() {
    assert!(survivors_after_abort("interval").is_empty());
}

#[test]
fn never_loses_commits_since_the_last_durable_one() {
    assert!(survivors_after_abort("never").is_empty());
}
