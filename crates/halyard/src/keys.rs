//! Every configuration key, derived from [`FileConfig`]'s own definition.
//!
//! A key is defined once, as a field of `FileConfig` or of one of its tables: its type, its
//! default (the `Default` impl, which takes the core's and the server's defaults), its bounds
//! (`#[schemars(range(...))]`) and its documentation (the doc comment, written for operators).
//! Everything else is derived here from the JSON schema schemars generates: the environment
//! variable names, the parsing of their values, the range checks, `check-config --show` and
//! README.md's key tables (checked by a test, rewritten by `halyard config-keys --readme`).
//! Adding a key is adding a field with a doc comment.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::config::{FileConfig, ENV_PREFIX};

/// One configuration key.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    /// Dotted path: `max_inflight`, `http.token`, `listener.kind`.
    pub path: String,
    /// The table it is in: `""` for the top level, `http`, `listener` (an array of tables).
    pub table: String,
    /// `HALYARD_<PATH>` for keys that can be set from the environment (not those in arrays
    /// of tables).
    pub env: Option<String>,
    /// What values it takes.
    pub kind: Kind,
    /// The default, as README.md shows it.
    pub default: String,
    /// What it does, from the doc comment.
    pub doc: String,
}

/// The shape of a key's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// A whole number within bounds.
    Integer {
        /// Smallest value allowed.
        min: Option<i128>,
        /// Largest value allowed.
        max: Option<i128>,
        /// Whether the bounds are the type's own (then README does not repeat them).
        natural: (bool, bool),
    },
    /// `true` or `false`.
    Boolean,
    /// Text: names, paths, addresses, enumerations.
    Text,
    /// A list of texts (comma-separated in the environment).
    TextList,
}

/// Every key, sorted by table, then by name.
pub fn keys() -> Vec<Key> {
    let schema = schemars::schema_for!(FileConfig);
    let root = schema.as_value();
    let mut keys = Vec::new();
    collect(root, root, "", "", true, &mut keys);
    keys.sort_by(|a, b| (a.table.as_str(), a.path.as_str()).cmp(&(b.table.as_str(), &b.path)));
    keys
}

/// Follows `$ref` to `$defs`.
fn resolve<'a>(root: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(reference) => reference
            .strip_prefix("#/$defs/")
            .and_then(|name| root.get("$defs")?.get(name))
            .unwrap_or(node),
        None => node,
    }
}

