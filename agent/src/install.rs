//! Installing the CNI plugin binary and the network conflist on the node.
//!
//! Both are written atomically (temporary file in the target directory,
//! fsync, rename) and only when their content differs, so a container
//! runtime that watches /etc/cni/net.d never sees a half-written file and
//! an agent restart does not touch either.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The plugin's file name in the CNI bin dir (`"type": "weft"`).
pub const PLUGIN_NAME: &str = "weft";

/// The conflist's file name; `10-` sorts it before most other networks, as
/// runtimes use the first file in lexical order.
pub const CONFLIST_NAME: &str = "10-weft.conflist";

/// What an install call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// The file was written.
    Written,
    /// The file already had this content.
    Unchanged,
}

/// Why an install failed, naming the file.
#[derive(Debug, thiserror::Error)]
#[error(
    "installing {path}: {source} (check that the directory exists and is writable by the agent)"
)]
pub struct InstallError {
    /// The file being read or written.
    pub path: PathBuf,
    /// The underlying error.
    pub source: io::Error,
}

/// The network configuration list for container runtimes.
pub fn render_conflist(node_file: &Path) -> String {
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "weft",
        "plugins": [
            {
                "type": PLUGIN_NAME,
                "nodeFile": node_file,
                // The runtime passes each pod's hostPorts as
                // runtimeConfig.portMappings; the plugin maps them.
                "capabilities": { "portMappings": true },
            }
        ]
    });
    let mut text = serde_json::to_string_pretty(&conflist).expect("JSON values always serialize");
    text.push('\n');
    text
}

/// Copies the plugin binary from `source` to `<bin_dir>/weft` (mode 0755)
/// unless the installed copy is identical.
pub fn install_plugin(source: &Path, bin_dir: &Path) -> Result<Installed, InstallError> {
    let content = fs::read(source).map_err(|source_error| InstallError {
        path: source.to_path_buf(),
        source: source_error,
    })?;
    write_if_changed(&bin_dir.join(PLUGIN_NAME), &content, 0o755)
}

/// Writes the conflist into `conf_dir` unless it already has this content.
pub fn install_conflist(conf_dir: &Path, conflist: &str) -> Result<Installed, InstallError> {
    write_if_changed(&conf_dir.join(CONFLIST_NAME), conflist.as_bytes(), 0o644)
}

fn write_if_changed(path: &Path, content: &[u8], mode: u32) -> Result<Installed, InstallError> {
    let error = |source| InstallError {
        path: path.to_path_buf(),
        source,
    };
    if fs::read(path).is_ok_and(|present| present == content) {
        return Ok(Installed::Unchanged);
    }
    let directory = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(directory).map_err(error)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    // A dot-prefixed name without the .conflist/.conf suffix, so runtimes
    // scanning the directory ignore the temporary file.
    let temporary = directory.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = fs::File::create(&temporary)?;
        file.write_all(content)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&temporary, path)?;
        fs::File::open(directory)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written.map_err(error)?;
    Ok(Installed::Written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_once_then_leaves_files_alone() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("weft-build");
        fs::write(&source, b"\x7fELF plugin").unwrap();
        let bin = dir.path().join("bin");
        let conf = dir.path().join("net.d");

        assert_eq!(install_plugin(&source, &bin).unwrap(), Installed::Written);
        assert_eq!(install_plugin(&source, &bin).unwrap(), Installed::Unchanged);
        let installed = bin.join("weft");
        assert_eq!(fs::read(&installed).unwrap(), b"\x7fELF plugin");
        assert_eq!(
            fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
            0o755
        );

        let conflist = render_conflist(Path::new("/run/weft/node.json"));
        assert_eq!(
            install_conflist(&conf, &conflist).unwrap(),
            Installed::Written
        );
        assert_eq!(
            install_conflist(&conf, &conflist).unwrap(),
            Installed::Unchanged
        );
        fs::write(&source, b"\x7fELF plugin v2").unwrap();
        assert_eq!(install_plugin(&source, &bin).unwrap(), Installed::Written);

        let names: Vec<_> = fs::read_dir(&conf)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(CONFLIST_NAME)]);
    }

    #[test]
    fn conflist_names_the_plugin_and_node_file() {
        let value: serde_json::Value =
            serde_json::from_str(&render_conflist(Path::new("/tmp/n.json"))).unwrap();
        assert_eq!(value["name"], "weft");
        assert_eq!(value["plugins"][0]["type"], "weft");
        assert_eq!(value["plugins"][0]["nodeFile"], "/tmp/n.json");
        assert_eq!(value["plugins"][0]["capabilities"]["portMappings"], true);
    }

    #[test]
    fn missing_source_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let error = install_plugin(&dir.path().join("nope"), dir.path()).unwrap_err();
        assert!(error.to_string().contains("nope"), "{error}");
    }
}
