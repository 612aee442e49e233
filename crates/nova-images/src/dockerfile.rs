//! Templates from Dockerfiles: `nova template build <id> -f Dockerfile [CONTEXT]`.
//!
//! The Dockerfile is parsed by the `parse-dockerfile` crate; this module
//! gives the instructions their meaning, one stage (multi-stage builds are
//! refused), in order:
//!
//! ```text
//! FROM image|template|scratch -> the stage's tree (image layers applied as
//!                                with --from; a template's tree exported from
//!                                a sandbox of it)
//! ENV / ARG / WORKDIR / USER / CMD / ENTRYPOINT -> the stage's state
//! COPY / ADD (local files)    -> a layer made from the context, applied to
//!                                the tree with the same safe unpacker
//! RUN                         -> the tree installed as a temporary template,
//!                                a sandbox booted from it (consecutive RUNs
//!                                share one), the command run with the
//!                                stage's env, args and working directory,
//!                                its output streamed; then the sandbox's
//!                                root is exported (tar over the agent's exec
//!                                channel) and applied as the new tree
//! end                         -> crate::image_template::install_tree with
//!                                ENV, WORKDIR, USER, ENTRYPOINT/CMD as the
//!                                template's exec defaults
//! ```
//!
//! Any other instruction, or a flag nova does not implement (`RUN --mount`,
//! `COPY --from`, ...), is an error naming its line. `RUN` steps run as the
//! stage's user (`USER`, else the base image's `User`, else root), looked
//! up in the stage's own `/etc/passwd` by the guest agent, as Docker does;
//! the final `USER` is recorded in the template (as `uid:gid`). `COPY` and
//! `ADD` files stay root-owned unless `--chown` says otherwise.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nova_core::exec::{ExecEvent, ExecRequest, ExitStatus};
use nova_core::hypervisor::Hypervisor;
use nova_core::template::{
    ExecDefaults, KERNEL_FILE, ROOTFS_FILE, TemplateManager, TemplateManifest,
};
use nova_core::{Sandbox, SandboxConfig, StartMode};
use parse_dockerfile::{Command as DockerCommand, Instruction};

use crate::cache::{self, CacheDir};
use crate::image_template::{self, BuildFromImageError, ImageBuildOptions};
use crate::kernel;
use crate::oci::layer::{ApplyLayerError, ApplyOptions, apply_layer};
use crate::oci::{self, ImageSource};
use crate::rootfs::{self, EtcPolicy};
use crate::template::{BuildReport, BuildTemplateError};

/// Directories of a running guest that are not part of its root file
/// system (mounts) and are left out of an export.
const EXPORT_SKIP: &[&str] = &["proc", "sys", "dev", "run", "tmp", ".nova"];

/// The guest-side script that writes the root file system as a tar stream
/// on stdout: every top-level entry except the mounts.
const EXPORT_SCRIPT: &str = r#"cd / || exit 1
set --
for e in * .[!.]* ..?*; do
  case "$e" in
    proc|sys|dev|run|tmp|.nova) ;;
    *) if [ -e "$e" ] || [ -L "$e" ]; then set -- "$@" "$e"; fi ;;
  esac
done
exec tar -cf - "$@""#;

/// How long a build sandbox may take to boot: a build is not latency
/// bound, and a TCG boot on a busy host takes far more than a create's
/// default allows.
const BUILD_BOOT_TIMEOUT_MS: u64 = 120_000;

const NO_HYPERVISOR: &str =
    "this step boots a sandbox, and no hypervisor was given (run `nova doctor`)";

/// A Dockerfile build's inputs.
#[derive(Debug, Clone)]
pub struct DockerfileBuild {
    /// The Dockerfile.
    pub dockerfile: PathBuf,
    /// The build context (COPY / ADD sources are relative to it).
    pub context: PathBuf,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
}

