//! What Weft's packaging tests share: the paths of the chart and the plain
//! manifests, the rendering of the chart (`packaging/render-manifests.sh`),
//! and reading a rendered file back as Kubernetes objects. helm itself
//! (`weft_e2e::build_helm`, `weft_e2e::helm_command`) and kubectl
//! (`weft_e2e::Kubectl`) come from the e2e harness.
//!
//! The tests themselves are in `tests/`: `chart.rs` (golden renders, lint,
//! the config files the components read, RBAC equal to the components' own
//! files), `apiserver.rs` (server-side validation and a helm install against
//! a real kube-apiserver), `image.rs` (the offline image runs) and `docs.rs`
//! (every relative link in the README and `docs/` resolves).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize as _;
use weft_testing::{repository, run};

/// The Helm chart.
pub fn chart_dir() -> PathBuf {
    repository().join("charts/weft")
}

/// The plain manifests, relative to the repository root.
const PLAIN_MANIFESTS: &str = "manifests/weft.yaml";

/// The plain manifests, rendered from the chart with its defaults.
pub fn plain_manifests() -> PathBuf {
    repository().join(PLAIN_MANIFESTS)
}

/// Every rendered file `packaging/render-manifests.sh` writes, relative to
/// its output root: the plain manifests, then one golden file per values
/// file in `charts/weft/tests/`.
pub fn rendered_files() -> Result<Vec<PathBuf>> {
    let tests = chart_dir().join("tests");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&tests)
        .with_context(|| format!("listing {}", tests.display()))?
        .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter_map(|name| {
            name.strip_suffix(".values.yaml")
                .map(|case| PathBuf::from(format!("charts/weft/tests/golden/{case}.yaml")))
        })
        .collect();
    cases.sort();
    let mut files = vec![PathBuf::from(PLAIN_MANIFESTS)];
    files.extend(cases);
    Ok(files)
}

/// Renders the plain manifests and golden files into `out` (see
/// [`rendered_files`]) with `helm`.
pub fn render_into(helm: &Path, out: &Path) -> Result<()> {
    run(
        Command::new(repository().join("packaging/render-manifests.sh"))
            .arg(out)
            .env("HELM", helm),
    )?;
    Ok(())
}

/// The objects of one rendered multi-document YAML file.
#[derive(Debug, Clone)]
pub struct Rendered {
    path: PathBuf,
    objects: Vec<serde_yaml::Value>,
}

impl Rendered {
    /// Reads a rendered file; empty documents (comments only) are skipped.
    pub fn load(path: &Path) -> Result<Rendered> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut objects = Vec::new();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document)
                .with_context(|| format!("parsing {}", path.display()))?;
            if !value.is_null() {
                objects.push(value);
            }
        }
        Ok(Rendered {
            path: path.to_path_buf(),
            objects,
        })
    }

    /// Every object as (kind, namespace, name).
    pub fn identities(&self) -> Vec<(String, Option<String>, String)> {
        self.objects
            .iter()
            .map(|object| {
                let text = |value: &serde_yaml::Value| value.as_str().map(str::to_owned);
                (
                    text(&object["kind"]).unwrap_or_default(),
                    text(&object["metadata"]["namespace"]),
                    text(&object["metadata"]["name"]).unwrap_or_default(),
                )
            })
            .collect()
    }

    /// The object of type `K` named `name` (in any namespace: the chart
    /// names each object of a kind differently).
    pub fn object<K>(&self, name: &str) -> Result<K>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        let value = self
            .objects
            .iter()
            .find(|object| {
                object["kind"].as_str() == Some(K::KIND)
                    && object["metadata"]["name"].as_str() == Some(name)
            })
            .with_context(|| format!("{} has no {} named {name}", self.path.display(), K::KIND))?;
        serde_yaml::from_value(value.clone())
            .with_context(|| format!("{} {name} in {}", K::KIND, self.path.display()))
    }
}
