//! Container images without a registry: `e2e/images.yaml` says what each image holds; this
//! module builds them as Docker archives (one layer each, `manifest.json` with `RepoTags`)
//! and imports them into a node's containerd. An archive is rebuilt, and imported again,
//! only when what it is built from changes (the key is the image's entry plus the size and
//! modification time of every file it copies).
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The image's default user when the entry names none: non-root, as the restricted Pod
/// Security Standard wants.
pub const NONROOT: u32 = 65532;

#[derive(Debug, Deserialize)]
struct ImagesFile {
    images: BTreeMap<String, ImageEntry>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct ImageEntry {
    /// A program of this workspace, found under target/{release,debug}.
    #[serde(default)]
    pub binary: Option<String>,
    /// A program installed on this machine, by path.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// With `path`: busybox, whose applets become links to it.
    #[serde(default)]
    pub applets: bool,
    /// No program: the merged-/usr links only, for pods that mount the host's /usr.
    #[serde(default)]
    pub host: bool,
    /// The pause program for pod sandboxes.
    #[serde(default)]
    pub pause: bool,
    /// Entrypoint arguments after the program; `{tag}` is the image tag.
    #[serde(default)]
    pub args: Vec<String>,
    /// USER of the image (default [`NONROOT`]).
    #[serde(default)]
    pub user: Option<u32>,
    pub tags: Vec<String>,
}

/// The image map of `e2e/images.yaml`.
#[derive(Clone, Debug)]
pub struct ImageMap {
    pub entries: BTreeMap<String, ImageEntry>,
}

impl ImageMap {
    pub fn load(file: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the image map {}", file.display()))?;
        Self::parse(&text).with_context(|| format!("parsing {}", file.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let parsed: ImagesFile = serde_yaml::from_str(text)?;
        for (repo, e) in &parsed.images {
            let kinds = [e.binary.is_some(), e.path.is_some(), e.host, e.pause];
            if kinds.iter().filter(|k| **k).count() != 1 {
                bail!("image {repo}: give exactly one of binary, path, host, pause");
            }
            if e.tags.is_empty() {
                bail!("image {repo}: no tags");
            }
        }
        Ok(ImageMap {
            entries: parsed.images,
        })
    }

    /// Every `repo:tag` the map defines.
    pub fn references(&self) -> Vec<String> {
        self.entries
            .iter()
            .flat_map(|(repo, e)| e.tags.iter().map(move |t| format!("{repo}:{t}")))
            .collect()
    }
}

/// The newest build of a workspace binary.
pub fn find_binary(repo: &Path, name: &str) -> anyhow::Result<PathBuf> {
    ["release", "debug"]
        .map(|p| repo.join("target").join(p).join(name))
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p.clone())))
        .max()
        .map(|(_, p)| p)
        .with_context(|| {
            format!(
                "{name} is not built (looked in target/release and target/debug); run `cargo build --bins`"
            )
        })
}

