//! OCI and Docker images as template sources.
//!
//! ```text
//! ImageSource::parse("127.0.0.1:5000/app:1" | "oci-layout:DIR" | "oci-archive:F" | "docker-archive:F")
//!   -> fetch(): pull (registry, pull.rs) or read (archive.rs), every blob checked
//!      into the BlobStore ($NOVA_HOME/cache/oci/blobs/sha256/<hex>, store.rs)
//!   -> FetchedImage { config (config.rs), layer paths }
//!   -> unpack(): layers applied in order into a tree, safely (layer.rs)
//!   -> crate::image_template: the agent added, mkfs.ext4 -d, template installed
//! ```

pub mod archive;
pub mod config;
pub mod layer;
pub mod pull;
pub mod store;

use std::path::{Path, PathBuf};

use oci_client::Reference;

use self::config::{ImageConfig, ImageConfigError};
use self::layer::{ApplyLayerError, ApplyOptions, apply_layer};
use self::store::{BadDigestError, BlobStore, ImportBlobError};

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A registry reference (`alpine`, `ghcr.io/o/i:tag`, `host:port/i@sha256:...`).
    Registry(Reference),
    /// An OCI image layout directory.
    OciLayout(PathBuf),
    /// An OCI image layout in a tar file.
    OciArchive(PathBuf),
    /// A `docker save` tar file.
    DockerArchive(PathBuf),
}

/// The text does not name an image.
#[derive(Debug, thiserror::Error)]
#[error(
    "{text:?} is not an image reference ({reason}); use a registry reference \
     (e.g. docker.io/library/alpine:3.20), oci-layout:DIR, oci-archive:FILE or docker-archive:FILE"
)]
pub struct ParseImageSourceError {
    /// What was given.
    pub text: String,
    /// Why it does not parse.
    pub reason: String,
}

impl ImageSource {
    /// Parses a `--from` argument.
    pub fn parse(text: &str) -> Result<Self, ParseImageSourceError> {
        let err = |reason: String| ParseImageSourceError {
            text: text.to_owned(),
            reason,
        };
        let path = |p: &str| {
            if p.is_empty() {
                Err(err("the path is empty".into()))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        if let Some(p) = text.strip_prefix("oci-layout:") {
            return Ok(Self::OciLayout(path(p)?));
        }
        if let Some(p) = text.strip_prefix("oci-archive:") {
            return Ok(Self::OciArchive(path(p)?));
        }
        if let Some(p) = text.strip_prefix("docker-archive:") {
            return Ok(Self::DockerArchive(path(p)?));
        }
        let text = text.strip_prefix("docker://").unwrap_or(text);
        text.parse::<Reference>()
            .map(Self::Registry)
            .map_err(|e| err(e.to_string()))
    }
}

impl std::fmt::Display for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Registry(r) => write!(f, "{}", r.whole()),
            Self::OciLayout(p) => write!(f, "oci-layout:{}", p.display()),
            Self::OciArchive(p) => write!(f, "oci-archive:{}", p.display()),
            Self::DockerArchive(p) => write!(f, "docker-archive:{}", p.display()),
        }
    }
}

/// An image whose blobs are in the store.
#[derive(Debug, Clone)]
pub struct FetchedImage {
    /// Its config.
    pub config: ImageConfig,
    /// Its layers in the store, bottom first.
    pub layers: Vec<PathBuf>,
    /// The manifest digest, when the source has one.
    pub digest: Option<String>,
}

