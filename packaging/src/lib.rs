//! What Weft's packaging tests share: the paths of the chart and the plain
//! manifests, the helm command (built by `packaging/build-helm.sh`), the
//! rendering of the chart (`packaging/render-manifests.sh`), and reading a
//! rendered file back as Kubernetes objects.
//!
//! The tests themselves are in `tests/`: `chart.rs` (golden renders, lint,
//! the config files the components read, RBAC equal to the components' own
//! files), `apiserver.rs` (server-side validation and a helm install against
//! a real kube-apiserver) and `image.rs` (the offline image runs).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize as _;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the packaging crate sits in the repository root")
        .to_path_buf()
}

/// The Helm chart.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/weft")
}

/// The plain manifests, relative to the repository root.
const PLAIN_MANIFESTS: &str = "manifests/weft.yaml";

/// The plain manifests, rendered from the chart with its defaults.
pub fn plain_manifests() -> PathBuf {
    repo_root().join(PLAIN_MANIFESTS)
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

/// Runs a command to completion; fails with its output if it fails.
pub fn run(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("{command:?} printed non-UTF-8"))
}

/// The helm binary, built from its Go module on first use and cached
/// outside the repository.
pub fn helm() -> Result<PathBuf> {
    let script = repo_root().join("packaging/build-helm.sh");
    let path = run(&mut Command::new(&script))?;
    let path = PathBuf::from(path.trim());
    ensure!(
        path.is_file(),
        "{} printed {}, which is not a file",
        script.display(),
        path.display()
    );
    Ok(path)
}

/// A helm command that keeps its caches and settings in `home` rather than
/// the user's home directory.
pub fn helm_command(helm: &Path, home: &Path) -> Command {
    let mut command = Command::new(helm);
    command
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    command
}

/// Renders the plain manifests and golden files into `out` (see
/// [`rendered_files`]) with `helm`.
pub fn render_into(helm: &Path, out: &Path) -> Result<()> {
    run(
        Command::new(repo_root().join("packaging/render-manifests.sh"))
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
