//! Images on disk: an OCI image layout directory (`oci-layout:DIR`), the
//! same as a tar file (`oci-archive:PATH`), and what `docker save` writes
//! (`docker-archive:PATH`).
//!
//! Archives are unpacked into a temporary directory with the same safe
//! unpacker as layers ([`super::layer`]), then read as directories. Every
//! blob is checked against its digest on the way into the [`BlobStore`]:
//! for a layout, the chain index -> manifest -> config and layers; for a
//! Docker archive (whose manifest has no digests), the config against its
//! file name when that is a digest, and each layer against the config's
//! `diff_ids`.

use std::fs;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use super::config::ImageConfig;
use super::layer::{ApplyOptions, apply_layer};
use super::store::{BlobStore, Sha256Digest, digest_of};
use super::{FetchImageError, FetchedImage};

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    #[serde(default, rename = "mediaType")]
    media_type: String,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

fn bad(what: impl Into<String>) -> FetchImageError {
    FetchImageError::Invalid(what.into())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FetchImageError + '_ {
    move |source| FetchImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Picks linux/amd64 among several, else the only one.
fn pick(descriptors: &[Descriptor]) -> Result<&Descriptor, FetchImageError> {
    if let [only] = descriptors {
        return Ok(only);
    }
    descriptors
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .ok_or_else(|| {
            bad(format!(
                "the index lists {} manifests and none for linux/amd64",
                descriptors.len()
            ))
        })
}

/// Reads an OCI image layout directory into the store.
pub fn read_layout(dir: &Path, store: &BlobStore) -> Result<FetchedImage, FetchImageError> {
    if !dir.is_dir() {
        return Err(bad(format!(
            "{} is not a directory (oci-layout:DIR names an OCI image layout directory)",
            dir.display()
        )));
    }
    let index_path = dir.join("index.json");
    if !index_path.is_file() {
        return Err(bad(format!(
            "{} has no index.json, so it is not an OCI image layout (a `docker save` \
             tarball is docker-archive:FILE)",
            dir.display()
        )));
    }
    let index: Index = serde_json::from_slice(&fs::read(&index_path).map_err(io_err(&index_path))?)
        .map_err(|e| bad(format!("{} is not an OCI index: {e}", index_path.display())))?;
    let chosen = pick(&index.manifests)?;
    let (mut media_type, mut digest_text) = (chosen.media_type.clone(), chosen.digest.clone());
    let mut manifest_bytes;
    let mut manifest: Manifest;
    let mut depth = 0;
    loop {
        let digest = Sha256Digest::parse(&digest_text)?;
        let path = store.import_file(&digest, &layout_blob(dir, &digest))?;
        manifest_bytes = fs::read(&path).map_err(io_err(&path))?;
        manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| bad(format!("manifest {digest} is not valid JSON: {e}")))?;
        let is_index = media_type.contains("index")
            || manifest.media_type.contains("index")
            || manifest.media_type.contains("manifest.list");
        if !is_index {
            break;
        }
        depth += 1;
        if depth > 4 {
            return Err(bad("image indexes nest too deep"));
        }
        let nested = pick(&manifest.manifests)?;
        (media_type, digest_text) = (nested.media_type.clone(), nested.digest.clone());
    }
    let manifest_digest = Sha256Digest::of(&manifest_bytes);
    let config = manifest
        .config
        .ok_or_else(|| bad("the image manifest has no config"))?;
    let config_digest = Sha256Digest::parse(&config.digest)?;
    let config_path = store.import_file(&config_digest, &layout_blob(dir, &config_digest))?;
    let config_bytes = fs::read(&config_path).map_err(io_err(&config_path))?;
    let image_config = ImageConfig::parse(&config_bytes)?;
    let mut layers = Vec::new();
    for layer in &manifest.layers {
        let digest = Sha256Digest::parse(&layer.digest)?;
        layers.push(store.import_file(&digest, &layout_blob(dir, &digest))?);
    }
    Ok(FetchedImage {
        config: image_config,
        layers,
        digest: Some(manifest_digest.to_string()),
    })
}

fn layout_blob(dir: &Path, digest: &Sha256Digest) -> PathBuf {
    dir.join("blobs").join("sha256").join(digest.hex())
}

/// Unpacks a tar archive (an OCI or Docker archive) into `dest`.
pub fn unpack_archive(archive: &Path, dest: &Path) -> Result<(), FetchImageError> {
    let file = fs::File::open(archive).map_err(io_err(archive))?;
    apply_layer(dest, file, ApplyOptions { keep_owners: false })
        .map(drop)
        .map_err(|source| FetchImageError::Archive {
            path: archive.to_owned(),
            source,
        })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
}