/// Shared libraries a dynamically linked program loads, as `ldd` lists them (none for a
/// static one).
fn shared_libraries(program: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .context("running ldd (package libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(parse_ldd(&text))
}

/// Paths in `ldd` output: `name => /path (addr)` and `/path (addr)` lines.
pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => l,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// One file or link of an image's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootEntry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        from: FileSource,
    },
    Link {
        path: String,
        target: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSource {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

/// What an image's root holds (pure, apart from `ldd` and the applet list).
pub fn root_entries(
    entry: &ImageEntry,
    program: Option<&Path>,
) -> anyhow::Result<(Vec<RootEntry>, Vec<String>)> {
    let mut out = vec![
        RootEntry::Dir {
            path: "etc".into(),
            mode: 0o755,
        },
        RootEntry::Dir {
            path: "tmp".into(),
            mode: 0o1777,
        },
        RootEntry::File {
            path: "etc/passwd".into(),
            mode: 0o644,
            from: FileSource::Bytes(
                format!("root:x:0:0:root:/root:/bin/sh\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/tmp:/sbin/nologin\n")
                    .into_bytes(),
            ),
        },
        RootEntry::File {
            path: "etc/group".into(),
            mode: 0o644,
            from: FileSource::Bytes(format!("root:x:0:\nnonroot:x:{NONROOT}:\n").into_bytes()),
        },
    ];
    let mut entrypoint = Vec::new();
    if entry.host {
        for (link, target) in [
            ("bin", "usr/bin"),
            ("sbin", "usr/sbin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            out.push(RootEntry::Link {
                path: link.into(),
                target: target.into(),
            });
        }
        out.push(RootEntry::Dir {
            path: "usr".into(),
            mode: 0o755,
        });
        return Ok((out, entrypoint));
    }
    let program = program.context("an image with a program needs its path")?;
    let name = program
        .file_name()
        .and_then(|n| n.to_str())
        .context("program without a file name")?;
    let dest = if entry.pause || entry.applets {
        format!("bin/{name}")
    } else {
        format!("usr/local/bin/{name}")
    };
    out.push(RootEntry::File {
        path: dest.clone(),
        mode: 0o755,
        from: FileSource::Host(program.to_path_buf()),
    });
    for lib in shared_libraries(program)? {
        let rel = lib.strip_prefix("/").unwrap_or(&lib).display().to_string();
        out.push(RootEntry::File {
            path: rel,
            mode: 0o755,
            from: FileSource::Host(lib),
        });
    }
    if entry.applets {
        let list = Command::new(program).arg("--list").output()?;
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if !applet.is_empty() && applet != name {
                out.push(RootEntry::Link {
                    path: format!("bin/{applet}"),
                    target: name.to_string(),
                });
            }
        }
    }
    // The operator's HTTPS clients may look for the system's CA bundle.
    let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if entry.binary.is_some() && bundle.exists() {
        out.push(RootEntry::File {
            path: "etc/ssl/certs/ca-certificates.crt".into(),
            mode: 0o644,
            from: FileSource::Host(bundle.into()),
        });
    }
    entrypoint.push(format!("/{dest}"));
    Ok((out, entrypoint))
}

/// Writes the layer tar of `entries` (deterministic: fixed times and owners, parents first).
fn layer_tar(entries: &[RootEntry]) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs_done = std::collections::BTreeSet::new();
    let mut ensure_parents = |b: &mut tar::Builder<Vec<u8>>, path: &str| -> anyhow::Result<()> {
        let mut acc = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            if dirs_done.insert(acc.clone()) {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_mtime(0);
                b.append_data(&mut h, format!("{acc}/"), std::io::empty())?;
            }
        }
        Ok(())
    };
    for e in entries {
        match e {
            RootEntry::Dir { path, mode } => {
                ensure_parents(&mut b, path)?;
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                h.set_mtime(0);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            RootEntry::File { path, mode, from } => {
                ensure_parents(&mut b, path)?;
                let data = match from {
                    FileSource::Host(p) => {
                        std::fs::read(p).with_context(|| format!("reading {}", p.display()))?
                    }
                    FileSource::Bytes(b) => b.clone(),
                };
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                h.set_mtime(0);
                b.append_data(&mut h, path, data.as_slice())?;
            }
            RootEntry::Link { path, target } => {
                ensure_parents(&mut b, path)?;
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                h.set_mtime(0);
                b.append_link(&mut h, path, target)?;
            }
        }
    }
    Ok(b.into_inner()?)
}

fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The Docker image config of one tag.
pub fn image_config(entrypoint: &[String], user: u32, layer_digest: &str) -> serde_json::Value {
    serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Entrypoint": entrypoint,
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"],
            "User": format!("{user}:{user}"),
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "sluice-e2e images"}],
    })
}

/// Builds the Docker archive of one image (all its tags) at `out`.
fn write_archive(
    repo: &str,
    entry: &ImageEntry,
    program: Option<&Path>,
    out: &Path,
) -> anyhow::Result<()> {
    let (root, program_argv) = root_entries(entry, program)?;
    let layer = layer_tar(&root)?;
    let layer_digest = sha256_hex(&layer);
    let mut outer = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| -> anyhow::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, name, data)?;
        Ok(())
    };
    let layer_path = format!("{layer_digest}/layer.tar");
    add(&mut outer, &layer_path, &layer)?;
    let mut manifest = Vec::new();
    for tag in &entry.tags {
        let mut argv = program_argv.clone();
        argv.extend(entry.args.iter().map(|a| a.replace("{tag}", tag)));
        let config = serde_json::to_vec(&image_config(
            &argv,
            entry.user.unwrap_or(NONROOT),
            &layer_digest,
        ))?;
        let config_name = format!("{}.json", sha256_hex(&config));
        add(&mut outer, &config_name, &config)?;
        manifest.push(serde_json::json!({
            "Config": config_name,
            "RepoTags": [format!("{repo}:{tag}")],
            "Layers": [layer_path],
        }));
    }
    add(&mut outer, "manifest.json", &serde_json::to_vec(&manifest)?)?;
    let tmp = out.with_extension("tar.tmp");
    std::fs::File::create(&tmp)?.write_all(&outer.into_inner()?)?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// Builds the pause program (static) into `cache` when its source changed.