fn types(node: &Value) -> Vec<&str> {
    match node.get("type") {
        Some(Value::String(one)) => vec![one.as_str()],
        Some(Value::Array(many)) => many.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

fn collect(root: &Value, node: &Value, prefix: &str, table: &str, env: bool, out: &mut Vec<Key>) {
    let node = resolve(root, node);
    let Some(properties) = node.get("properties").and_then(Value::as_object) else {
        return;
    };
    let required: Vec<&str> = node
        .get("required")
        .and_then(Value::as_array)
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (name, property) in properties {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        let target = resolve(root, property);
        // An optional table (`Option<Section>`) is `anyOf: [section, null]`.
        let target = property
            .get("anyOf")
            .and_then(Value::as_array)
            .and_then(|options| {
                options
                    .iter()
                    .map(|option| resolve(root, option))
                    .find(|option| option.get("properties").is_some())
            })
            .unwrap_or(target);
        if target.get("properties").is_some() {
            collect(root, target, &path, &path, env, out);
            continue;
        }
        let item = target.get("items").map(|items| resolve(root, items));
        if let Some(item) = item.filter(|item| item.get("properties").is_some()) {
            collect(root, item, &path, &path, false, out);
            continue;
        }
        let kind = kind_of(target, item);
        let default = match (property.get("x-default"), property.get("default")) {
            (Some(Value::String(text)), _) => text.clone(),
            _ if required.contains(&name.as_str()) => "required".to_owned(),
            (_, Some(value)) => show(value),
            (_, None) => "none".to_owned(),
        };
        let doc = property
            .get("description")
            .or_else(|| target.get("description"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        out.push(Key {
            env: env.then(|| format!("{ENV_PREFIX}{}", path.replace('.', "_").to_uppercase())),
            table: table.to_owned(),
            path,
            kind,
            default,
            doc: one_paragraph(doc),
        });
    }
}

fn kind_of(target: &Value, item: Option<&Value>) -> Kind {
    let kinds = types(target);
    if kinds.contains(&"array") {
        return Kind::TextList;
    }
    if kinds.contains(&"boolean") {
        return Kind::Boolean;
    }
    if kinds.contains(&"integer") {
        let bound = |name| target.get(name).and_then(Value::as_i64).map(i128::from);
        let (min, max) = (bound("minimum"), bound("maximum"));
        let type_max = match target.get("format").and_then(Value::as_str) {
            Some("uint8") => Some(255),
            Some("uint16") => Some(65_535),
            Some("uint32") => Some(4_294_967_295),
            _ => None,
        };
        return Kind::Integer {
            min,
            max,
            natural: (
                min.is_none_or(|min| min == 0),
                max.is_none() || max == type_max,
            ),
        };
    }
    let _ = item;
    Kind::Text
}

/// A value as the TOML file would spell it, in backticks.
fn show(value: &Value) -> String {
    fn toml(value: &Value) -> String {
        match value {
            Value::String(text) => format!("{text:?}"),
            Value::Array(items) => {
                let items: Vec<String> = items.iter().map(toml).collect();
                format!("[{}]", items.join(", "))
            }
            other => other.to_string(),
        }
    }
    match value {
        Value::Null => "none".to_owned(),
        other => format!("`{}`", toml(other)),
    }
}

/// A doc comment as one line of a table cell.
fn one_paragraph(doc: &str) -> String {
    doc.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Key {
    /// The bounds README and errors state, when they are not the type's own.
    pub fn bounds(&self) -> Option<String> {
        let Kind::Integer {
            min,
            max,
            natural: (natural_min, natural_max),
        } = &self.kind
        else {
            return None;
        };
        match (min, max, natural_min, natural_max) {
            (Some(min), Some(max), _, false) => Some(format!("{min} to {max}.")),
            (Some(min), _, false, true) => Some(format!("At least {min}.")),
            _ => None,
        }
    }

    /// `value` (the text of an environment variable) as the TOML value of this key.
    pub fn parse_env(&self, value: &str) -> Result<toml::Value, String> {
        let text = value.trim();
        Ok(match self.kind {
            Kind::Integer { .. } => toml::Value::Integer(
                text.parse()
                    .map_err(|error| format!("not a whole number: {error}"))?,
            ),
            Kind::Boolean => toml::Value::Boolean(
                text.parse()
                    .map_err(|_| "must be true or false".to_owned())?,
            ),
            Kind::Text => toml::Value::String(text.to_owned()),
            Kind::TextList => toml::Value::Array(
                text.split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(|item| toml::Value::String(item.to_owned()))
                    .collect(),
            ),
        })
    }

    /// Whether `value` (this key's value in the effective configuration) is within bounds.
    pub fn check(&self, value: &Value) -> Result<(), String> {
        let (Kind::Integer { min, max, .. }, Some(number)) = (&self.kind, value.as_i64()) else {
            return Ok(());
        };
        let number = i128::from(number);
        if let Some(min) = min.filter(|&min| number < min) {
            return Err(format!("must be at least {min}"));
        }
        if let Some(max) = max.filter(|&max| number > max) {
            return Err(format!("must be at most {max}"));
        }
        Ok(())
    }
}

/// The keys that can be set from the environment, by variable name.
pub fn env_keys() -> BTreeMap<String, Key> {
    keys()
        .into_iter()
        .filter_map(|key| Some((key.env.clone()?, key)))
        .collect()
}

/// The value at dotted `path` of `value`, if any.
pub fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(value, |value, part| value.as_object()?.get(part))
}

/// Sets dotted `path` in `table` to `value`, creating tables on the way.
pub fn set(table: &mut toml::Table, path: &str, value: toml::Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else {
        return;
    };
    let mut current = table;
    for part in parts {
        let entry = current
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        current = next;
    }
    current.insert(last.to_owned(), value);
}

/// README.md's table of the keys of `table` (`""` for the top level).
pub fn markdown_table(table: &str) -> String {
    let mut text = String::from("| key | default | meaning |\n|---|---|---|\n");
    for key in keys().iter().filter(|key| key.table == table) {
        let name = key.path.rsplit('.').next().unwrap_or(&key.path);
        let doc = match key.bounds() {
            Some(bounds) if !key.doc.contains(&bounds) => format!("{} {bounds}", key.doc),
            _ => key.doc.clone(),
        };
        text.push_str(&format!("| `{name}` | {} | {doc} |\n", key.default));
    }
    text
}

/// The tables README.md documents, in its order.
pub fn tables() -> Vec<String> {
    let mut tables: Vec<String> = Vec::new();
    for key in keys() {
        if !tables.contains(&key.table) {
            tables.push(key.table);
        }
    }
    tables
}

/// Markers around each generated table in README.md: `<!-- keys: http -->` ...
/// `<!-- /keys -->` (`<!-- keys: top -->` for the top level).
fn markers(table: &str) -> (String, &'static str) {
    let name = if table.is_empty() { "top" } else { table };
    (format!("<!-- keys: {name} -->\n"), "<!-- /keys -->")
}

/// `readme` with every generated table replaced by its current version; an error names a
/// table whose markers are missing.
pub fn update_readme(readme: &str) -> Result<String, String> {
    let mut text = readme.to_owned();
    for table in tables() {
        let (open, close) = markers(&table);
        let start = text
            .find(&open)
            .ok_or_else(|| format!("README.md has no `{}` marker", open.trim_end()))?
            + open.len();
        let end = text[start..]
            .find(close)
            .map(|offset| start + offset)
            .ok_or_else(|| format!("README.md: no `{close}` after `{}`", open.trim_end()))?;
        text.replace_range(start..end, &markdown_table(&table));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_a_doc_and_a_unique_environment_name() {
        let keys = keys();
        assert!(keys.len() > 40, "{}", keys.len());
        for key in &keys {
            assert!(!key.doc.is_empty(), "{} has no doc comment", key.path);
        }
        let names: Vec<&String> = keys.iter().filter_map(|key| key.env.as_ref()).collect();
        let unique: std::collections::BTreeSet<&&String> = names.iter().collect();
        assert_eq!(
            names.len(),
            unique.len(),
            "two keys share an environment name"
        );
        let env = env_keys();
        assert_eq!(env["HALYARD_HTTP_TOKEN"].path, "http.token");
        assert_eq!(env["HALYARD_STORAGE_FSYNC"].path, "storage.fsync");
        assert!(keys
            .iter()
            .any(|key| key.path == "listener.kind" && key.env.is_none()));
    }

    #[test]
    fn bounds_come_from_the_definition() {
        let env = env_keys();
        let inflight = &env["HALYARD_MAX_INFLIGHT"];
        assert_eq!(inflight.bounds().as_deref(), Some("At least 1."));
        assert!(inflight.check(&Value::from(0)).is_err());
        assert!(inflight.check(&Value::from(1)).is_ok());
        let packet = &env["HALYARD_MAX_PACKET_SIZE"];
        assert_eq!(packet.bounds().as_deref(), Some("2 to 268435460."));
        assert!(packet
            .check(&Value::from(268_435_461u32))
            .is_err_and(|message| message.contains("at most 268435460")));
        assert_eq!(env["HALYARD_MAX_KEEPALIVE"].bounds(), None);
        assert_eq!(env["HALYARD_MAX_INFLIGHT"].default, "`32`");
    }

    /// README.md's key tables are generated from the definitions; regenerate them with
    /// `cargo run -- config-keys --readme README.md`.
    #[test]
    fn readme_tables_are_generated_from_the_definitions() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
        let readme = std::fs::read_to_string(path).expect("README.md");
        let expected = update_readme(&readme).expect("markers");
        assert!(
            readme == expected,
            "README.md's key tables are out of date: run `cargo run -- config-keys --readme \
             README.md`"
        );
    }
}
