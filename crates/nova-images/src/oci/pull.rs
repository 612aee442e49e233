//! Pulling an image from a registry (distribution v2 API) with `oci-client`.
//!
//! Authentication: the credentials `~/.docker/config.json` (or its
//! credential helper) has for the registry, read with `docker_credential`;
//! otherwise anonymous, which the client turns into the registry's token
//! flow. An image index is resolved to its linux/amd64 manifest. TLS is
//! used except for registries on loopback (`localhost`, `127.0.0.0/8`,
//! `[::1]`) and those named as insecure, which are spoken to in plain HTTP,
//! as Docker does.
//!
//! Every blob is downloaded to a temporary file in the store's directory
//! and enters the [`BlobStore`] only when its digest matches; a layer the
//! store already has is not downloaded again.

use std::path::Path;

use oci_client::client::{ClientConfig, ClientProtocol, linux_amd64_resolver};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::config::ImageConfig;
use super::store::{BlobStore, Sha256Digest};
use super::{FetchImageError, FetchedImage};

/// Whether `registry` (`host[:port]`) is on loopback.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The credentials Docker's config has for `registry`, or anonymous.
fn auth_for(registry: &str) -> RegistryAuth {
    // Docker keys Docker Hub by its legacy URL.
    let server = if registry == "index.docker.io" || registry == "docker.io" {
        "https://index.docker.io/v1/"
    } else {
        registry
    };
    match docker_credential::get_credential(server) {
        Ok(docker_credential::DockerCredential::UsernamePassword(user, password)) => {
            RegistryAuth::Basic(user, password)
        }
        Ok(docker_credential::DockerCredential::IdentityToken(_)) => {
            tracing::warn!(
                registry,
                "an identity token in the Docker config is not supported; pulling anonymously"
            );
            RegistryAuth::Anonymous
        }
        Err(e) => {
            tracing::debug!(registry, error = %e, "no Docker credentials; pulling anonymously");
            RegistryAuth::Anonymous
        }
    }
}

/// Pulls `reference` into the store.
pub async fn pull(
    reference: &Reference,
    store: &BlobStore,
    insecure: &[String],
) -> Result<FetchedImage, FetchImageError> {
    let registry = reference.resolve_registry().to_owned();
    let mut plain: Vec<String> = insecure.to_vec();
    if is_loopback_registry(&registry) {
        plain.push(registry.clone());
    }
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(plain),
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        ..Default::default()
    });
    let auth = auth_for(&registry);
    let registry_err =
        |source: oci_client::errors::OciDistributionError| FetchImageError::Registry {
            reference: reference.whole(),
            source: Box::new(source),
        };
    let (manifest, digest, config) = client
        .pull_manifest_and_config(reference, &auth)
        .await
        .map_err(registry_err)?;
    let config_digest = Sha256Digest::parse(&manifest.config.digest)?;
    store.import(&config_digest, config.as_bytes())?;
    let image_config = ImageConfig::parse(config.as_bytes())?;
    let mut layers = Vec::new();
    for layer in &manifest.layers {
        let digest = Sha256Digest::parse(&layer.digest)?;
        if store.contains(&digest) {
            layers.push(store.path(&digest));
            continue;
        }
        let dir = store
            .path(&digest)
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        std::fs::create_dir_all(&dir).map_err(|source| FetchImageError::Io {
            path: dir.clone(),
            source,
        })?;
        let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|source| FetchImageError::Io {
            path: dir.clone(),
            source,
        })?;
        let file =
            tokio::fs::File::from_std(tmp.reopen().map_err(|source| FetchImageError::Io {
                path: tmp.path().to_owned(),
                source,
            })?);
        tracing::info!(%digest, bytes = layer.size, "pulling layer");
        client
            .pull_blob(reference, layer, file)
            .await
            .map_err(registry_err)?;
        layers.push(store.import_file(&digest, tmp.path())?);
    }
    Ok(FetchedImage {
        config: image_config,
        layers,
        digest: Some(digest),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_registries_are_plain_http() {
        assert!(is_loopback_registry("127.0.0.1:5000"));
        assert!(is_loopback_registry("localhost:5000"));
        assert!(is_loopback_registry("localhost"));
        assert!(is_loopback_registry("[::1]:5000"));
        assert!(!is_loopback_registry("index.docker.io"));
        assert!(!is_loopback_registry("10.0.0.1:5000"));
        assert!(!is_loopback_registry("localhost.example.com"));
    }
}
