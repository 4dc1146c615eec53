//! OCI image archives written without a container engine or a registry: one deterministic
//! layer (an uncompressed tar with fixed owners and times), the image config, the manifest
//! and an index, in the OCI image layout, as a tar that `ctr images import` loads.
//!
//! The same inputs give the same bytes (entries sorted by path, mtime 0), so an image's
//! digest only changes when a file in it does.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::json;
use sha2::{Digest, Sha256};

/// One entry of an image's file system (absolute paths inside the image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageEntry {
    /// A directory.
    Dir {
        /// Permission bits, e.g. 0o755.
        mode: u32,
    },
    /// A regular file.
    File {
        /// Permission bits, e.g. 0o755 for a binary.
        mode: u32,
        /// Its contents.
        data: Vec<u8>,
    },
    /// A symbolic link.
    Symlink {
        /// Where it points.
        target: String,
    },
}

/// An image: a single layer and the runtime configuration of the final stage of a
/// Dockerfile (user, entrypoint, environment, exposed ports, labels).
#[derive(Debug, Clone, Default)]
pub struct OciImage {
    /// The full reference containerd stores it under, e.g. `ghcr.io/toolgate/toolgate-proxy:0.1.0`.
    pub name: String,
    /// Path inside the image → entry. Parent directories are added (0o755) when missing.
    pub entries: BTreeMap<String, ImageEntry>,
    /// `USER`, e.g. `65532:65532`; empty means root.
    pub user: String,
    /// `ENTRYPOINT`.
    pub entrypoint: Vec<String>,
    /// `CMD`.
    pub cmd: Vec<String>,
    /// `ENV` as `NAME=value`.
    pub env: Vec<String>,
    /// `WORKDIR`; empty means `/`.
    pub working_dir: String,
    /// `EXPOSE`, e.g. `8443/tcp`.
    pub exposed_ports: Vec<String>,
    /// `LABEL`s.
    pub labels: BTreeMap<String, String>,
}

