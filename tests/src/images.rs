//! The toolgate images for the test node, read from the Dockerfile itself: the final stage
//! named by `target` (`toolgate-operator`, `toolgate-proxy`) and the stages it builds on
//! give the user, the files copied from the build stage, the exposed ports, the entrypoint
//! and the labels; the binaries are this checkout's release builds (what `make build`
//! produces and the Dockerfile's build stage runs). The distroless base
//! (`gcr.io/distroless/cc-debian12:nonroot`) is stood in for by what a Rust binary needs
//! from it: the binary's shared-library closure, `/etc/passwd` and `/etc/group` with
//! `nonroot` (65532), the CA bundle, `/tmp`, and distroless' environment.
//!
//! An instruction of those stages that this reader does not know fails the build of the
//! image (and the test that keeps the two in step), so the Dockerfile cannot drift from
//! what the node tests run without a test failing.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::oci::{ImageEntry, OciImage};

/// The base image the Dockerfile's runtime stage must use for this stand-in to be faithful.
pub const DISTROLESS_BASE: &str = "gcr.io/distroless/cc-debian12:nonroot";
/// distroless' `nonroot` user.
pub const NONROOT: &str = "65532:65532";
/// Where the CA bundle is in Debian and distroless images.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// One stage of a Dockerfile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stage {
    /// `FROM <base>`.
    pub base: String,
    /// `AS <name>`.
    pub name: String,
    /// `USER`.
    pub user: Option<String>,
    /// `COPY --from=<stage> <source> <destination>`: (source, destination).
    pub copies: Vec<(String, String)>,
    /// `EXPOSE` ports, e.g. `8443`.
    pub exposed: Vec<String>,
    /// `ENTRYPOINT` (exec form).
    pub entrypoint: Option<Vec<String>>,
    /// `LABEL`s.
    pub labels: BTreeMap<String, String>,
    /// Instructions this reader does not interpret (a `RUN` in the build stage is fine;
    /// in a stage an image is made from, it is an error).
    pub other: Vec<String>,
}

/// The stages of a Dockerfile, in order. Handles comments, line continuations, `ARG`
/// defaults in `FROM`, `LABEL k="v" ...` and exec-form `ENTRYPOINT`.
pub fn parse_dockerfile(text: &str) -> Result<Vec<Stage>> {
    let mut args = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    let mut logical = String::new();
    let mut lines = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if logical.is_empty() && (trimmed.starts_with('#') || trimmed.is_empty()) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            logical.push_str(head);
            logical.push(' ');
            continue;
        }
        logical.push_str(trimmed);
        lines.push(std::mem::take(&mut logical));
    }
    for line in lines {
        let (instruction, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let rest = rest.trim();
        match instruction.to_ascii_uppercase().as_str() {
            "ARG" if stages.is_empty() => {
                let (name, value) = rest.split_once('=').unwrap_or((rest, ""));
                args.insert(name.to_owned(), value.to_owned());
            }
            "FROM" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let (base, name) = match words.as_slice() {
                    [base] => (*base, ""),
                    [base, kw, name] if kw.eq_ignore_ascii_case("as") => (*base, *name),
                    _ => bail!("cannot read `FROM {rest}`"),
                };
                let mut base = base.to_owned();
                for (arg, value) in &args {
                    base = base.replace(&format!("${{{arg}}}"), value);
                }
                stages.push(Stage { base, name: name.to_owned(), ..Default::default() });
            }
            other => {
                let stage = stages.last_mut().with_context(|| format!("`{other}` before the first FROM"))?;
                match other {
                    "USER" => stage.user = Some(rest.to_owned()),
                    "EXPOSE" => stage.exposed.extend(rest.split_whitespace().map(str::to_owned)),
                    "ENTRYPOINT" => {
                        let exec: Vec<String> = serde_json::from_str(rest)
                            .with_context(|| format!("ENTRYPOINT must be the exec form (a JSON array): {rest}"))?;
                        stage.entrypoint = Some(exec);
                    }
                    "COPY" => {
                        let words: Vec<&str> = rest.split_whitespace().collect();
                        match words.as_slice() {
                            [from, source, destination] if from.starts_with("--from=") => {
                                stage.copies.push(((*source).to_owned(), (*destination).to_owned()));
                            }
                            _ => stage.other.push(line.clone()),
                        }
                    }
                    "LABEL" => stage.labels.extend(parse_labels(rest)?),
                    _ => stage.other.push(line.clone()),
                }
            }
        }
    }
    Ok(stages)
}