/// Fetching an image failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchImageError {
    /// The registry refused or failed.
    #[error("cannot pull {reference} from its registry")]
    Registry {
        /// The reference.
        reference: String,
        /// The client's error.
        #[source]
        source: Box<oci_client::errors::OciDistributionError>,
    },
    /// A blob does not match its digest, or could not be stored.
    #[error(transparent)]
    Blob(#[from] ImportBlobError),
    /// A digest nova cannot check.
    #[error(transparent)]
    Digest(#[from] BadDigestError),
    /// The image config is unusable.
    #[error(transparent)]
    Config(#[from] ImageConfigError),
    /// The image's files are malformed.
    #[error("the image is malformed: {0}")]
    Invalid(String),
    /// An archive could not be unpacked.
    #[error("cannot unpack {path}")]
    Archive {
        /// The archive.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ApplyLayerError,
    },
    /// A file could not be read or written.
    #[error("cannot read or write {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Fetches `source` into the blob store under `cache_root`
/// (`$NOVA_HOME/cache`); `insecure` names registries spoken to in plain
/// HTTP besides loopback ones.
pub async fn fetch(
    source: &ImageSource,
    cache_root: &Path,
    insecure: &[String],
) -> Result<FetchedImage, FetchImageError> {
    let store = BlobStore::new(cache_root);
    match source {
        ImageSource::Registry(reference) => pull::pull(reference, &store, insecure).await,
        ImageSource::OciLayout(dir) => {
            let (dir, store) = (dir.clone(), store.clone());
            blocking(move || archive::read_layout(&dir, &store)).await
        }
        ImageSource::OciArchive(file) | ImageSource::DockerArchive(file) => {
            let docker = matches!(source, ImageSource::DockerArchive(_));
            let (file, store, cache_root) = (file.clone(), store.clone(), cache_root.to_owned());
            blocking(move || {
                if !file.is_file() {
                    return Err(FetchImageError::Invalid(format!(
                        "{} does not exist or is not a file",
                        file.display()
                    )));
                }
                let scratch_parent = cache_root.join("oci");
                std::fs::create_dir_all(&scratch_parent).map_err(|source| FetchImageError::Io {
                    path: scratch_parent.clone(),
                    source,
                })?;
                let scratch = tempfile::tempdir_in(&scratch_parent).map_err(|source| {
                    FetchImageError::Io {
                        path: scratch_parent.clone(),
                        source,
                    }
                })?;
                archive::unpack_archive(&file, scratch.path())?;
                // Name the user's file, not the scratch directory, when the
                // archive is of the other kind (or of neither).
                let (marker, kind, other) = if docker {
                    (
                        "manifest.json",
                        "docker-archive",
                        "an OCI archive is oci-archive:FILE",
                    )
                } else {
                    (
                        "index.json",
                        "OCI archive",
                        "a `docker save` tarball is docker-archive:FILE",
                    )
                };
                if !scratch.path().join(marker).is_file() {
                    return Err(FetchImageError::Invalid(format!(
                        "{} has no {marker} at its root, so it is not a {kind} ({other})",
                        file.display()
                    )));
                }
                if docker {
                    archive::read_docker_archive(scratch.path(), &store)
                } else {
                    archive::read_layout(scratch.path(), &store)
                }
            })
            .await
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FetchImageError> + Send + 'static,
) -> Result<T, FetchImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FetchImageError::Invalid(format!("the image reader stopped: {e}")))?
}

/// Applying a fetched image's layers failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot apply layer {index} ({path}) of the image")]
pub struct UnpackImageError {
    /// The layer's position, bottom = 1.
    pub index: usize,
    /// Its blob.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: ApplyLayerError,
}

/// Applies `image`'s layers, bottom first, into `tree` (created if
/// missing); owners are kept when running as root.
pub fn unpack(image: &FetchedImage, tree: &Path) -> Result<(), UnpackImageError> {
    for (i, path) in image.layers.iter().enumerate() {
        let wrap = |source| UnpackImageError {
            index: i + 1,
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(tree).map_err(|e| {
            wrap(ApplyLayerError::Io {
                entry: String::new(),
                path: tree.to_owned(),
                source: e,
            })
        })?;
        let file = std::fs::File::open(path).map_err(|e| {
            wrap(ApplyLayerError::Io {
                entry: String::new(),
                path: path.clone(),
                source: e,
            })
        })?;
        let stats = apply_layer(tree, file, ApplyOptions::default()).map_err(wrap)?;
        tracing::debug!(layer = i + 1, ?stats, "layer applied");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A missing layout, a missing archive and an archive of the other kind
    /// are named as the user wrote them, not as a scratch directory.
    #[tokio::test]
    async fn local_sources_that_are_not_images_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let message = |source: ImageSource| {
            let cache = cache.clone();
            async move { fetch(&source, &cache, &[]).await.unwrap_err().to_string() }
        };
        let missing = dir.path().join("missing");
        let e = message(ImageSource::OciLayout(missing.clone())).await;
        assert!(e.contains("is not a directory"), "{e}");
        let e = message(ImageSource::DockerArchive(missing.clone())).await;
        assert!(e.contains("does not exist or is not a file"), "{e}");

        let tarball = dir.path().join("other.tar");
        let mut builder = tar::Builder::new(std::fs::File::create(&tarball).unwrap());
        let mut header = tar::Header::new_gnu();
        header.set_size(2);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, "manifest.json", &b"[]"[..])
            .unwrap();
        builder.finish().unwrap();
        drop(builder);
        let e = message(ImageSource::OciArchive(tarball.clone())).await;
        assert!(
            e.contains(&format!("{} has no index.json", tarball.display())),
            "{e}"
        );
    }

    #[test]
    fn sources_parse_by_prefix() {
        assert_eq!(
            ImageSource::parse("oci-layout:/x").unwrap(),
            ImageSource::OciLayout("/x".into())
        );
        assert_eq!(
            ImageSource::parse("docker-archive:img.tar").unwrap(),
            ImageSource::DockerArchive("img.tar".into())
        );
        let ImageSource::Registry(r) = ImageSource::parse("127.0.0.1:5000/test:1").unwrap() else {
            panic!("a registry reference")
        };
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "test");
        assert_eq!(r.tag(), Some("1"));
        let ImageSource::Registry(r) = ImageSource::parse("alpine").unwrap() else {
            panic!("a registry reference")
        };
        assert_eq!(r.repository(), "library/alpine");
        let err = ImageSource::parse("oci-archive:").unwrap_err();
        assert!(err.to_string().contains("oci-layout:DIR"), "{err}");
        assert!(ImageSource::parse("UPPER/Case:x").is_err());
    }
}
