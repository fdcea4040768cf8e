//! Multi-document YAML: splitting a stream into documents while keeping each one's exact text
//! (so `render` passes untouched documents through byte for byte), and loading the policy and
//! cluster files.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::policy::{self, Policy, TokenProxyPolicy};

/// One document of a stream: the separator line that opened it (empty for a first document
/// without one) and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub separator: String,
    pub text: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{source_name}: document {index}: invalid YAML: {why}")]
    Yaml { source_name: String, index: usize, why: String },
    #[error("{source_name}: document {index}: {why}")]
    Document { source_name: String, index: usize, why: String },
}

/// Splits a YAML stream on lines that start with `---`, as `kubectl` does.
pub fn split_documents(text: &str) -> Vec<Document> {
    let mut documents = vec![Document { separator: String::new(), text: String::new() }];
    for line in text.split_inclusive('\n') {
        let is_separator =
            line.strip_prefix("---").is_some_and(|rest| rest.trim().is_empty() || rest.starts_with([' ', '\t']));
        if is_separator {
            documents.push(Document { separator: line.to_owned(), text: String::new() });
        } else if let Some(last) = documents.last_mut() {
            last.text.push_str(line);
        }
    }
    documents
}

/// Parses one document; `None` when it holds nothing but blank lines and comments.
pub fn parse_document(text: &str) -> Result<Option<Value>, serde_yaml::Error> {
    let value: Value = serde_yaml::from_str(text)?;
    Ok(if value.is_null() { None } else { Some(value) })
}

/// Every non-empty document of a stream, numbered from 1 in errors.
pub fn parse_stream(text: &str, source_name: &str) -> Result<Vec<Value>, FileError> {
    let mut values = Vec::new();
    for (index, document) in split_documents(text).iter().enumerate() {
        let parsed = parse_document(&document.text).map_err(|e| FileError::Yaml {
            source_name: source_name.to_owned(),
            index: index + 1,
            why: e.to_string(),
        })?;
        values.extend(parsed);
    }
    Ok(values)
}

pub fn read_file(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|error| FileError::Read { path: path.to_owned(), error })
}

/// Reads `--policy-file`: TokenProxyPolicy documents only, each checked, names unique.
pub fn load_policies(path: &Path) -> Result<Vec<Policy>, FileError> {
    let source_name = path.display().to_string();
    let values = parse_stream(&read_file(path)?, &source_name)?;
    policies_from(values.iter().enumerate().map(|(i, v)| (i + 1, v)), &source_name, true)
}

/// Checks the TokenProxyPolicy documents among `documents`. With `only_policies`, any other
/// kind is an error.
pub fn policies_from<'a>(
    documents: impl IntoIterator<Item = (usize, &'a Value)>,
    source_name: &str,
    only_policies: bool,
) -> Result<Vec<Policy>, FileError> {
    let mut policies: Vec<Policy> = Vec::new();
    for (index, value) in documents {
        let error = |why: String| FileError::Document { source_name: source_name.to_owned(), index, why };
        if value["kind"].as_str() != Some(policy::KIND) {
            if only_policies {
                return Err(error(format!(
                    "kind {} is not {}: a policy file holds TokenProxyPolicy documents only",
                    value["kind"],
                    policy::KIND
                )));
            }
            continue;
        }
        if value["apiVersion"].as_str() != Some(policy::API_VERSION) {
            return Err(error(format!(
                "apiVersion {} is not {}: write apiVersion: {}",
                value["apiVersion"],
                policy::API_VERSION,
                policy::API_VERSION
            )));
        }
        if let Some(spec) = value["spec"].as_object() {
            if let Some(unknown) = spec.keys().find(|k| !policy::SPEC_FIELDS.contains(&k.as_str())) {
                return Err(error(format!(
                    "spec.{unknown} is not a TokenProxyPolicy field: the fields are {}",
                    policy::SPEC_FIELDS.join(", ")
                )));
            }
        }
        let object: TokenProxyPolicy =
            serde_json::from_value(value.clone()).map_err(|e| error(format!("TokenProxyPolicy: {e}")))?;
        let checked = Policy::new(&object).map_err(|e| error(e.to_string()))?;
        if policies.iter().any(|p| p.name == checked.name) {
            return Err(error(format!("policy {:?} is defined twice: give each policy its own name", checked.name)));
        }
        policies.push(checked);
    }
    Ok(policies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_every_byte() {
        let text = "# lead\na: 1\n---\nb: |\n  ---\n  x\n--- # second\nc: 3\n---\n";
        let docs = split_documents(text);
        let joined: String = docs.iter().map(|d| format!("{}{}", d.separator, d.text)).collect();
        assert_eq!(joined, text);
        assert_eq!(docs.len(), 4);
        assert_eq!(docs[1].text, "b: |\n  ---\n  x\n");
        assert_eq!(parse_document(&docs[3].text).expect("empty is fine"), None);
    }

    #[test]
    fn policy_files_name_the_document() {
        let text = "apiVersion: wiproxy.io/v1alpha1\nkind: TokenProxyPolicy\nmetadata: {name: a}\nspec: {namespaceSelector: {}}\n---\nkind: ConfigMap\n";
        let values = parse_stream(text, "p.yaml").expect("yaml");
        let err = policies_from(values.iter().enumerate().map(|(i, v)| (i + 1, v)), "p.yaml", true)
            .expect_err("a ConfigMap is not a policy")
            .to_string();
        assert!(err.starts_with("p.yaml: document 2: kind"), "{err}");
        let typo = "apiVersion: wiproxy.io/v1alpha1\nkind: TokenProxyPolicy\nmetadata: {name: a}\nspec: {namespaceSelector: {}, serviceAcounts: []}\n";
        let values = parse_stream(typo, "p.yaml").expect("yaml");
        let err = policies_from(values.iter().enumerate().map(|(i, v)| (i + 1, v)), "p.yaml", true)
            .expect_err("typo")
            .to_string();
        assert!(err.contains("serviceAcounts"), "{err}");
    }
}