/// The PATH of Debian-based images (distroless' too).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl OciImage {
    /// An empty image named `name` with the default PATH.
    pub fn new(name: &str) -> Self {
        Self { name: name.to_owned(), env: vec![DEFAULT_PATH.to_owned()], ..Default::default() }
    }

    /// Adds a file with the contents of `source` (symlinks followed) at `path`.
    pub fn add_file_from(&mut self, path: &str, source: &Path, mode: u32) -> Result<()> {
        let data = std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
        self.add(path, ImageEntry::File { mode, data })
    }

    /// Adds an entry; the path must be absolute and normal (no `.`, `..` or `//`).
    pub fn add(&mut self, path: &str, entry: ImageEntry) -> Result<()> {
        let inner = path.strip_prefix('/').with_context(|| format!("image path {path:?} is not absolute"))?;
        if inner.is_empty() || inner.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            bail!("image path {path:?} is not a normal absolute path");
        }
        self.entries.insert(inner.to_owned(), entry);
        Ok(())
    }

    /// Adds the directory tree `source` at `path`: directories, regular files (their
    /// permission bits kept) and symbolic links (kept as links), in a stable order.
    pub fn add_tree(&mut self, path: &str, source: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::symlink_metadata(source).with_context(|| format!("reading {}", source.display()))?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(source).with_context(|| format!("reading link {}", source.display()))?;
            let target = target.to_str().with_context(|| format!("non-UTF-8 link {}", source.display()))?;
            return self.add(path, ImageEntry::Symlink { target: target.to_owned() });
        }
        if meta.is_file() {
            return self.add_file_from(path, source, meta.permissions().mode() & 0o7777);
        }
        self.add(path, ImageEntry::Dir { mode: meta.permissions().mode() & 0o7777 })?;
        let mut children: Vec<_> = std::fs::read_dir(source)
            .with_context(|| format!("listing {}", source.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("listing {}", source.display()))?;
        children.sort();
        for name in children {
            let name_str = name.to_str().with_context(|| format!("non-UTF-8 name in {}", source.display()))?;
            self.add_tree(&format!("{}/{name_str}", path.trim_end_matches('/')), &source.join(&name))?;
        }
        Ok(())
    }

    /// A dynamically linked binary at `path` plus every shared library it loads (and the
    /// dynamic loader), at the paths `ldd` reports, as in a distroless image.
    pub fn add_binary_with_libraries(&mut self, path: &str, binary: &Path) -> Result<()> {
        self.add_file_from(path, binary, 0o755)?;
        for library in shared_libraries(binary)? {
            let source = Path::new(&library).to_owned();
            self.add_file_from(&library, &source, 0o755)?;
        }
        Ok(())
    }

    /// The layer: an uncompressed tar of [`Self::entries`] and their parent directories.
    pub fn layer_tar(&self) -> Result<Vec<u8>> {
        let mut entries: BTreeMap<String, ImageEntry> = self.entries.clone();
        for path in self.entries.keys() {
            let mut parent = path.as_str();
            while let Some((dir, _)) = parent.rsplit_once('/') {
                entries.entry(dir.to_owned()).or_insert(ImageEntry::Dir { mode: 0o755 });
                parent = dir;
            }
        }
        let mut tar = Vec::new();
        for (path, entry) in &entries {
            match entry {
                ImageEntry::Dir { mode } => tar_entry(&mut tar, &format!("{path}/"), b'5', *mode, b"", "")?,
                ImageEntry::File { mode, data } => tar_entry(&mut tar, path, b'0', *mode, data, "")?,
                ImageEntry::Symlink { target } => tar_entry(&mut tar, path, b'2', 0o777, b"", target)?,
            }
        }
        // End of archive: two zero blocks.
        tar.extend_from_slice(&[0; 1024]);
        Ok(tar)
    }

    /// The image config (application/vnd.oci.image.config.v1+json) for a layer digest.
    pub fn config_json(&self, layer_digest: &str) -> serde_json::Value {
        let mut config = serde_json::Map::new();
        if !self.user.is_empty() {
            config.insert("User".into(), json!(self.user));
        }
        if !self.entrypoint.is_empty() {
            config.insert("Entrypoint".into(), json!(self.entrypoint));
        }
        if !self.cmd.is_empty() {
            config.insert("Cmd".into(), json!(self.cmd));
        }
        config.insert("Env".into(), json!(self.env));
        config.insert("WorkingDir".into(), json!(if self.working_dir.is_empty() { "/" } else { &self.working_dir }));
        if !self.exposed_ports.is_empty() {
            let ports: serde_json::Map<String, serde_json::Value> =
                self.exposed_ports.iter().map(|p| (p.clone(), json!({}))).collect();
            config.insert("ExposedPorts".into(), ports.into());
        }
        if !self.labels.is_empty() {
            config.insert("Labels".into(), json!(self.labels));
        }
        json!({
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        })
    }

    /// Writes the image as an OCI image layout tar to `archive` and returns the manifest
    /// digest (`sha256:...`).
    pub fn write_archive(&self, archive: &Path) -> Result<String> {
        let layer = self.layer_tar()?;
        let layer_digest = sha256(&layer);
        let config = serde_json::to_vec(&self.config_json(&layer_digest)).context("image config")?;
        let config_digest = sha256(&config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        }))
        .context("image manifest")?;
        let manifest_digest = sha256(&manifest);
        let tag = self.name.rsplit_once(':').map(|(_, t)| t).filter(|t| !t.contains('/')).unwrap_or("latest");
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest.len(),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    // containerd's importer names the image after this one.
                    "io.containerd.image.name": self.name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        }))
        .context("image index")?;

        let mut out = Vec::new();
        tar_entry(&mut out, "blobs/", b'5', 0o755, b"", "")?;
        tar_entry(&mut out, "blobs/sha256/", b'5', 0o755, b"", "")?;
        for blob in [&config, &layer, &manifest] {
            let digest = sha256(blob);
            let hex = digest.trim_start_matches("sha256:");
            tar_entry(&mut out, &format!("blobs/sha256/{hex}"), b'0', 0o644, blob, "")?;
        }
        tar_entry(&mut out, "index.json", b'0', 0o644, &index, "")?;
        tar_entry(&mut out, "oci-layout", b'0', 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#, "")?;
        out.extend_from_slice(&[0; 1024]);
        std::fs::write(archive, &out).with_context(|| format!("writing {}", archive.display()))?;
        Ok(manifest_digest)
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let mut hex = String::with_capacity(71);
    hex.push_str("sha256:");
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// The shared libraries (and the dynamic loader) that `binary` loads, as absolute paths,
/// from `ldd`. Empty for a static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<String>> {
    let output = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&output.stderr).contains("not a dynamic")
        {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", binary.display(), String::from_utf8_lossy(&output.stderr));
    }
    parse_ldd(&text)
}

