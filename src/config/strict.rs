//! The keys of the configuration file that nothing reads. The daemon ignores them, as mistry
//! does; `mistry exec --config` refuses them, so that a misspelt setting (`"procesess"`) cannot
//! make a local run silently differ from the server's.
//!
//! The known keys are the fields of the structs the daemon's parser deserializes (taken from
//! serde's derive, [`fields_of`]): a setting added to them is known here with no list to keep.

use serde::de::{self, DeserializeOwned, Visitor};
use serde_json::Value;

/// A deserializer that records the field names a derived `Deserialize` of a struct asks for,
/// and deserializes nothing.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("field names taken"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// The keys a struct with a derived `Deserialize` (and no `flatten`) reads.
fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // The error is the point: it stops the derive right after it named its fields.
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}

/// `prefix.key` for each key of `v` (when it is an object) not in `known`.
fn unknown_in(v: &Value, prefix: &str, known: &[&str], out: &mut Vec<String>) {
    if let Some(map) = v.as_object() {
        out.extend(
            map.keys()
                .filter(|k| !known.contains(&k.as_str()))
                .map(|k| format!("{prefix}{k}")),
        );
    }
}

/// The entries of `v` (when it is an object).
fn entries(v: &Value) -> impl Iterator<Item = (&String, &Value)> {
    v.as_object().into_iter().flatten()
}

/// Every key of the configuration `v` that the daemon would ignore, as a dotted path
/// (`limits.procesess`, `projects.web.netwrk`), in the file's order of sections.
pub(super) fn unknown_keys(v: &Value) -> Vec<String> {
    use crate::security::RawLimits;
    let mut out = Vec::new();
    let top: Vec<&str> = fields_of::<super::Raw>()
        .iter()
        .chain(fields_of::<super::cluster::RawSettings>())
        .chain(fields_of::<crate::access::RawAccess>())
        .copied()
        .collect();
    unknown_in(v, "", &top, &mut out);
    let limits = fields_of::<RawLimits>();
    unknown_in(&v["limits"], "limits.", limits, &mut out);
    unknown_in(
        &v["retention"],
        "retention.",
        fields_of::<super::retention::RawRetention>(),
        &mut out,
    );
    unknown_in(
        &v["registries"],
        "registries.",
        fields_of::<images::RegistryConfig>(),
        &mut out,
    );
    for (host, c) in entries(&v["registries"]["credentials"]) {
        unknown_in(
            c,
            &format!("registries.credentials.{host}."),
            fields_of::<images::Credentials>(),
            &mut out,
        );
    }
    for (name, p) in entries(&v["projects"]) {
        let prefix = format!("projects.{name}.");
        unknown_in(p, &prefix, fields_of::<super::ProjectSettings>(), &mut out);
        unknown_in(&p["limits"], &format!("{prefix}limits."), limits, &mut out);
    }
    for (id, s) in entries(&v["secrets"]) {
        unknown_in(
            s,
            &format!("secrets.{id}."),
            fields_of::<super::secrets::FullSecret>(),
            &mut out,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_derives_name_their_fields() {
        assert_eq!(
            fields_of::<crate::security::RawLimits>(),
            ["processes", "memory", "open_files", "disk", "log", "tmpfs"]
        );
        let top = fields_of::<super::super::Raw>();
        for k in [
            "projects_path",
            "build_path",
            "limits",
            "secrets",
            "registries",
        ] {
            assert!(top.contains(&k), "{k} missing from {top:?}");
        }
        assert!(fields_of::<super::super::cluster::RawSettings>().contains(&"database_url"));
    }

    #[test]
    fn the_sample_has_no_unknown_key_and_misspellings_are_found() {
        let sample: Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.sample.json"))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(unknown_keys(&sample), Vec::<String>::new());
        let v = serde_json::json!({
            "projects_path": "/p", "build_path": "/b", "netwrok": "none",
            "limits": {"procesess": 3, "memory": "1GiB"},
            "retention": {"keep": 2, "max-age": "1d"},
            "registries": {"insecure": [], "credentials": {"r.io": {"username": "u", "password": "p", "token": "t"}}},
            "projects": {"web": {"network": "none", "limits": {"disk_size": 1}, "timelimit": "1m"}},
            "secrets": {"a": "/s/a", "b": {"src": "/s/b", "project": ["web"]}},
            "database_url": "postgres://x", "heartbeat": "5s",
        });
        let mut got = unknown_keys(&v);
        got.sort();
        assert_eq!(
            got,
            [
                "limits.procesess",
                "netwrok",
                "projects.web.limits.disk_size",
                "projects.web.timelimit",
                "registries.credentials.r.io.token",
                "retention.max-age",
                "secrets.b.project",
            ]
        );
    }
}