/// What a build reports as it goes.
#[derive(Debug)]
pub enum BuildEvent<'a> {
    /// Step `index` of `total` (1-based) starts: the instruction on `line`.
    Step {
        /// 1-based step number.
        index: usize,
        /// Number of steps.
        total: usize,
        /// The Dockerfile line.
        line: usize,
        /// The instruction's text (first line).
        text: &'a str,
    },
    /// A note (e.g. a sandbox booted, a tree exported).
    Note(&'a str),
    /// Output a `RUN` command wrote to stdout.
    Stdout(&'a [u8]),
    /// Output a `RUN` command wrote to stderr.
    Stderr(&'a [u8]),
}

/// A Dockerfile build failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerfileError {
    /// The Dockerfile could not be read.
    #[error("cannot read the Dockerfile {path}")]
    Read {
        /// Its path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The Dockerfile does not parse.
    #[error("{path}: {message}")]
    Parse {
        /// Its path.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// An instruction nova does not support, or uses wrongly.
    #[error("Dockerfile line {line}: {message}")]
    Instruction {
        /// The line.
        line: usize,
        /// What is wrong and what to do.
        message: String,
    },
    /// A RUN command failed.
    #[error("Dockerfile line {line}: RUN {command:?} failed ({status})")]
    RunFailed {
        /// The line.
        line: usize,
        /// The command.
        command: String,
        /// How it ended.
        status: String,
    },
    /// The sandbox for a RUN step could not be used.
    #[error("Dockerfile line {line}: the build sandbox failed: {message}")]
    Sandbox {
        /// The line.
        line: usize,
        /// What failed.
        message: String,
    },
    /// A COPY source or a tree export could not be applied.
    #[error("Dockerfile line {line}: cannot apply the step's files")]
    Apply {
        /// The line.
        line: usize,
        /// The cause.
        #[source]
        source: ApplyLayerError,
    },
    /// Fetching the base image, packing or installing failed.
    #[error(transparent)]
    Image(#[from] BuildFromImageError),
}

impl From<BuildTemplateError> for DockerfileError {
    fn from(e: BuildTemplateError) -> Self {
        Self::Image(BuildFromImageError::Install(e))
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DockerfileError + '_ {
    move |source| {
        DockerfileError::from(BuildTemplateError::Io {
            path: path.to_owned(),
            source,
        })
    }
}

fn at(line: usize, message: impl Into<String>) -> DockerfileError {
    DockerfileError::Instruction {
        line,
        message: message.into(),
    }
}

/// The stage being built.
struct Stage {
    tree: PathBuf,
    defaults: ExecDefaults,
    args: BTreeMap<String, String>,
    /// Set once ENTRYPOINT is given here: the base's CMD no longer applies.
    entrypoint_set: bool,
}

/// A sandbox booted from the stage's tree, for consecutive RUN steps.
struct Live {
    sandbox: Sandbox,
    _template: StageTemplate,
}

/// A temporary template in `$NOVA_HOME/templates`, removed on drop.
struct StageTemplate {
    dir: PathBuf,
    id: String,
}

impl Drop for StageTemplate {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove a build stage template");
        }
    }
}

/// Builds template `id` from a Dockerfile and installs it. `hypervisor`
/// boots the sandboxes RUN steps (and `FROM <template>`) run in; it must
/// use the same `$NOVA_HOME` as `opts`. Without one, such a step is an
/// error.
pub async fn build_from_dockerfile(
    id: &str,
    build: &DockerfileBuild,
    opts: &ImageBuildOptions,
    hypervisor: Option<&dyn Hypervisor>,
    progress: &mut (dyn FnMut(BuildEvent<'_>) + Send),
) -> Result<BuildReport, DockerfileError> {
    if !nova_core::config::is_valid_template_id(id) {
        return Err(BuildFromImageError::InvalidId(id.to_owned()).into());
    }
    let started = Instant::now();
    let text = fs::read_to_string(&build.dockerfile).map_err(|source| DockerfileError::Read {
        path: build.dockerfile.clone(),
        source,
    })?;
    let parsed = parse_dockerfile::parse(&text).map_err(|e| DockerfileError::Parse {
        path: build.dockerfile.clone(),
        message: e.to_string(),
    })?;
    let line_of = |pos: usize| text[..pos.min(text.len())].matches('\n').count() + 1;
    let stages: Vec<_> = parsed.stages().collect();
    let stage_def = match stages.as_slice() {
        [] => return Err(at(1, "the Dockerfile has no FROM")),
        [one] => one,
        [_, second, ..] => {
            return Err(at(
                line_of(second.from.from.span.start),
                "multi-stage builds are not supported; keep one FROM",
            ));
        }
    };
    // Every instruction is known before anything is fetched or booted.
    if let Some(other) = stage_def.instructions.iter().find(|i| !is_supported(i)) {
        return Err(unsupported(line_of(keyword_span(other).start), other));
    }
    // ARGs before FROM: visible to FROM only (as Docker has it).
    let mut global_args = BTreeMap::new();
    for arg in parsed.global_args() {
        let (name, value) = parse_arg(&arg.arguments.value);
        let value = build
            .build_args
            .get(&name)
            .cloned()
            .or(value)
            .unwrap_or_default();
        global_args.insert(name, value);
    }

    let templates = opts.build.home.templates_dir();
    fs::create_dir_all(&templates).map_err(io_err(&templates))?;
    let dest = templates.join(id);
    cache::sweep_leftovers(&dest).map_err(io_err(&templates))?;
    let staging = cache::staging_dir_for(&dest).map_err(io_err(&templates))?;
    let tree = staging.path().join(".rootfs-tree");
    fs::create_dir_all(&tree).map_err(io_err(&tree))?;

    let from_line = line_of(stage_def.from.from.span.start);
    if !stage_def.from.options.is_empty() {
        return Err(at(from_line, "FROM flags (--platform) are not supported"));
    }
    let total = stage_def.instructions.len() + 1;
    let base = expand(&stage_def.from.image.value, &global_args);
    progress(BuildEvent::Step {
        index: 1,
        total,
        line: from_line,
        text: &format!("FROM {base}"),
    });
    let mut stage = Stage {
        tree: tree.clone(),
        defaults: ExecDefaults::default(),
        args: BTreeMap::new(),
        entrypoint_set: false,
    };
    let manager = TemplateManager::new(&templates);
    let is_template = !base.contains(['/', ':', '@']) && manager.load(&base).is_ok();
    let mut live: Option<Live> = None;
    if base == "scratch" {
    } else if is_template {
        let template = manager.load(&base).map_err(BuildTemplateError::from)?;
        stage.defaults = template.manifest.exec_defaults.clone();
        let hypervisor = hypervisor.ok_or_else(|| at(from_line, NO_HYPERVISOR))?;
        let sandbox = boot(hypervisor, &base, opts.memory_mb, from_line).await?;
        progress(BuildEvent::Note(&format!(
            "exporting template {base}'s files"
        )));
        let exported =
            export_tree(&sandbox, staging.path(), &stage.tree, from_line, progress).await;
        stop(&sandbox).await;
        exported?;
    } else {
        let source = ImageSource::parse(&base).map_err(|e| at(from_line, e.to_string()))?;
        let image = oci::fetch(
            &source,
            &opts.build.home.cache_dir(),
            &opts.insecure_registries,
        )
        .await
        .map_err(|e| {
            if base.contains(['/', ':', '@']) {
                return DockerfileError::from(BuildFromImageError::Fetch {
                    source_ref: source.to_string(),
                    source: e,
                });
            }
            // A bare name: most likely a template id mistyped.
            let installed = manager.ids().unwrap_or_default().join(", ");
            let chain: Vec<String> =
                std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
                .map(ToString::to_string)
                .collect();
            at(
                from_line,
                format!(
                    "FROM {base}: no installed template has this id (installed: {installed}), \
                     and the image {source} cannot be fetched: {}",
                    chain.join(": ")
                ),
            )
        })?;
        stage.defaults = image.config.exec_defaults();
        let target = stage.tree.clone();
        tokio::task::spawn_blocking(move || oci::unpack(&image, &target))
            .await
            .map_err(|e| at(from_line, format!("the layer unpacker stopped: {e}")))?
            .map_err(BuildFromImageError::from)?;
    }

    // Every step, so that a build sandbox still running when a step fails
    // is stopped before the error is returned.
    let steps = async {
        for (i, instruction) in stage_def.instructions.iter().enumerate() {
            let start = keyword_span(instruction).start;
            let line = line_of(start);
            let first_line = text[start..].lines().next().unwrap_or_default();
            progress(BuildEvent::Step {
                index: i + 2,
                total,
                line,
                text: first_line,
            });
            let vars = stage.vars();
            match instruction {
                Instruction::Env(env) => {
                    for (name, value) in
                        parse_env(&env.arguments.value, &vars).map_err(|m| at(line, m))?
                    {
                        stage.defaults.env.insert(name, value);
                    }
                }
                Instruction::Arg(arg) => {
                    let (name, default) = parse_arg(&arg.arguments.value);
                    let default = default.map(|d| expand(&d, &vars));
                    let value = build
                        .build_args
                        .get(&name)
                        .cloned()
                        .or(default)
                        .or_else(|| global_args.get(&name).cloned())
                        .unwrap_or_default();
                    stage.args.insert(name, value);
                }
                Instruction::Workdir(workdir) => {
                    let dir = expand(&workdir.arguments.value, &vars);
                    let dir = if dir.starts_with('/') {
                        dir
                    } else {
                        format!(
                            "{}/{dir}",
                            stage
                                .defaults
                                .cwd
                                .as_deref()
                                .unwrap_or("")
                                .trim_end_matches('/')
                        )
                    };
                    stage.defaults.cwd = Some(dir);
                }
                Instruction::User(user) => {
                    stage.defaults.user = Some(expand(&user.arguments.value, &vars));
                }
                Instruction::Cmd(cmd) => stage.defaults.cmd = argv_of(&cmd.arguments),
                Instruction::Entrypoint(entrypoint) => {
                    stage.defaults.entrypoint = argv_of(&entrypoint.arguments);
                    if !stage.entrypoint_set {
                        stage.entrypoint_set = true;
                        stage.defaults.cmd.clear();
                    }
                }
                Instruction::Copy(copy) => {
                    if let Some(flag) = copy
                        .options
                        .iter()
                        .find(|f| f.name.value != "chown" && f.name.value != "chmod")
                    {
                        return Err(at(
                            line,
                            format!("COPY --{} is not supported", flag.name.value),
                        ));
                    }
                    if let Some(live) = live.take() {
                        finish_live(live, staging.path(), &stage.tree, line, progress).await?;
                    }
                    let sources = sources_of(&copy.src, line, &vars)?;
                    let dest = expand(&copy.dest.value, &vars);
                    copy_into(
                        &stage,
                        build,
                        &sources,
                        &dest,
                        flags(&copy.options),
                        staging.path(),
                        line,
                    )?;
                }
                Instruction::Add(add) => {
                    if let Some(flag) = add
                        .options
                        .iter()
                        .find(|f| f.name.value != "chown" && f.name.value != "chmod")
                    {
                        return Err(at(
                            line,
                            format!("ADD --{} is not supported", flag.name.value),
                        ));
                    }
                    let sources = sources_of(&add.src, line, &vars)?;
                    if let Some(url) = sources.iter().find(|s| s.contains("://")) {
                        return Err(at(
                            line,
                            format!("ADD of a URL ({url}) is not supported; download it with RUN"),
                        ));
                    }
                    if let Some(archive) = sources.iter().find(|s| is_archive_name(s)) {
                        return Err(at(
                            line,
                            format!(
                                "ADD of an archive ({archive}) would unpack it, which nova does not do; COPY it and unpack it with RUN"
                            ),
                        ));
                    }
                    if let Some(live) = live.take() {
                        finish_live(live, staging.path(), &stage.tree, line, progress).await?;
                    }
                    let dest = expand(&add.dest.value, &vars);
                    copy_into(
                        &stage,
                        build,
                        &sources,
                        &dest,
                        flags(&add.options),
                        staging.path(),
                        line,
                    )?;
                }
                Instruction::Run(run) => {
                    if let Some(flag) = run.options.first() {
                        return Err(at(
                            line,
                            format!("RUN --{} is not supported", flag.name.value),
                        ));
                    }
                    if !run.here_docs.is_empty() {
                        return Err(at(line, "RUN with a here-document is not supported"));
                    }
                    let (request, shown) = match &run.arguments {
                        DockerCommand::Shell(shell) => {
                            (ExecRequest::shell(shell.value), shell.value.to_owned())
                        }
                        DockerCommand::Exec(argv) => {
                            let argv: Vec<String> =
                                argv.value.iter().map(|a| a.value.to_string()).collect();
                            let shown = argv.join(" ");
                            (ExecRequest::argv(argv), shown)
                        }
                        _ => return Err(at(line, "this form of RUN is not supported")),
                    };
                    if live.is_none() {
                        let hypervisor = hypervisor.ok_or_else(|| at(line, NO_HYPERVISOR))?;
                        live = Some(boot_stage(&stage, opts, hypervisor, line, progress).await?);
                    }
                    let Some(current) = &live else {
                        return Err(at(line, "no build sandbox"));
                    };
                    run_step(&current.sandbox, &stage, request, &shown, line, progress).await?;
                }
                other => return Err(unsupported(line, other)),
            }
        }
        Ok::<(), DockerfileError>(())
    }
    .await;
    if let Err(e) = steps {
        if let Some(live) = live.take() {
            stop(&live.sandbox).await;
        }
        return Err(e);
    }
    let end_line = text.lines().count().max(1);
    if let Some(live) = live.take() {
        finish_live(live, staging.path(), &stage.tree, end_line, progress).await?;
    }
    if let Some(cwd) = &stage.defaults.cwd {
        // WORKDIR creates its directory, as Docker's does.
        ensure_dir(&stage.tree, cwd, end_line)?;
    }
    if let Some(user) = &stage.defaults.user {
        stage.defaults.user = Some(oci::config::resolve_user(&stage.tree, user));
    }
    progress(BuildEvent::Note("packing the root file system"));
    let name = format!("Dockerfile {}", build.dockerfile.display());
    Ok(
        image_template::install_tree(id, &name, staging, &tree, stage.defaults, opts, started)
            .await?,
    )
}

impl Stage {
    /// Variables for `$VAR` expansion: the env, then build args over it.
    fn vars(&self) -> BTreeMap<String, String> {
        let mut vars = self.defaults.env.clone();
        for (k, v) in &self.args {
            vars.entry(k.clone()).or_insert_with(|| v.clone());
        }
        vars
    }
}

/// The error for an instruction nova does not build, at `line`.
fn unsupported(line: usize, instruction: &Instruction<'_>) -> DockerfileError {
    at(
        line,
        format!(
            "{} is not supported (nova supports FROM, RUN, COPY, ADD, ENV, ARG, WORKDIR, USER, \
             CMD, ENTRYPOINT); remove the line",
            keyword_name(instruction)
        ),
    )
}

/// Whether nova builds `instruction` (the rest are refused naming the line).
fn is_supported(instruction: &Instruction<'_>) -> bool {
    matches!(
        instruction,
        Instruction::Add(_)
            | Instruction::Arg(_)
            | Instruction::Cmd(_)
            | Instruction::Copy(_)
            | Instruction::Entrypoint(_)
            | Instruction::Env(_)
            | Instruction::Run(_)
            | Instruction::User(_)
            | Instruction::Workdir(_)
    )
}

fn keyword_span(instruction: &Instruction<'_>) -> std::ops::Range<usize> {
    match instruction {
        Instruction::Add(i) => i.add.span.clone(),
        Instruction::Arg(i) => i.arg.span.clone(),
        Instruction::Cmd(i) => i.cmd.span.clone(),
        Instruction::Copy(i) => i.copy.span.clone(),
        Instruction::Entrypoint(i) => i.entrypoint.span.clone(),
        Instruction::Env(i) => i.env.span.clone(),
        Instruction::Expose(i) => i.expose.span.clone(),
        Instruction::From(i) => i.from.span.clone(),
        Instruction::Healthcheck(i) => i.healthcheck.span.clone(),
        Instruction::Label(i) => i.label.span.clone(),
        Instruction::Maintainer(i) => i.maintainer.span.clone(),
        Instruction::Onbuild(i) => i.onbuild.span.clone(),
        Instruction::Run(i) => i.run.span.clone(),
        Instruction::Shell(i) => i.shell.span.clone(),
        Instruction::Stopsignal(i) => i.stopsignal.span.clone(),
        Instruction::User(i) => i.user.span.clone(),
        Instruction::Volume(i) => i.volume.span.clone(),
        Instruction::Workdir(i) => i.workdir.span.clone(),
        // A newer parser's instruction: point at the stage's start.
        _ => 0..0,
    }
}

fn keyword_name(instruction: &Instruction<'_>) -> &'static str {
    match instruction {
        Instruction::Add(_) => "ADD",
        Instruction::Arg(_) => "ARG",
        Instruction::Cmd(_) => "CMD",
        Instruction::Copy(_) => "COPY",
        Instruction::Entrypoint(_) => "ENTRYPOINT",
        Instruction::Env(_) => "ENV",
        Instruction::Expose(_) => "EXPOSE",
        Instruction::From(_) => "FROM",
        Instruction::Healthcheck(_) => "HEALTHCHECK",
        Instruction::Label(_) => "LABEL",
        Instruction::Maintainer(_) => "MAINTAINER",
        Instruction::Onbuild(_) => "ONBUILD",
        Instruction::Run(_) => "RUN",
        Instruction::Shell(_) => "SHELL",
        Instruction::Stopsignal(_) => "STOPSIGNAL",
        Instruction::User(_) => "USER",
        Instruction::Volume(_) => "VOLUME",
        Instruction::Workdir(_) => "WORKDIR",
        _ => "this instruction",
    }
}

fn argv_of(command: &DockerCommand<'_>) -> Vec<String> {
    match command {
        DockerCommand::Exec(argv) => argv.value.iter().map(|a| a.value.to_string()).collect(),
        DockerCommand::Shell(shell) => {
            vec!["/bin/sh".into(), "-c".into(), shell.value.to_owned()]
        }
        _ => Vec::new(),
    }
}

fn flags(options: &[parse_dockerfile::Flag<'_>]) -> (Option<String>, Option<String>) {
    let get = |name: &str| {
        options
            .iter()
            .find(|f| f.name.value == name)
            .and_then(|f| f.value.as_ref().map(|v| v.value.to_string()))
    };
    (get("chown"), get("chmod"))
}

fn sources_of(
    src: &[parse_dockerfile::Source<'_>],
    line: usize,
    vars: &BTreeMap<String, String>,
) -> Result<Vec<String>, DockerfileError> {
    src.iter()
        .map(|s| match s {
            parse_dockerfile::Source::Path(p) => Ok(expand(&p.value, vars)),
            _ => Err(at(line, "COPY/ADD from a here-document is not supported")),
        })
        .collect()
}

fn is_archive_name(name: &str) -> bool {
    [
        ".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar.zst",
    ]
    .iter()
    .any(|ext| name.ends_with(ext))
}

/// `NAME` or `NAME=default`.
fn parse_arg(text: &str) -> (String, Option<String>) {
    let text = text.trim();
    match text.split_once('=') {
        Some((name, value)) => (name.trim().to_owned(), Some(unquote(value.trim()))),
        None => (text.to_owned(), None),
    }
}

fn unquote(value: &str) -> String {
    let bytes = value.as_bytes();
    if bytes.len() >= 2
        && (bytes[0] == b'"' || bytes[0] == b'\'')
        && bytes[bytes.len() - 1] == bytes[0]
    {
        value[1..value.len() - 1].to_owned()
    } else {
        value.to_owned()
    }
}

/// Parses `ENV` arguments: `K=V K2="v w"` or the legacy `K value words`.
/// Values are expanded against `vars` (and the pairs before them).
fn parse_env(text: &str, vars: &BTreeMap<String, String>) -> Result<Vec<(String, String)>, String> {
    let text = text.trim();
    let first_word = text.split_whitespace().next().unwrap_or_default();
    if !first_word.contains('=') {
        let name = first_word.to_owned();
        let value = text[first_word.len()..].trim();
        if name.is_empty() {
            return Err("ENV needs NAME=value".into());
        }
        return Ok(vec![(name, expand(value, vars))]);
    }
    let mut out = Vec::new();
    let mut vars = vars.clone();
    for word in shell_words(text)? {
        let (name, raw) = word
            .split_once('=')
            .ok_or_else(|| format!("ENV {word:?} is not NAME=value"))?;
        if name.is_empty() {
            return Err(format!("ENV {word:?} has no name"));
        }
        let value = expand(raw, &vars);
        vars.insert(name.to_owned(), value.clone());
        out.push((name.to_owned(), value));
    }
    Ok(out)
}

/// Splits on unquoted whitespace, removing quotes and backslash escapes;
/// `$` inside single quotes is kept escaped (as `\$`) from expansion.
fn shell_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(e @ ('"' | '\\' | '$')) => {
                                if e == '$' {
                                    word.push('\\');
                                }
                                word.push(e);
                            }
                            Some(e) => {
                                word.push('\\');
                                word.push(e);
                            }
                            None => return Err("unterminated quote in ENV".into()),
                        },
                        Some(other) => word.push(other),
                        None => return Err("unterminated quote in ENV".into()),
                    }
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some('$') => word.push_str("\\$"),
                        Some(other) => word.push(other),
                        None => return Err("unterminated quote in ENV".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('$') => word.push_str("\\$"),
                    Some(e) => word.push(e),
                    None => {}
                }
            }
            other => {
                in_word = true;
                word.push(other);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Expands `$NAME`, `${NAME}`, `${NAME:-word}` and `${NAME:+word}` from
/// `vars` (unset = empty); `\$` is a literal `$`.
fn expand(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'$') => {
                chars.next();
                out.push('$');
            }
            '$' if chars.peek() == Some(&'{') => {
                chars.next();
                let mut inner = String::new();
                for c in chars.by_ref() {
                    if c == '}' {
                        break;
                    }
                    inner.push(c);
                }
                if let Some((name, word)) = inner.split_once(":-") {
                    match vars.get(name).filter(|v| !v.is_empty()) {
                        Some(v) => out.push_str(v),
                        None => out.push_str(word),
                    }
                } else if let Some((name, word)) = inner.split_once(":+") {
                    if vars.get(name).is_some_and(|v| !v.is_empty()) {
                        out.push_str(word);
                    }
                } else if let Some(v) = vars.get(&inner) {
                    out.push_str(v);
                }
            }
            '$' if chars
                .peek()
                .is_some_and(|c| c.is_ascii_alphabetic() || *c == '_') =>
            {
                let mut name = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        name.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if let Some(v) = vars.get(&name) {
                    out.push_str(v);
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// A guest path as a relative tar path (`/a/b` -> `a/b`).
fn tar_path(guest: &str) -> String {
    guest.trim_start_matches('/').to_owned()
}

/// Creates directory `guest` (absolute) in the tree, resolving its
/// components inside the tree.
fn ensure_dir(tree: &Path, guest: &str, line: usize) -> Result<(), DockerfileError> {
    let rel = tar_path(guest);
    if rel.is_empty() {
        return Ok(());
    }
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    builder
        .append_data(&mut header, format!("{rel}/"), &[][..])
        .map_err(|e| at(line, format!("WORKDIR {guest:?} is not a usable path: {e}")))?;
    let bytes = builder
        .into_inner()
        .map_err(|e| at(line, format!("cannot make WORKDIR {guest:?}: {e}")))?;
    // An existing directory keeps its mode and owner, and an existing
    // symlink is kept (the guest follows it).
    if fs::symlink_metadata(tree.join(&rel)).is_ok() {
        return Ok(());
    }
    apply_layer(tree, &bytes[..], ApplyOptions::default())
        .map(drop)
        .map_err(|source| DockerfileError::Apply { line, source })
}

/// COPY / ADD: builds a layer from the context's `sources` placed at
/// `dest` and applies it to the tree.
fn copy_into(
    stage: &Stage,
    build: &DockerfileBuild,
    sources: &[String],
    dest: &str,
    (chown, chmod): (Option<String>, Option<String>),
    scratch: &Path,
    line: usize,
) -> Result<(), DockerfileError> {
    let owner = match chown.as_deref() {
        None => (0, 0),
        Some(spec) => {
            let resolved = oci::config::resolve_user(&stage.tree, spec);
            let (u, g) = resolved.split_once(':').unwrap_or((&resolved, &resolved));
            match (u.parse::<u64>(), g.parse::<u64>()) {
                (Ok(u), Ok(g)) => (u, g),
                _ => {
                    return Err(at(
                        line,
                        format!("--chown={spec}: the image does not know this user or group"),
                    ));
                }
            }
        }
    };
    let mode = match chmod.as_deref() {
        None => None,
        Some(m) => Some(
            u32::from_str_radix(m, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| at(line, format!("--chmod={m} is not an octal mode")))?,
        ),
    };
    let context = build.context.canonicalize().map_err(|e| {
        at(
            line,
            format!(
                "the build context {} is not readable: {e}",
                build.context.display()
            ),
        )
    })?;
    let dest_abs = if dest.starts_with('/') {
        dest.to_owned()
    } else {
        format!(
            "{}/{dest}",
            stage
                .defaults
                .cwd
                .as_deref()
                .unwrap_or("")
                .trim_end_matches('/')
        )
    };
    let into_dir = dest_abs.ends_with('/') || sources.len() > 1;
    let layer_path = scratch.join(format!(".copy-{line}.tar"));
    let file = fs::File::create(&layer_path).map_err(io_err(&layer_path))?;
    let mut builder = tar::Builder::new(file);
    builder.follow_symlinks(false);
    for source in sources {
        if source.contains(['*', '?', '[']) {
            return Err(at(
                line,
                format!("{source:?}: wildcards in COPY/ADD sources are not supported"),
            ));
        }
        let host = context.join(source.trim_start_matches('/'));
        let host = host.canonicalize().map_err(|e| {
            at(
                line,
                format!(
                    "{source:?} is not in the build context {}: {e}",
                    context.display()
                ),
            )
        })?;
        if !host.starts_with(&context) {
            return Err(at(
                line,
                format!(
                    "{source:?} is outside the build context {}",
                    context.display()
                ),
            ));
        }
        let meta = fs::metadata(&host).map_err(io_err(&host))?;
        let target = if meta.is_dir() {
            tar_path(&dest_abs).trim_end_matches('/').to_owned()
        } else if into_dir || dest_abs.ends_with('/') {
            let name = host
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("{}/{name}", tar_path(&dest_abs).trim_end_matches('/'))
        } else {
            tar_path(&dest_abs)
        };
        append_tree(&mut builder, &host, &target, owner, mode, line)?;
    }
    builder
        .into_inner()
        .and_then(|mut f| f.flush())
        .map_err(io_err(&layer_path))?;
    let file = fs::File::open(&layer_path).map_err(io_err(&layer_path))?;
    apply_layer(&stage.tree, file, ApplyOptions::default())
        .map_err(|source| DockerfileError::Apply { line, source })?;
    fs::remove_file(&layer_path).map_err(io_err(&layer_path))
}

/// Appends `host` (a file, symlink or directory, recursively) as `target`.
fn append_tree(
    builder: &mut tar::Builder<fs::File>,
    host: &Path,
    target: &str,
    owner: (u64, u64),
    mode: Option<u32>,
    line: usize,
) -> Result<(), DockerfileError> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = fs::symlink_metadata(host).map_err(io_err(host))?;
    let mut header = tar::Header::new_gnu();
    header.set_uid(owner.0);
    header.set_gid(owner.1);
    header.set_mode(mode.unwrap_or(meta.permissions().mode() & 0o7777));
    let bad_path = |e: std::io::Error| at(line, format!("cannot add {}: {e}", host.display()));
    if meta.file_type().is_symlink() {
        let link = fs::read_link(host).map_err(io_err(host))?;
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        builder
            .append_link(&mut header, target, &link)
            .map_err(bad_path)?;
    } else if meta.is_dir() {
        if !target.is_empty() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder
                .append_data(&mut header, format!("{target}/"), &[][..])
                .map_err(bad_path)?;
        }
        let mut children: Vec<_> = fs::read_dir(host)
            .map_err(io_err(host))?
            .collect::<Result<_, _>>()
            .map_err(io_err(host))?;
        children.sort_by_key(fs::DirEntry::file_name);
        for child in children {
            let name = child.file_name().to_string_lossy().into_owned();
            let child_target = if target.is_empty() {
                name
            } else {
                format!("{target}/{name}")
            };
            append_tree(builder, &child.path(), &child_target, owner, mode, line)?;
        }
    } else if meta.is_file() {
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(meta.len());
        let file = fs::File::open(host).map_err(io_err(host))?;
        builder
            .append_data(&mut header, target, file)
            .map_err(bad_path)?;
    }
    Ok(())
}

/// Boots a sandbox of template `template`.
async fn boot(
    hypervisor: &dyn Hypervisor,
    template: &str,
    memory_mb: u32,
    line: usize,
) -> Result<Sandbox, DockerfileError> {
    let config = |network: bool| {
        SandboxConfig::builder()
            .template_id(template.to_owned())
            .start(StartMode::Cold)
            .memory_mb(memory_mb)
            .enable_network(network)
            .boot_timeout_ms(BUILD_BOOT_TIMEOUT_MS)
            .build()
    };
    let sandbox_err = |message: String| DockerfileError::Sandbox { line, message };
    let with_network = config(true).map_err(|e| sandbox_err(e.to_string()))?;
    match hypervisor.create_sandbox(with_network).await {
        Ok(sandbox) => Ok(sandbox),
        Err(
            e @ (nova_core::CreateSandboxError::Unsupported { .. }
            | nova_core::CreateSandboxError::Network(_)),
        ) => {
            tracing::warn!(error = %e, "the build sandbox has no network");
            let without = config(false).map_err(|e| sandbox_err(e.to_string()))?;
            hypervisor
                .create_sandbox(without)
                .await
                .map_err(|e| sandbox_err(format!("cannot boot it: {e}")))
        }
        Err(e) => Err(sandbox_err(format!("cannot boot it: {e}"))),
    }
}

async fn stop(sandbox: &Sandbox) {
    if let Err(e) = sandbox.stop(true).await {
        tracing::warn!(error = %e, "cannot stop a build sandbox");
    }
}

/// Installs the stage's tree as a temporary template and boots it.
async fn boot_stage(
    stage: &Stage,
    opts: &ImageBuildOptions,
    hypervisor: &dyn Hypervisor,
    line: usize,
    progress: &mut (dyn FnMut(BuildEvent<'_>) + Send),
) -> Result<Live, DockerfileError> {
    image_template::check_confinement(&stage.tree)?;
    rootfs::finish_staging(&stage.tree, &opts.build.agent, EtcPolicy::Image)
        .map_err(BuildFromImageError::from)?;
    let mut suffix = [0u8; 4];
    getrandom::fill(&mut suffix)
        .map_err(|e| at(line, format!("no randomness for a stage id: {e}")))?;
    let id = format!(
        "nova-build-{}",
        suffix
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let templates = opts.build.home.templates_dir();
    let dir = templates.join(&id);
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let guard = StageTemplate {
        dir: dir.clone(),
        id: id.clone(),
    };
    let cache = CacheDir::new(opts.build.home.cache_dir());
    let log = cache
        .log_file(&format!("template-{id}"))
        .map_err(io_err(cache.root()))?;
    let kernel = kernel::build_kernel(&cache, &opts.build.kernel_source, false)
        .await
        .map_err(BuildTemplateError::from)?;
    progress(BuildEvent::Note("packing the stage's files to boot them"));
    let image = dir.join(ROOTFS_FILE);
    rootfs::make_ext4(&stage.tree, &image, "nova-build", &log)
        .await
        .map_err(BuildFromImageError::from)?;
    let vmlinux = dir.join(KERNEL_FILE);
    if fs::hard_link(&kernel.vmlinux, &vmlinux).is_err() {
        fs::copy(&kernel.vmlinux, &vmlinux).map_err(io_err(&vmlinux))?;
    }
    let manifest = TemplateManifest {
        name: "build stage".into(),
        template_id: id.clone(),
        os_type: "linux".into(),
        memory_mb: opts.memory_mb,
        vcpus: opts.vcpus,
        boot_time_ms: 0,
        disk_size_gb: 0.0,
        kernel_version: kernel.manifest.release.clone(),
        required_files: vec![KERNEL_FILE.into(), ROOTFS_FILE.into()],
        packages: Vec::new(),
        exec_defaults: ExecDefaults::default(),
        arch: nova_core::GuestArch::X86_64,
    };
    TemplateManager::write_manifest(&dir, &manifest).map_err(io_err(&dir))?;
    let sandbox = boot(hypervisor, &guard.id, opts.memory_mb, line).await?;
    progress(BuildEvent::Note(&format!(
        "build sandbox {} booted in {} ms",
        sandbox.id(),
        sandbox.boot_time_ms()
    )));
    Ok(Live {
        sandbox,
        _template: guard,
    })
}

/// Runs one RUN step in the stage's sandbox, streaming its output.
async fn run_step(
    sandbox: &Sandbox,
    stage: &Stage,
    request: ExecRequest,
    shown: &str,
    line: usize,
    progress: &mut (dyn FnMut(BuildEvent<'_>) + Send),
) -> Result<(), DockerfileError> {
    let sandbox_err = |message: String| DockerfileError::Sandbox { line, message };
    let mut request = request;
    for (k, v) in stage.defaults.env.iter().chain(&stage.args) {
        request.env.entry(k.clone()).or_insert_with(|| v.clone());
    }
    if let Some(cwd) = &stage.defaults.cwd {
        let mkdir = ExecRequest::argv(["mkdir", "-p", "--", cwd.as_str()]);
        let out = sandbox
            .execute_command(mkdir)
            .await
            .map_err(|e| sandbox_err(format!("cannot create WORKDIR {cwd}: {e}")))?;
        if !out.success() {
            return Err(sandbox_err(format!(
                "cannot create WORKDIR {cwd}: {}",
                out.stderr_lossy().trim()
            )));
        }
        request = request.cwd(cwd.clone());
    }
    if let Some(user) = &stage.defaults.user {
        request = request.user(user.clone());
    }
    let mut stream = sandbox
        .exec_stream(request)
        .await
        .map_err(|e| sandbox_err(format!("cannot start the command: {e}")))?;
    let mut status = None;
    while let Some(event) = stream.next().await {
        match event {
            ExecEvent::Stdout(bytes) => progress(BuildEvent::Stdout(&bytes)),
            ExecEvent::Stderr(bytes) => progress(BuildEvent::Stderr(&bytes)),
            ExecEvent::Exited(s) => status = Some(s),
        }
    }
    match status {
        Some(s) if s.success() => Ok(()),
        Some(ExitStatus::Code(code)) => Err(DockerfileError::RunFailed {
            line,
            command: shown.to_owned(),
            status: format!("exit code {code}"),
        }),
        Some(other) => Err(DockerfileError::RunFailed {
            line,
            command: shown.to_owned(),
            status: format!("{other:?}"),
        }),
        None => Err(sandbox_err(
            "the agent went away before the command ended".into(),
        )),
    }
}

/// Exports the live sandbox's files as the stage's new tree and stops it.
async fn finish_live(
    live: Live,
    scratch: &Path,
    tree: &Path,
    line: usize,
    progress: &mut (dyn FnMut(BuildEvent<'_>) + Send),
) -> Result<(), DockerfileError> {
    progress(BuildEvent::Note("saving the build sandbox's files"));
    let exported = export_tree(&live.sandbox, scratch, tree, line, progress).await;
    stop(&live.sandbox).await;
    drop(live);
    exported
}

/// Streams the sandbox's root file system (less its mounts) into a fresh
/// `tree`, replacing what was there; the mount points are kept.
async fn export_tree(
    sandbox: &Sandbox,
    scratch: &Path,
    tree: &Path,
    line: usize,
    progress: &mut (dyn FnMut(BuildEvent<'_>) + Send),
) -> Result<(), DockerfileError> {
    let sandbox_err = |message: String| DockerfileError::Sandbox { line, message };
    let tar_path = scratch.join(format!(".export-{line}.tar"));
    let mut file = tokio::fs::File::create(&tar_path)
        .await
        .map_err(io_err(&tar_path))?;
    let mut stream = sandbox
        // As root whatever the image's `User`: the whole tree is read.
        .exec_stream(ExecRequest::shell(EXPORT_SCRIPT).user("0"))
        .await
        .map_err(|e| {
            sandbox_err(format!(
                "cannot export the files (the image needs sh and tar): {e}"
            ))
        })?;
    let mut status = None;
    while let Some(event) = stream.next().await {
        match event {
            ExecEvent::Stdout(bytes) => {
                tokio::io::AsyncWriteExt::write_all(&mut file, &bytes)
                    .await
                    .map_err(io_err(&tar_path))?;
            }
            ExecEvent::Stderr(bytes) => progress(BuildEvent::Stderr(&bytes)),
            ExecEvent::Exited(s) => status = Some(s),
        }
    }
    tokio::io::AsyncWriteExt::flush(&mut file)
        .await
        .map_err(io_err(&tar_path))?;
    drop(file);
    if !status.is_some_and(ExitStatus::success) {
        let how = status.map_or_else(|| "ended without a status".to_owned(), |s| s.to_string());
        return Err(sandbox_err(format!(
            "exporting the files with tar failed ({how}; its messages are above)"
        )));
    }
    let fresh = scratch.join(format!(".tree-{line}"));
    let _ = fs::remove_dir_all(&fresh);
    fs::create_dir_all(&fresh).map_err(io_err(&fresh))?;
    let applied = {
        let (fresh, source) = (fresh.clone(), tar_path.clone());
        tokio::task::spawn_blocking(move || {
            let file = fs::File::open(&source)?;
            Ok::<_, std::io::Error>(apply_layer(&fresh, file, ApplyOptions::default()))
        })
        .await
        .map_err(|e| sandbox_err(format!("the unpacker stopped: {e}")))?
        .map_err(io_err(&tar_path))?
    };
    applied.map_err(|source| DockerfileError::Apply { line, source })?;
    fs::remove_file(&tar_path).map_err(io_err(&tar_path))?;
    // The mount points, as the old tree had them (finish_staging adds any missing).
    for dir in EXPORT_SKIP {
        let old = tree.join(dir);
        if let Ok(meta) = fs::symlink_metadata(&old)
            && meta.is_dir()
        {
            let new = fresh.join(dir);
            fs::create_dir_all(&new).map_err(io_err(&new))?;
            fs::set_permissions(&new, meta.permissions()).map_err(io_err(&new))?;
        }
    }
    fs::remove_dir_all(tree).map_err(io_err(tree))?;
    fs::rename(&fresh, tree).map_err(io_err(tree))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn variables_expand_as_docker_does() {
        let v = vars(&[("A", "1"), ("EMPTY", "")]);
        assert_eq!(expand("$A/${A}/x$NOPE/\\$A", &v), "1/1/x/$A");
        assert_eq!(
            expand("${EMPTY:-d} ${A:-d} ${A:+set} ${NOPE:+set}", &v),
            "d 1 set "
        );
    }

    #[test]
    fn env_takes_both_forms_and_quotes() {
        let v = vars(&[("BASE", "/opt")]);
        assert_eq!(
            parse_env(r#"A=1 B="two words" C=$BASE/bin D='$BASE'"#, &v).unwrap(),
            [
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "two words".to_owned()),
                ("C".to_owned(), "/opt/bin".to_owned()),
                ("D".to_owned(), "$BASE".to_owned()),
            ]
        );
        assert_eq!(
            parse_env("GREETING hello  world", &v).unwrap(),
            [("GREETING".to_owned(), "hello  world".to_owned())]
        );
        assert!(parse_env(r#"A="open"#, &v).is_err());
        assert_eq!(
            parse_arg("V=\"x y\""),
            ("V".to_owned(), Some("x y".to_owned()))
        );
        assert_eq!(parse_arg("V"), ("V".to_owned(), None));
    }

    #[test]
    fn the_export_script_skips_every_mount() {
        for dir in EXPORT_SKIP {
            assert!(
                EXPORT_SCRIPT.contains(&format!("{dir}|"))
                    || EXPORT_SCRIPT.contains(&format!("{dir})")),
                "{dir}"
            );
        }
    }

    #[test]
    fn copy_builds_a_layer_from_the_context() {
        let dir = tempfile::tempdir().unwrap();
        let context = dir.path().join("ctx");
        fs::create_dir_all(context.join("sub")).unwrap();
        fs::write(context.join("hello.txt"), b"hi").unwrap();
        fs::write(context.join("sub/inner"), b"in").unwrap();
        fs::write(dir.path().join("secret"), b"no").unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(&tree).unwrap();
        let stage = Stage {
            tree: tree.clone(),
            defaults: ExecDefaults {
                cwd: Some("/app".into()),
                ..Default::default()
            },
            args: BTreeMap::new(),
            entrypoint_set: false,
        };
        let build = DockerfileBuild {
            dockerfile: context.join("Dockerfile"),
            context: context.clone(),
            build_args: BTreeMap::new(),
        };
        let none = (None, None);
        copy_into(
            &stage,
            &build,
            &["hello.txt".into()],
            "/etc/greeting",
            none.clone(),
            dir.path(),
            3,
        )
        .unwrap();
        copy_into(
            &stage,
            &build,
            &["sub".into()],
            "data/",
            (None, Some("600".into())),
            dir.path(),
            4,
        )
        .unwrap();
        copy_into(
            &stage,
            &build,
            &["hello.txt".into(), "sub/inner".into()],
            "/multi",
            none.clone(),
            dir.path(),
            5,
        )
        .unwrap();
        assert_eq!(fs::read(tree.join("etc/greeting")).unwrap(), b"hi");
        assert_eq!(fs::read(tree.join("app/data/inner")).unwrap(), b"in");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            fs::metadata(tree.join("app/data/inner"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert_eq!(fs::read(tree.join("multi/inner")).unwrap(), b"in");
        let err = copy_into(
            &stage,
            &build,
            &["../secret".into()],
            "/x",
            none.clone(),
            dir.path(),
            6,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("line 6")
                && err.to_string().contains("outside the build context"),
            "{err}"
        );
        let err =
            copy_into(&stage, &build, &["*.txt".into()], "/x", none, dir.path(), 7).unwrap_err();
        assert!(err.to_string().contains("wildcards"), "{err}");
    }

    #[tokio::test]
    async fn unsupported_instructions_name_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "FROM scratch\nENV A=1\nEXPOSE 80\n",
                "line 3: EXPOSE is not supported",
            ),
            // Refused before the RUN would need a sandbox (none here).
            (
                "FROM scratch\nRUN true\nHEALTHCHECK NONE\n",
                "line 3: HEALTHCHECK is not supported",
            ),
            (
                "FROM scratch\nRUN --mount=type=cache,target=/x true\n",
                "line 2: RUN --mount is not supported",
            ),
            ("FROM scratch AS a\nFROM scratch\n", "line 2: multi-stage"),
            (
                "FROM scratch\nADD https://example.invalid/x /x\n",
                "line 2: ADD of a URL",
            ),
            (
                "FROM scratch\nCOPY --from=a /x /x\n",
                "line 2: COPY --from is not supported",
            ),
        ];
        for (text, expected) in cases {
            let path = dir.path().join("Dockerfile");
            fs::write(&path, text).unwrap();
            let home = nova_core::home::NovaHome::at(dir.path().join("home"));
            let mut opts = ImageBuildOptions::new(crate::template::BuildOptions::new(home.clone()));
            opts.build.measure_boot = false;
            let build = DockerfileBuild {
                dockerfile: path,
                context: dir.path().to_owned(),
                build_args: BTreeMap::new(),
            };
            let err = build_from_dockerfile("t", &build, &opts, None, &mut |_| {})
                .await
                .unwrap_err();
            assert!(err.to_string().contains(expected), "{text:?}: {err}");
            assert!(!home.template_dir("t").exists());
        }
    }
}