fn pause_binary(repo_root: &Path, cache: &Path) -> anyhow::Result<PathBuf> {
    let src = repo_root.join("e2e/cluster/pause.c");
    let out = cache.join("pause");
    let stale = match (std::fs::metadata(&src), std::fs::metadata(&out)) {
        (Ok(s), Ok(o)) => s.modified()? > o.modified()?,
        _ => true,
    };
    if stale {
        let status = Command::new("cc")
            .args(["-static", "-O2", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .context("running cc to build the pause program")?;
        anyhow::ensure!(status.success(), "cc failed to build {}", src.display());
    }
    Ok(out)
}

/// The key of an image's archive: its entry and the size and mtime of its program.
fn archive_key(repo: &str, entry: &ImageEntry, program: Option<&Path>) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    h.update(repo.as_bytes());
    h.update(format!("{entry:?}").as_bytes());
    if let Some(p) = program {
        let m = std::fs::metadata(p).with_context(|| format!("{}", p.display()))?;
        h.update(p.display().to_string().as_bytes());
        h.update(m.len().to_le_bytes());
        let mtime = m.modified()?.duration_since(std::time::UNIX_EPOCH)?;
        h.update(mtime.as_nanos().to_le_bytes());
    }
    Ok(h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Builds what changed and imports it into the containerd at `socket` (namespace k8s.io).
/// `cache` keeps the archives and, per socket, what was imported last. Returns the images
/// imported this time.
pub fn sync(
    map: &ImageMap,
    repo_root: &Path,
    cache: &Path,
    socket: &Path,
    ctr: &Path,
) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(cache)?;
    let imported_file = cache.join(format!(
        "imported-{}",
        sha256_hex(socket.display().to_string().as_bytes())
    ));
    let mut imported: BTreeMap<String, String> = std::fs::read_to_string(&imported_file)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    // What containerd holds now: the record alone is not enough, since the kubelet removes
    // images it counts as unused when the disk runs low (its eviction manager does), and
    // a node without its pause image starts no pod at all.
    let present = present_images(ctr, socket)?;
    let mut done = Vec::new();
    for (repo, entry) in &map.entries {
        let program = if let Some(b) = &entry.binary {
            Some(find_binary(repo_root, b)?)
        } else if let Some(p) = &entry.path {
            anyhow::ensure!(p.exists(), "image {repo}: {} is not installed", p.display());
            Some(p.clone())
        } else if entry.pause {
            Some(pause_binary(repo_root, cache)?)
        } else {
            None
        };
        let key = archive_key(repo, entry, program.as_deref())?;
        let archive = cache.join(format!("{}-{key}.tar", repo.replace('/', "_")));
        if !archive.exists() {
            // Old archives of this image go.
            let prefix = format!("{}-", repo.replace('/', "_"));
            for old in std::fs::read_dir(cache)?.flatten() {
                if old.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(old.path());
                }
            }
            write_archive(repo, entry, program.as_deref(), &archive)
                .with_context(|| format!("building image {repo}"))?;
        }
        let all_present = entry.tags.iter().all(|tag| holds(&present, repo, tag));
        if imported.get(repo) == Some(&key) && all_present {
            continue;
        }
        let out = Command::new(ctr)
            .arg("--address")
            .arg(socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(&archive)
            .output()
            .context("running ctr (package containerd)")?;
        if !out.status.success() {
            bail!(
                "importing {} failed: {}",
                archive.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        imported.insert(repo.clone(), key);
        std::fs::write(&imported_file, serde_json::to_vec(&imported)?)?;
        done.push(repo.clone());
    }
    Ok(done)
}

/// The image references the containerd at `socket` holds (namespace k8s.io).
fn present_images(ctr: &Path, socket: &Path) -> anyhow::Result<BTreeSet<String>> {
    let out = Command::new(ctr)
        .arg("--address")
        .arg(socket)
        .args(["-n", "k8s.io", "images", "ls", "-q"])
        .output()
        .context("running ctr (package containerd)")?;
    if !out.status.success() {
        bail!(
            "listing the images of {}: {}",
            socket.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// Whether `present` holds `repo:tag`, by its short or its normalised name
/// (`sluice/echo:v1` is `docker.io/sluice/echo:v1` to containerd).
fn holds(present: &BTreeSet<String>, repo: &str, tag: &str) -> bool {
    let short = format!("{repo}:{tag}");
    present.contains(&short) || present.contains(&format!("docker.io/{short}"))
}

/// Forgets what was imported into the containerd at `socket` (its state went with it).
pub fn forget_imports(cache: &Path, socket: &Path) {
    let _ = std::fs::remove_file(cache.join(format!(
        "imported-{}",
        sha256_hex(socket.display().to_string().as_bytes())
    )));
}

/// Forgets every import record (the nodes' containerd roots went).
pub fn forget_all_imports(cache: &Path) {
    if let Ok(rd) = std::fs::read_dir(cache) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("imported-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_counts_as_present_by_its_short_or_normalised_name() {
        let present: BTreeSet<String> = ["docker.io/sluice/echo:v1", "sluice/agent:dev"]
            .into_iter()
            .map(String::from)
            .collect();
        assert!(holds(&present, "sluice/echo", "v1"));
        assert!(holds(&present, "sluice/agent", "dev"));
        assert!(!holds(&present, "sluice/echo", "v2"));
        assert!(!holds(&present, "sluice/pause", "3.10"));
    }

    #[test]
    fn ldd_output_gives_library_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn the_repository_image_map_parses_and_has_the_sandbox_image() {
        let map = ImageMap::load(&crate::cluster::repo_root().join("e2e/images.yaml")).unwrap();
        let refs = map.references();
        for r in [
            "sluice/echo:v1",
            "sluice/echo:v2",
            "sluice/agent:dev",
            "sluice/pause:3.10",
        ] {
            assert!(refs.contains(&r.to_string()), "{r} missing from {refs:?}");
        }
    }

    #[test]
    fn an_entry_must_say_what_it_holds() {
        let err = ImageMap::parse("images:\n  a/b: {tags: [x]}\n").unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");
        let err =
            ImageMap::parse("images:\n  a/b: {binary: x, host: true, tags: [x]}\n").unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");
        assert!(ImageMap::parse("images:\n  a/b: {binary: x, tags: []}\n").is_err());
    }

    #[test]
    fn host_images_link_the_merged_usr_and_run_nothing() {
        let entry = ImageEntry {
            host: true,
            tags: vec!["1".into()],
            ..Default::default()
        };
        let (root, argv) = root_entries(&entry, None).unwrap();
        assert!(argv.is_empty());
        assert!(root.contains(&RootEntry::Link {
            path: "bin".into(),
            target: "usr/bin".into()
        }));
    }

    #[test]
    fn configs_carry_the_tagged_entrypoint_and_a_nonroot_user() {
        let c = image_config(
            &[
                "/usr/local/bin/sluice-echo".into(),
                "--version".into(),
                "v2".into(),
            ],
            NONROOT,
            "ab",
        );
        assert_eq!(c["config"]["User"], "65532:65532");
        assert_eq!(c["config"]["Entrypoint"][2], "v2");
        assert_eq!(c["rootfs"]["diff_ids"][0], "sha256:ab");
    }

    #[test]
    fn layers_are_deterministic_and_list_parents_first() {
        let entries = vec![RootEntry::File {
            path: "a/b/c".into(),
            mode: 0o644,
            from: FileSource::Bytes(b"x".to_vec()),
        }];
        let one = layer_tar(&entries).unwrap();
        assert_eq!(one, layer_tar(&entries).unwrap());
        let mut ar = tar::Archive::new(one.as_slice());
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, vec!["a/", "a/b/", "a/b/c"]);
    }
}