fn parse_labels(text: &str) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=').with_context(|| format!("LABEL without `=`: {rest}"))?;
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"').with_context(|| format!("unterminated LABEL value: {after}"))?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            after.split_once(char::is_whitespace).unwrap_or((after, ""))
        };
        labels.insert(key.trim().to_owned(), value.to_owned());
        rest = remaining.trim_start();
    }
    Ok(labels)
}

/// The chain of stages that makes `target` (the target first, its bases after), failing on
/// anything this reader cannot reproduce.
pub fn final_stage_chain<'a>(stages: &'a [Stage], target: &str) -> Result<Vec<&'a Stage>> {
    let mut chain = Vec::new();
    let mut name = target.to_owned();
    loop {
        let stage =
            stages.iter().find(|s| s.name == name).with_context(|| format!("the Dockerfile has no stage {name:?}"))?;
        if let Some(other) = stage.other.first() {
            bail!("stage {name:?} has an instruction the test images do not reproduce: {other}");
        }
        chain.push(stage);
        if stages.iter().any(|s| s.name == stage.base) {
            name = stage.base.clone();
        } else {
            if stage.base != DISTROLESS_BASE {
                bail!("stage {name:?} builds on {}, the node tests' images stand in for {DISTROLESS_BASE}", stage.base);
            }
            return Ok(chain);
        }
    }
}

/// The image of the Dockerfile's `target` stage named `name`, with the binaries from
/// `release_dir` (`target/release`): a `COPY --from=build /out/<bin> <dest>` takes
/// `release_dir/<bin>`.
pub fn toolgate_image(dockerfile: &str, target: &str, name: &str, release_dir: &Path) -> Result<OciImage> {
    let stages = parse_dockerfile(dockerfile)?;
    let chain = final_stage_chain(&stages, target)?;
    let mut image = OciImage::new(name);
    image.env.push(format!("SSL_CERT_FILE={CA_BUNDLE}"));
    // Base first, so that the target's settings win.
    for stage in chain.iter().rev() {
        if let Some(user) = &stage.user {
            image.user.clone_from(user);
        }
        if let Some(entrypoint) = &stage.entrypoint {
            image.entrypoint.clone_from(entrypoint);
        }
        for port in &stage.exposed {
            image.exposed_ports.push(if port.contains('/') { port.clone() } else { format!("{port}/tcp") });
        }
        image.labels.extend(stage.labels.clone());
        for (source, destination) in &stage.copies {
            let binary = source.rsplit('/').next().unwrap_or(source);
            let path = release_dir.join(binary);
            if !path.is_file() {
                bail!(
                    "{} is missing: build the release binaries first (cargo build --release --locked -p toolgate-operator -p toolgate-proxy -p toolgate)",
                    path.display()
                );
            }
            image.add_binary_with_libraries(destination, &path)?;
        }
    }
    // What distroless' nonroot base provides besides glibc.
    image.add(
        "/etc/passwd",
        ImageEntry::File {
            mode: 0o644,
            data: b"root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n".to_vec(),
        },
    )?;
    image.add(
        "/etc/group",
        ImageEntry::File { mode: 0o644, data: b"root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n".to_vec() },
    )?;
    image.add_file_from(CA_BUNDLE, Path::new(CA_BUNDLE), 0o644)?;
    image.add("/tmp", ImageEntry::Dir { mode: 0o1777 })?;
    image.add("/home/nonroot", ImageEntry::Dir { mode: 0o755 })?;
    Ok(image)
}

/// The example RunPod MCP server's image (examples/runpod-mcp): Debian's `node` with its
/// shared libraries, `examples/runpod-mcp/server.mjs` in `/app`, and as `/app/node_modules`
/// tests/node's installed packages, where `@runpod/mcp-server` is the pinned 4.0.0 (what
/// the example's `npm ci` init container would install from the npm registry, which the
/// test node cannot reach). Runs `node server.mjs` in `/app`.
pub fn runpod_example_image(name: &str, repo: &Path, node_modules: &Path) -> Result<OciImage> {
    let node = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("node")).find(|p| p.is_file()))
        .context("`node` is not on PATH")?;
    let node = node.canonicalize().context("resolving node")?;
    let mut image = OciImage::new(name);
    image.add_binary_with_libraries("/usr/local/bin/node", &node)?;
    image.add_file_from("/app/server.mjs", &repo.join("examples/runpod-mcp/server.mjs"), 0o644)?;
    image.add_tree("/app/node_modules", node_modules)?;
    image.add("/app/node_modules/@runpod/mcp-server", ImageEntry::Symlink { target: "../runpod-mcp-4".into() })?;
    image.add("/tmp", ImageEntry::Dir { mode: 0o1777 })?;
    image.working_dir = "/app".into();
    image.cmd = vec!["node".into(), "server.mjs".into()];
    Ok(image)
}

