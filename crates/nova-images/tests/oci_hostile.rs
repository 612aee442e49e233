//! Hostile images are refused whole (issue 16): an OCI layout whose second
//! layer tries a path traversal, an absolute path, a symlink escaping the
//! root then a write through it, or a whiteout naming `..` fails
//! `build_from_image` with an error naming the entry; nothing is written
//! beside the build directory (a canary directory stays empty) and no
//! template is installed. No VM, registry or kernel is needed: the build
//! fails while applying layers.

#![allow(clippy::unwrap_used, reason = "test code")]

use std::path::Path;

use nova_core::home::NovaHome;
use nova_images::BuildOptions;
use nova_images::image_template::{BuildFromImageError, ImageBuildOptions, build_from_image};
use nova_images::oci::ImageSource;
use nova_images::oci::layer::ApplyLayerError;
use sha2::{Digest as _, Sha256};

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tar entry with a raw name (the tar crate refuses to write `..`).
fn raw_entry(
    builder: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    name: &str,
    link: &str,
    data: &[u8],
) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_cksum();
    builder.append(&header, data).unwrap();
}

/// A layer's entries: kind, name, link target.
type Entries<'a> = Vec<(tar::EntryType, &'a str, &'a str)>;

fn layer(entries: &[(tar::EntryType, &str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (kind, name, link) in entries {
        let data: &[u8] = if *kind == tar::EntryType::Regular {
            b"pwned"
        } else {
            b""
        };
        raw_entry(&mut builder, *kind, name, link, data);
    }
    builder.into_inner().unwrap()
}

/// Writes an OCI layout of `layers` to `dir`.
fn write_layout(dir: &Path, layers: &[Vec<u8>]) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let put = |bytes: &[u8], media: &str| {
        std::fs::write(dir.join("blobs/sha256").join(hex(bytes)), bytes).unwrap();
        serde_json::json!({"mediaType": media, "digest": format!("sha256:{}", hex(bytes)), "size": bytes.len()})
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| format!("sha256:{}", hex(l))).collect::<Vec<_>>()}
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "config": put(&config, "application/vnd.oci.image.config.v1+json"),
        "layers": layers.iter().map(|l| put(l, "application/vnd.oci.image.layer.v1.tar")).collect::<Vec<_>>(),
    }))
    .unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [put(&manifest, "application/vnd.oci.image.manifest.v1+json")]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

#[tokio::test]
async fn hostile_layers_are_refused_naming_the_entry() {
    use tar::EntryType::{Regular, Symlink};
    let cases: Vec<(&str, Entries<'_>, &str)> = vec![
        (
            "path traversal",
            vec![(Regular, "../../../canary/pwned", "")],
            "../../../canary/pwned",
        ),
        (
            "absolute path",
            vec![(Regular, "/canary/pwned", "")],
            "/canary/pwned",
        ),
        (
            "symlink escaping the root",
            vec![(Symlink, "escape", "../../../../../../../canary")],
            "escape",
        ),
        (
            "whiteout naming ..",
            vec![(Regular, "etc/.wh...", "")],
            "etc/.wh...",
        ),
    ];
    for (what, entries, named) in cases {
        let work = tempfile::tempdir().unwrap();
        let canary = work.path().join("canary");
        std::fs::create_dir_all(&canary).unwrap();
        let base = layer(&[(Regular, "etc/hostname", "")]);
        let layout = work.path().join("layout");
        write_layout(&layout, &[base, layer(&entries)]);
        let home = NovaHome::at(work.path().join("home"));
        let mut build = BuildOptions::new(home.clone());
        build.measure_boot = false;
        let opts = ImageBuildOptions::new(build);
        let err = build_from_image("hostile", &ImageSource::OciLayout(layout), &opts)
            .await
            .unwrap_err();
        match &err {
            BuildFromImageError::Unpack(unpack) => match &unpack.source {
                ApplyLayerError::Unsafe { entry, .. } => {
                    assert_eq!(entry, named, "{what}: {err}");
                    assert_eq!(unpack.index, 2, "{what}");
                }
                other => panic!("{what}: expected a refusal, got {other:?}"),
            },
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
        let chain = format!(
            "{err}: {}",
            std::error::Error::source(&err)
                .map(|s| s.to_string())
                .unwrap_or_default()
        );
        assert!(chain.contains("layer 2"), "{what}: {chain}");
        assert_eq!(
            std::fs::read_dir(&canary).unwrap().count(),
            0,
            "{what}: something was written outside the build directory"
        );
        assert!(!home.template_dir("hostile").exists(), "{what}");
    }
}

#[tokio::test]
async fn a_symlink_escape_planted_by_one_layer_cannot_be_written_through_by_the_next() {
    use tar::EntryType::{Regular, Symlink};
    // An absolute symlink is fine (it points inside the guest's root)...
    let work = tempfile::tempdir().unwrap();
    let canary = work.path().join("canary");
    std::fs::create_dir_all(&canary).unwrap();
    let target = canary.to_str().unwrap().to_owned();
    let layout = work.path().join("layout");
    write_layout(
        &layout,
        &[
            layer(&[(Symlink, "link", target.as_str())]),
            layer(&[(Regular, "link/pwned", "")]),
        ],
    );
    let home = NovaHome::at(work.path().join("home"));
    let mut build = BuildOptions::new(home.clone());
    build.measure_boot = false;
    build.agent = work.path().join("no-agent");
    let opts = ImageBuildOptions::new(build);
    let err = build_from_image("t", &ImageSource::OciLayout(layout), &opts)
        .await
        .unwrap_err();
    // ...so the layers apply and the build stops later, at the missing agent,
    // with nothing written to the host path the symlink names.
    assert!(
        matches!(err, BuildFromImageError::Install(_)),
        "expected the missing agent, got {err:?}"
    );
    assert_eq!(std::fs::read_dir(&canary).unwrap().count(), 0);
}
