//! `halyard cluster join|leave|status`: the operator's membership commands, which talk to
//! any node's admin API (`/api/v1/cluster...`); the node forwards a change to the leader.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// How long a command waits for the node: adding a learner waits until it has caught up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(40);

/// `halyard cluster ...`.
#[derive(Debug, clap::Args)]
pub struct ClusterCommand {
    #[command(subcommand)]
    action: Action,
    /// The admin API of any node of the cluster.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:8080",
        value_name = "URL"
    )]
    url: String,
    /// The admin API token (`http.token`); default: the HALYARD_HTTP_TOKEN variable, as a
    /// pod of the Kubernetes overlay has it.
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Add a node (started with `--node-id ID` beyond the voters of --peers) as a learner:
    /// it replicates the cluster state and serves clients; with --voter, promote it too.
    Join {
        /// The new node's id.
        id: u64,
        /// Its cluster port, `host:port` (what it gives as --cluster-listen, reachable from
        /// the other nodes).
        addr: String,
        /// Promote the node to voter (also for a node that already is a learner).
        #[arg(long)]
        voter: bool,
    },
    /// Remove a node from the membership, demoting it first if it is a voter. Do this before
    /// deleting a node's data directory (or its PersistentVolumeClaim).
    Leave {
        /// The id of the node to remove.
        id: u64,
    },
    /// Print members, roles, leader, term, applied index and peer links.
    Status {
        /// Print the JSON of /api/v1/cluster instead.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the command; prints the cluster's status after a change.
pub async fn run(command: ClusterCommand) -> Result<()> {
    let token = command
        .token
        .or_else(|| std::env::var("HALYARD_HTTP_TOKEN").ok());
    let base = command.url.trim_end_matches('/').to_owned();
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("cannot build the HTTP client")?;
    let (request, print_json) = match command.action {
        Action::Join { id, addr, voter } => (
            client
                .post(format!("{base}/api/v1/cluster/members"))
                .json(&json!({ "id": id, "addr": addr, "voter": voter })),
            false,
        ),
        Action::Leave { id } => (
            client.delete(format!("{base}/api/v1/cluster/members/{id}")),
            false,
        ),
        Action::Status { json } => (client.get(format!("{base}/api/v1/cluster")), json),
    };
    let request = match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach the admin API at {base}"))?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .with_context(|| format!("{base} answered {status} without JSON"))?;
    if !status.is_success() {
        let error = body["error"].as_str().unwrap_or("(no error message)");
        bail!("{base} answered {status}: {error}");
    }
    if print_json {
        println!("{body:#}");
    } else {
        print!("{}", describe(&body));
    }
    Ok(())
}

/// `/api/v1/cluster` as text: one line for the node, one per member and per link.
fn describe(status: &Value) -> String {
    let text = |value: &Value| match value {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let mut out = format!(
        "node {} ({}), leader {}, term {}, applied index {}, commit index {}\n",
        text(&status["node_id"]),
        text(&status["role"]),
        text(&status["leader"]),
        text(&status["term"]),
        text(&status["applied_index"]),
        text(&status["commit_index"]),
    );
    if let Some(reason) = status["fenced"].as_str() {
        out.push_str(&format!("FENCED: {reason}\n"));
    }
    out.push_str("members:\n");
    for member in status["members"].as_array().into_iter().flatten() {
        let role = if member["id"] == status["leader"] {
            "leader"
        } else if member["voter"].as_bool() == Some(true) {
            "voter"
        } else {
            "learner"
        };
        out.push_str(&format!(
            "  {} {} {role} incarnation {} matched {}\n",
            text(&member["id"]),
            text(&member["addr"]),
            member["incarnation"]
                .as_u64()
                .map_or("-".to_owned(), |incarnation| format!("{incarnation:016x}")),
            text(&member["matched_index"]),
        ));
    }
    out.push_str("links:\n");
    for link in status["links"].as_array().into_iter().flatten() {
        let state = if link["connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "down"
        };
        out.push_str(&format!(
            "  to {} {state}, {} unacked\n",
            text(&link["node"]),
            text(&link["unacked"]),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_text_names_roles_and_links() {
        let status = json!({
            "node_id": 1, "role": "leader", "leader": 1, "term": 3,
            "applied_index": 40, "commit_index": 40, "fenced": null,
            "members": [
                {"id": 1, "addr": "a:1", "incarnation": 255, "voter": true, "matched_index": 40},
                {"id": 2, "addr": "b:1", "incarnation": 0, "voter": true, "matched_index": null},
                {"id": 4, "addr": "d:1", "incarnation": 1, "voter": false, "matched_index": 39},
            ],
            "links": [{"node": 2, "connected": false, "unacked": 3}],
        });
        let text = describe(&status);
        assert!(
            text.starts_with("node 1 (leader), leader 1, term 3, applied index 40"),
            "{text}"
        );
        assert!(
            text.contains("  1 a:1 leader incarnation 00000000000000ff matched 40\n"),
            "{text}"
        );
        assert!(
            text.contains("  2 b:1 voter incarnation 0000000000000000 matched -\n"),
            "{text}"
        );
        assert!(text.contains("  4 d:1 learner"), "{text}");
        assert!(text.contains("  to 2 down, 3 unacked\n"), "{text}");
        assert!(!text.contains("FENCED"));
    }
}