/// A Redis image for the chart's counter store on the test node: Debian's
/// `/usr/bin/redis-server` (the package `.ci/run` installs) with its shared libraries and
/// an empty `/data`, run as the chart's default non-root user (999:1000) with
/// `counters.redis.command={redis-server}` (the chart's default image is Valkey, which the
/// node cannot pull).
pub fn redis_server_image(name: &str) -> Result<OciImage> {
    let binary = crate::redis::redis_server_binary()?;
    let mut image = OciImage::new(name);
    // Copied under its own name: the Debian binary is a link whose name selects the mode.
    image.add_binary_with_libraries("/usr/bin/redis-server", &binary)?;
    image.add("/data", ImageEntry::Dir { mode: 0o775 })?;
    image.user = "999:1000".into();
    image.working_dir = "/data".into();
    image.entrypoint = vec!["/usr/bin/redis-server".into()];
    image.exposed_ports = vec!["6379/tcp".into()];
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKERFILE: &str = include_str!("../../Dockerfile");

    #[test]
    fn the_dockerfile_final_stages_are_what_the_node_images_reproduce() {
        let stages = parse_dockerfile(DOCKERFILE).expect("parses");
        let operator = final_stage_chain(&stages, "toolgate-operator").expect("operator stage");
        let proxy = final_stage_chain(&stages, "toolgate-proxy").expect("proxy stage");
        assert_eq!(operator[0].entrypoint.as_deref(), Some(&["/usr/local/bin/toolgate-operator".to_owned()][..]));
        assert_eq!(proxy[0].entrypoint.as_deref(), Some(&["/usr/local/bin/toolgate-proxy".to_owned()][..]));
        assert_eq!(operator.last().map(|s| s.base.as_str()), Some(DISTROLESS_BASE));
        assert_eq!(operator.iter().find_map(|s| s.user.clone()).as_deref(), Some(NONROOT));
        assert_eq!(proxy.iter().find_map(|s| s.user.clone()).as_deref(), Some(NONROOT));
        assert_eq!(
            proxy[0].copies,
            [
                ("/out/toolgate-proxy".to_owned(), "/usr/local/bin/toolgate-proxy".to_owned()),
                ("/out/toolgate".to_owned(), "/usr/local/bin/toolgate".to_owned())
            ]
        );
        assert_eq!(operator[0].exposed, ["8443", "8080"]);
        assert_eq!(proxy[0].exposed, ["15080", "15090"]);
        assert_eq!(
            operator[0].labels.get("org.opencontainers.image.title").map(String::as_str),
            Some("toolgate-operator")
        );
    }

    #[test]
    fn stages_the_images_cannot_reproduce_are_refused() {
        let with_run = format!("{DOCKERFILE}\nFROM runtime AS extra\nRUN echo hi\n");
        let stages = parse_dockerfile(&with_run).expect("parses");
        let err = final_stage_chain(&stages, "extra").expect_err("RUN in a final stage");
        assert!(format!("{err:#}").contains("RUN echo hi"), "{err:#}");
        let other_base = DOCKERFILE.replace(DISTROLESS_BASE, "docker.io/library/debian:12");
        let stages = parse_dockerfile(&other_base).expect("parses");
        assert!(final_stage_chain(&stages, "toolgate-proxy").is_err(), "another base image");
        let shell_form = DOCKERFILE
            .replace(r#"ENTRYPOINT ["/usr/local/bin/toolgate-proxy"]"#, "ENTRYPOINT /usr/local/bin/toolgate-proxy");
        assert!(parse_dockerfile(&shell_form).is_err(), "shell-form ENTRYPOINT");
        assert!(final_stage_chain(&stages, "nope").is_err());
    }

    #[test]
    fn labels_parse() {
        let labels = parse_labels(r#"a="x y" b=z c="""#).expect("parses");
        assert_eq!(labels.get("a").map(String::as_str), Some("x y"));
        assert_eq!(labels.get("b").map(String::as_str), Some("z"));
        assert_eq!(labels.get("c").map(String::as_str), Some(""));
    }
}
