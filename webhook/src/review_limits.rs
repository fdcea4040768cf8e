//! The counts a review's object may hold, checked in one pass over its raw JSON before anything
//! is built from it. A typed `Pod` costs far more than its JSON (a 13-byte `{"name":"v"}` is a
//! `Volume` of 3 KiB), so the scan refuses past the limits below while it reads, holding nothing
//! but the path it is at; only a document proven bounded is then parsed. See docs/webhook.md,
//! "Review limits".

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Entries of each of `spec.containers`, `spec.initContainers` and `spec.ephemeralContainers`.
pub const MAX_CONTAINERS: usize = 64;
/// Entries of `spec.volumes`.
pub const MAX_VOLUMES: usize = 256;
/// Entries of `env` in one container.
pub const MAX_ENV: usize = 1024;
/// JSON values (objects, arrays, strings, numbers, booleans, nulls) in one object.
pub const MAX_VALUES: usize = 100_000;
/// Levels of nesting in one object.
pub const MAX_DEPTH: usize = 64;

/// An object past a limit: the message names the field, the count, the limit and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TooLarge {
    #[error("{field} has {count} entries, more than the {limit} the webhook reads: {fix}")]
    List { field: String, count: usize, limit: usize, fix: &'static str },
    #[error("{what} holds more than {MAX_VALUES} JSON values (the limit is reached at {field}): the webhook reads at most {MAX_VALUES}; remove unused fields, or split the workload")]
    Values { what: &'static str, field: String },
    #[error("{what} nests more than {MAX_DEPTH} levels deep (at {field}): flatten the object")]
    Depth { what: &'static str, field: String },
}

/// Scans `raw`, the JSON of `what` (e.g. `request.object`), whose pod sits at `pod_root` (a
/// JSON pointer: `""` for a Pod, `/spec/template` for a Deployment). `Ok` also when `raw` is not
/// valid JSON: the parse that follows says why, as it always has.
pub fn check(raw: &str, what: &'static str, pod_root: &str) -> Result<(), TooLarge> {
    let root: Vec<&str> = pod_root.split('/').skip(1).collect();
    let mut scan = Scan { what, root: &root, path: Vec::new(), values: 0, refused: None };
    let mut deserializer = serde_json::Deserializer::from_str(raw);
    let _ = Walk(&mut scan).deserialize(&mut deserializer);
    scan.refused.map_or(Ok(()), Err)
}

/// One step of the path to the value being read.
enum Segment<'de> {
    Key(Cow<'de, str>),
    Index(usize),
}

struct Scan<'a, 'de> {
    what: &'static str,
    root: &'a [&'a str],
    path: Vec<Segment<'de>>,
    values: usize,
    refused: Option<TooLarge>,
}

impl Scan<'_, '_> {
    /// The path as a field name, e.g. `spec.containers[2].env`.
    fn field(&self) -> String {
        let mut field = String::new();
        for segment in &self.path {
            match segment {
                Segment::Key(key) => {
                    if !field.is_empty() {
                        field.push('.');
                    }
                    field.push_str(key);
                }
                Segment::Index(index) => field.push_str(&format!("[{index}]")),
            }
        }
        if field.is_empty() {
            self.what.to_owned()
        } else {
            field
        }
    }

    /// The path below the pod, when the current value is inside it.
    fn in_pod(&self) -> Option<&[Segment<'_>]> {
        if self.path.len() < self.root.len() {
            return None;
        }
        let (root, rest) = self.path.split_at(self.root.len());
        let matches = root.iter().zip(self.root).all(|(s, r)| matches!(s, Segment::Key(k) if k == r));
        matches.then_some(rest)
    }

    /// The limit and the fix for the list at the current path, if it has one.
    fn list_limit(&self) -> Option<(usize, &'static str)> {
        let path = self.in_pod()?;
        let key = |i: usize| match path.get(i) {
            Some(Segment::Key(key)) => Some(key.as_ref()),
            _ => None,
        };
        let containers = matches!(key(1), Some("containers" | "initContainers" | "ephemeralContainers"));
        let in_entry = matches!(path.get(2), Some(Segment::Index(_)));
        match (path.len(), key(0), key(1), key(3)) {
            (2, Some("spec"), Some("volumes"), _) => Some((
                MAX_VOLUMES,
                "combine volumes (one projected volume can hold many ConfigMaps, Secrets and tokens), or split the workload",
            )),
            (2, Some("spec"), _, _) if containers => {
                Some((MAX_CONTAINERS, "split the workload into pods with fewer containers"))
            }
            (4, Some("spec"), _, Some("env")) if containers && in_entry => {
                Some((MAX_ENV, "move the variables into a ConfigMap and load it with envFrom"))
            }
            _ => None,
        }
    }

    fn refuse<E: serde::de::Error>(&mut self, refusal: TooLarge) -> E {
        self.refused = Some(refusal);
        E::custom("review past a limit")
    }

    /// Counts one value at the current path.
    fn count<E: serde::de::Error>(&mut self) -> Result<(), E> {
        self.values += 1;
        if self.values > MAX_VALUES {
            let refusal = TooLarge::Values { what: self.what, field: self.field() };
            return Err(self.refuse(refusal));
        }
        Ok(())
    }

    /// Counts a value that nests others, one level below the current path.
    fn enter<E: serde::de::Error>(&mut self) -> Result<(), E> {
        self.count()?;
        if self.path.len() >= MAX_DEPTH {
            let refusal = TooLarge::Depth { what: self.what, field: self.field() };
            return Err(self.refuse(refusal));
        }
        Ok(())
    }
}

/// Reads one value, counting it and everything in it.
struct Walk<'s, 'a, 'de>(&'s mut Scan<'a, 'de>);

