//! `nova template build <id> --from <image>` and `-f Dockerfile [CONTEXT]`:
//! templates from OCI / Docker images and Dockerfiles
//! (`nova_images::image_template`, `nova_images::dockerfile`), with a
//! progress line per step and `RUN` output streamed to the terminal.

use std::collections::BTreeMap;
use std::io::Write as _;

use anyhow::Context as _;
use nova_images::BuildOptions;
use nova_images::dockerfile::{BuildEvent, DockerfileBuild, build_from_dockerfile};
use nova_images::image_template::{ImageBuildOptions, build_from_image};
use nova_images::oci::ImageSource;
use novasandbox::core::NovaHome;
use novasandbox::core::template::GuestArch;

use crate::template::BuildArgs;

/// Builds the template `args` describe (an image or a Dockerfile); returns
/// the memory (MiB) and vCPUs its manifest records, which its snapshot is
/// to be taken with.
pub(crate) async fn build(args: &BuildArgs) -> anyhow::Result<(u32, u8)> {
    if args.arch != GuestArch::X86_64 {
        anyhow::bail!(
            "--arch {} with --from or -f is not supported: images are pulled and built for \
             linux/amd64; build an arm64 template from a recipe (nova template build minimal --arch arm64)",
            args.arch
        );
    }
    let home = NovaHome::resolve()?;
    let mut build = BuildOptions::new(home.clone());
    build.agent = crate::template::agent_path(args.agent.as_deref(), args.arch);
    build.rebuild_all = args.rebuild_all;
    build.measure_boot = !args.no_boot_check;
    let mut opts = ImageBuildOptions::new(build);
    opts.insecure_registries = args.insecure_registries.clone();
    let report = if let Some(from) = &args.from {
        let source = ImageSource::parse(from)?;
        println!("building template {} from {source}", args.id);
        build_from_image(&args.id, &source, &opts).await?
    } else if let Some(file) = &args.file {
        let context = match &args.context {
            Some(dir) => dir.clone(),
            None => file
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| ".".into(), ToOwned::to_owned),
        };
        let mut build_args = BTreeMap::new();
        for pair in &args.build_args {
            let (name, value) = pair
                .split_once('=')
                .with_context(|| format!("--build-arg {pair:?}: use NAME=VALUE"))?;
            build_args.insert(name.to_owned(), value.to_owned());
        }
        let dockerfile = DockerfileBuild {
            dockerfile: file.clone(),
            context,
            build_args,
        };
        println!(
            "building template {} from {} (context {})",
            args.id,
            file.display(),
            dockerfile.context.display()
        );
        let hypervisor = novasandbox::detect_in(home.clone());
        let hypervisor = match &hypervisor {
            Ok(h) => Some(h.as_ref() as &dyn novasandbox::core::Hypervisor),
            Err(e) => {
                eprintln!("note: no hypervisor ({e}); RUN steps will fail");
                None
            }
        };
        let mut progress = |event: BuildEvent<'_>| match event {
            BuildEvent::Step {
                index,
                total,
                line,
                text,
            } => println!("[{index}/{total}] line {line}: {text}"),
            BuildEvent::Note(note) => println!("  {note}"),
            BuildEvent::Stdout(bytes) => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(bytes);
                let _ = out.flush();
            }
            BuildEvent::Stderr(bytes) => {
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(bytes);
                let _ = err.flush();
            }
        };
        build_from_dockerfile(&args.id, &dockerfile, &opts, hypervisor, &mut progress).await?
    } else {
        anyhow::bail!("give --from IMAGE or -f DOCKERFILE");
    };
    let m = &report.template.manifest;
    println!(
        "template {} installed: rootfs {:.1} MiB, boot_time_ms {}, {:.1} s{}{}",
        m.template_id,
        report.rootfs_bytes as f64 / f64::from(1 << 20),
        m.boot_time_ms,
        report.elapsed.as_secs_f64(),
        m.exec_defaults
            .cwd
            .as_ref()
            .map(|c| format!(", workdir {c}"))
            .unwrap_or_default(),
        if m.exec_defaults.env.is_empty() {
            String::new()
        } else {
            format!(", {} env vars", m.exec_defaults.env.len())
        },
    );
    Ok((m.memory_mb, m.vcpus))
}