/// A path inside an unpacked archive, as its manifest names it.
fn inside(dir: &Path, rel: &str) -> Result<PathBuf, FetchImageError> {
    let path = Path::new(rel);
    if path
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(bad(format!(
            "the archive's manifest names {rel:?}, which is not a path inside the archive"
        )));
    }
    Ok(dir.join(path))
}

/// A digest from a `docker save` file name (`<hex>.json`,
/// `blobs/sha256/<hex>`, `<hex>/layer.tar`), if it has one.
fn digest_in_name(rel: &str) -> Option<Sha256Digest> {
    let path = Path::new(rel);
    let stem = path.file_stem()?.to_str()?;
    let candidate = if path.parent().and_then(Path::file_name) == Some("sha256".as_ref()) {
        path.file_name()?.to_str()?
    } else {
        stem
    };
    Sha256Digest::parse(&format!("sha256:{candidate}")).ok()
}

/// Reads an unpacked `docker save` archive into the store.
pub fn read_docker_archive(dir: &Path, store: &BlobStore) -> Result<FetchedImage, FetchImageError> {
    let manifest_path = dir.join("manifest.json");
    let entries: Vec<DockerManifestEntry> =
        serde_json::from_slice(&fs::read(&manifest_path).map_err(io_err(&manifest_path))?)
            .map_err(|e| {
                bad(format!(
                    "manifest.json of the docker archive is not valid: {e}"
                ))
            })?;
    let entry = match entries.as_slice() {
        [one] => one,
        [] => return Err(bad("the docker archive holds no image")),
        more => {
            return Err(bad(format!(
                "the docker archive holds {} images; save one image per archive",
                more.len()
            )));
        }
    };
    let config_path = inside(dir, &entry.config)?;
    let config_bytes = fs::read(&config_path).map_err(io_err(&config_path))?;
    if let Some(named) = digest_in_name(&entry.config) {
        let actual = Sha256Digest::of(&config_bytes);
        if actual != named {
            return Err(bad(format!(
                "the archive's config {} does not match its digest (got {actual})",
                entry.config
            )));
        }
    }
    let image_config = ImageConfig::parse(&config_bytes)?;
    let diff_ids = image_config.diff_ids().to_vec();
    if diff_ids.len() != entry.layers.len() {
        return Err(bad(format!(
            "the archive lists {} layers but its config {} diff_ids",
            entry.layers.len(),
            diff_ids.len()
        )));
    }
    let mut layers = Vec::new();
    for (rel, diff_id) in entry.layers.iter().zip(&diff_ids) {
        let path = inside(dir, rel)?;
        let expected = Sha256Digest::parse(diff_id)?;
        let actual = uncompressed_digest(&path)?;
        if actual != expected {
            return Err(bad(format!(
                "layer {rel} does not match its diff_id {expected} (got {actual})"
            )));
        }
        let file_digest =
            digest_of(fs::File::open(&path).map_err(io_err(&path))?).map_err(io_err(&path))?;
        layers.push(store.import_file(&file_digest, &path)?);
    }
    Ok(FetchedImage {
        config: image_config,
        layers,
        digest: None,
    })
}

/// The digest of a layer's uncompressed tar (gunzipped if gzip).
fn uncompressed_digest(path: &Path) -> Result<Sha256Digest, FetchImageError> {
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).map_err(io_err(path))?;
    let file = fs::File::open(path).map_err(io_err(path))?;
    if n == 2 && magic == [0x1f, 0x8b] {
        digest_of(flate2::read::GzDecoder::new(file)).map_err(io_err(path))
    } else {
        digest_of(file).map_err(io_err(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_archive_names_carry_digests() {
        let hex = "a".repeat(64);
        assert_eq!(
            digest_in_name(&format!("{hex}.json")).unwrap().hex(),
            hex.as_str()
        );
        assert_eq!(
            digest_in_name(&format!("blobs/sha256/{hex}"))
                .unwrap()
                .hex(),
            hex.as_str()
        );
        assert!(digest_in_name("config.json").is_none());
    }

    #[test]
    fn manifest_paths_stay_inside_the_archive() {
        let dir = Path::new("/x");
        assert!(inside(dir, "../etc/passwd").is_err());
        assert!(inside(dir, "/etc/passwd").is_err());
        assert_eq!(inside(dir, "a/layer.tar").unwrap(), dir.join("a/layer.tar"));
    }
}