fn parse_ldd(text: &str) -> Result<Vec<String>> {
    let mut libraries = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") {
            continue;
        }
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2 (0x...)`,
        // `linux-vdso.so.1 (0x...)` (in the kernel, no file).
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let path = rest.trim().split(' ').next().unwrap_or_default();
                if path == "not" || path.is_empty() {
                    bail!("ldd: {} is not found", name.trim());
                }
                path
            }
            None => line.split(' ').next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libraries.push(path.to_owned());
        }
    }
    libraries.sort();
    libraries.dedup();
    Ok(libraries)
}

/// Appends one ustar entry (header and contents padded to 512 bytes): owner 0:0, mtime 0.
fn tar_entry(out: &mut Vec<u8>, path: &str, kind: u8, mode: u32, data: &[u8], link: &str) -> Result<()> {
    let mut header = [0u8; 512];
    // Long paths go into the ustar prefix field (up to 155 bytes, split at a '/').
    let (prefix, name) = if path.len() <= 100 {
        ("", path)
    } else {
        let split = path[..path.len().min(156)]
            .rfind('/')
            .filter(|&i| path.len() - i - 1 <= 100 && i > 0)
            .with_context(|| format!("path too long for a tar header: {path}"))?;
        (&path[..split], &path[split + 1..])
    };
    if link.len() > 100 {
        bail!("symlink target too long for a tar header: {link}");
    }
    let field = |header: &mut [u8; 512], offset: usize, len: usize, value: &[u8]| {
        header[offset..offset + value.len().min(len)].copy_from_slice(&value[..value.len().min(len)]);
    };
    let octal = |header: &mut [u8; 512], offset: usize, len: usize, value: u64| {
        let text = format!("{value:0width$o}", width = len - 1);
        header[offset..offset + len - 1].copy_from_slice(text.as_bytes());
    };
    field(&mut header, 0, 100, name.as_bytes());
    octal(&mut header, 100, 8, u64::from(mode));
    octal(&mut header, 108, 8, 0);
    octal(&mut header, 116, 8, 0);
    octal(&mut header, 124, 12, data.len() as u64);
    octal(&mut header, 136, 12, 0);
    header[156] = kind;
    field(&mut header, 157, 100, link.as_bytes());
    field(&mut header, 257, 6, b"ustar\0");
    field(&mut header, 263, 2, b"00");
    field(&mut header, 345, 155, prefix.as_bytes());
    // The checksum is computed with its own field as spaces.
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    let text = format!("{sum:06o}\0 ");
    header[148..156].copy_from_slice(text.as_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> OciImage {
        let mut image = OciImage::new("toolgate.local/test:1");
        image.add("/usr/local/bin/tool", ImageEntry::File { mode: 0o755, data: b"#!x\n".to_vec() }).expect("add");
        image.add("/lib64", ImageEntry::Symlink { target: "usr/lib64".into() }).expect("add");
        image.user = "65532:65532".into();
        image.entrypoint = vec!["/usr/local/bin/tool".into()];
        image
    }

    #[test]
    fn archives_are_deterministic_and_tar_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a.tar");
        let b = dir.path().join("b.tar");
        let digest_a = image().write_archive(&a).expect("write");
        let digest_b = image().write_archive(&b).expect("write");
        assert_eq!(digest_a, digest_b);
        assert_eq!(std::fs::read(&a).expect("read"), std::fs::read(&b).expect("read"));
        // GNU tar reads both the archive and the layer in it.
        let list = std::process::Command::new("tar").arg("-tvf").arg(&a).output().expect("tar");
        assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
        let listing = String::from_utf8_lossy(&list.stdout);
        assert!(listing.contains("index.json") && listing.contains("oci-layout"), "{listing}");
        let layer = dir.path().join("layer.tar");
        std::fs::write(&layer, image().layer_tar().expect("layer")).expect("write");
        let list = std::process::Command::new("tar").arg("-tvf").arg(&layer).output().expect("tar");
        let listing = String::from_utf8_lossy(&list.stdout);
        assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
        for expected in [
            "usr/",
            "usr/local/",
            "usr/local/bin/",
            "-rwxr-xr-x 0/0               4 1970-01-01 00:00 usr/local/bin/tool",
            "lib64 -> usr/lib64",
        ] {
            assert!(listing.contains(expected), "{expected:?} missing from:\n{listing}");
        }
    }

    #[test]
    fn long_paths_use_the_prefix_and_bad_paths_are_refused() {
        let mut image = OciImage::new("x:1");
        let long = format!("/{}/{}", "d".repeat(120), "f".repeat(90));
        image.add(&long, ImageEntry::File { mode: 0o644, data: vec![1] }).expect("add");
        let dir = tempfile::tempdir().expect("tempdir");
        let layer = dir.path().join("layer.tar");
        std::fs::write(&layer, image.layer_tar().expect("layer")).expect("write");
        let list = std::process::Command::new("tar").arg("-tf").arg(&layer).output().expect("tar");
        assert!(String::from_utf8_lossy(&list.stdout).contains(&long[1..]));
        for bad in ["relative", "/a/../b", "/a//b", "/"] {
            assert!(image.add(bad, ImageEntry::Dir { mode: 0o755 }).is_err(), "{bad}");
        }
    }

    #[test]
    fn ldd_output_parses() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x7f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            parse_ldd(text).expect("parses"),
            ["/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libgcc_s.so.1", "/lib64/ld-linux-x86-64.so.2"]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }
}