impl<'de> DeserializeSeed<'de> for Walk<'_, '_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.0.count()
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.0.count()
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.0.count()
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.0.count()
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
        self.0.count()
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.0.count()
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.0.count()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let scan = self.0;
        scan.enter()?;
        let limit = scan.list_limit();
        let mut index = 0;
        loop {
            scan.path.push(Segment::Index(index));
            let next = seq.next_element_seed(Walk(&mut *scan));
            scan.path.pop();
            if next?.is_none() {
                return Ok(());
            }
            index += 1;
            if let Some((limit, fix)) = limit.filter(|(limit, _)| index > *limit) {
                // Counted to the end without reading what the entries hold, to name the count.
                let mut count = index;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    count += 1;
                }
                let refusal = TooLarge::List { field: scan.field(), count, limit, fix };
                return Err(scan.refuse(refusal));
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let scan = self.0;
        scan.enter()?;
        while let Some(key) = map.next_key_seed(Key)? {
            scan.path.push(Segment::Key(key));
            let value = map.next_value_seed(Walk(&mut *scan));
            scan.path.pop();
            value?;
        }
        Ok(())
    }
}

/// An object's key, borrowed from the body unless it holds escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, key: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(key))
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(key.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_with(list: &str, entry: &str, count: usize) -> String {
        let entries = vec![entry; count].join(",");
        format!(r#"{{"metadata":{{"name":"p"}},"spec":{{"{list}":[{entries}]}}}}"#)
    }

    #[test]
    fn lists_at_their_limit_pass_and_one_more_is_refused_with_the_count() {
        let volume = r#"{"name":"v"}"#;
        assert_eq!(check(&pod_with("volumes", volume, MAX_VOLUMES), "request.object", ""), Ok(()));
        let refused = check(&pod_with("volumes", volume, 300_000), "request.object", "").expect_err("refused");
        assert_eq!(
            refused,
            TooLarge::List {
                field: "spec.volumes".into(),
                count: 300_000,
                limit: MAX_VOLUMES,
                fix: "combine volumes (one projected volume can hold many ConfigMaps, Secrets and tokens), or split the workload"
            }
        );
        let message = refused.to_string();
        assert!(message.starts_with("spec.volumes has 300000 entries, more than the 256 the webhook reads: combine"));

        let container = r#"{"name":"c","image":"i"}"#;
        for list in ["containers", "initContainers", "ephemeralContainers"] {
            assert_eq!(check(&pod_with(list, container, MAX_CONTAINERS), "request.object", ""), Ok(()), "{list}");
            let refused = check(&pod_with(list, container, MAX_CONTAINERS + 1), "request.object", "");
            assert!(
                matches!(&refused, Err(TooLarge::List { field, count: 65, limit: 64, .. }) if *field == format!("spec.{list}")),
                "{list}: {refused:?}"
            );
        }
    }

    #[test]
    fn env_is_counted_per_container_and_named_by_its_index() {
        let env = vec![r#"{"name":"A"}"#; MAX_ENV + 1].join(",");
        let ok = vec![r#"{"name":"A"}"#; MAX_ENV].join(",");
        let pod = format!(
            r#"{{"spec":{{"containers":[{{"name":"a","env":[{ok}]}},{{"name":"b","env":[{ok}]}},{{"name":"c","env":[{env}]}}]}}}}"#
        );
        let refused = check(&pod, "request.object", "").expect_err("refused");
        assert_eq!(refused.to_string(), "spec.containers[2].env has 1025 entries, more than the 1024 the webhook reads: move the variables into a ConfigMap and load it with envFrom");
    }

    #[test]
    fn limits_apply_under_a_workload_template_only() {
        let volumes = vec![r#"{"name":"v"}"#; MAX_VOLUMES + 1].join(",");
        let deployment = format!(r#"{{"spec":{{"template":{{"spec":{{"volumes":[{volumes}]}}}}}}}}"#);
        let refused = check(&deployment, "request.object", "/spec/template").expect_err("refused");
        assert!(matches!(refused, TooLarge::List { ref field, .. } if field == "spec.template.spec.volumes"));
        // The same list elsewhere is no pod's volumes: only the total counts there.
        assert_eq!(check(&deployment, "request.object", ""), Ok(()));
        let cron =
            format!(r#"{{"spec":{{"jobTemplate":{{"spec":{{"template":{{"spec":{{"volumes":[{volumes}]}}}}}}}}}}}}"#);
        assert!(check(&cron, "request.object", "/spec/jobTemplate/spec/template").is_err());
    }

    #[test]
    fn total_values_and_depth_are_bounded_anywhere() {
        // A Deployment padded with empty arrays in a field no one reads.
        let padding = vec!["[]"; MAX_VALUES].join(",");
        let padded = format!(r#"{{"spec":{{"x-padding":[{padding}]}}}}"#);
        let refused = check(&padded, "request.object", "/spec/template").expect_err("refused");
        assert_eq!(
            refused.to_string(),
            format!("request.object holds more than 100000 JSON values (the limit is reached at spec.x-padding[{}]): the webhook reads at most 100000; remove unused fields, or split the workload", MAX_VALUES - 3)
        );
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(matches!(
            check(&deep, "request.oldObject", ""),
            Err(TooLarge::Depth { what: "request.oldObject", .. })
        ));
        let shallow = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(check(&shallow, "request.object", ""), Ok(()));
    }

    #[test]
    fn escaped_keys_are_matched_and_bad_json_is_left_to_the_parse() {
        let volumes = vec![r#"{"name":"v"}"#; MAX_VOLUMES + 1].join(",");
        let escaped = format!(r#"{{"sp\u0065c":{{"volum\u0065s":[{volumes}]}}}}"#);
        assert!(check(&escaped, "request.object", "").is_err(), "the API server reads escaped keys as plain ones");
        assert_eq!(check(r#"{"spec": [1, 2"#, "request.object", ""), Ok(()));
    }
}
