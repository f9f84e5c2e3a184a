//! The command line: parse arguments, load the configuration, call into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use registry_gate::config::{Config, LogConfig};
use registry_gate::{logging, server, users};

const DEFAULT_CONFIG: &str = "/etc/registry-gate/config.toml";

#[derive(Parser)]
#[command(
    version,
    about = "A TLS front door for a container registry: anyone pulls, only pushers push"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gate.
    Serve {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a configuration and print it as the gate sees it (secrets masked).
    CheckConfig {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Remove blob content no manifest references (built-in registry only). Safe while
    /// the server runs and takes pushes.
    Gc {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Print what would be removed and how many bytes it frees; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also remove manifests no tag reaches (except those an index or a subject
        /// keeps), and then their blobs.
        #[arg(long)]
        delete_untagged: bool,
        /// Keep content touched this many seconds before the collection started (a push
        /// under way keeps the blobs it uploaded just before).
        #[arg(long, default_value_t = 3600)]
        grace_secs: u64,
    },
    /// What is stored: repositories with tag counts and sizes; a repository's tags
    /// (digest, type, platforms, size, push time); one tag's manifest.
    Ls {
        /// `REPO`, `REPO:TAG` or `REPO@DIGEST`; nothing: every repository.
        what: Option<String>,
        #[command(flatten)]
        target: TargetArgs,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a tag (`REPO:TAG`: other tags on its manifest stay) or a manifest
    /// (`REPO@DIGEST`, with every tag on it).
    Rm {
        what: String,
        #[command(flatten)]
        target: TargetArgs,
        /// Say what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Apply the [[retention]] rules now: remove the tags (and, with `untagged`, the
    /// manifests) they let go. `gc` then frees the space (or `--gc`).
    Prune {
        #[command(flatten)]
        target: TargetArgs,
        /// List what would go and the bytes it frees; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Collect garbage afterwards (the local store only).
        #[arg(long)]
        gc: bool,
    },
    /// The front cache ([cache]): what it holds (`stats`), or empty it (`clear`).
    Cache {
        #[arg(value_parser = ["stats", "clear"])]
        action: String,
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Exit 0 when the gate on this host serves, 1 with the reason when it does not:
    /// asks `[admin]`'s /readyz, or without `[admin]` completes a TLS handshake with
    /// `listen`. For a container HEALTHCHECK.
    Healthcheck {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3)]
        timeout_secs: u64,
    },
    /// Manage users in the htpasswd and group files (no apache2-utils needed).
    User {
        #[command(subcommand)]
        action: UserCommand,
    },
}

/// Where `ls`, `rm` and `prune` work.
#[derive(clap::Args)]
struct TargetArgs {
    /// The configuration: its store (all-in-one), and its [[retention]] and
    /// [[immutable]] rules.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Work through a gate (or any registry) over the registry API instead, e.g.
    /// `https://registry.example.org:5043`.
    #[arg(long)]
    url: Option<String>,
    /// With --url: log in as this user (password from the terminal or the first line
    /// of standard input); without it, credentials saved by `docker login` or `podman
    /// login` for that host are used, if any.
    #[arg(long, requires = "url")]
    user: Option<String>,
    /// With --url: trust this CA certificate (PEM) instead of the system's.
    #[arg(long, requires = "url")]
    ca_cert: Option<PathBuf>,
}

impl TargetArgs {
    fn target(self) -> registry_gate::lifecycle::cli::Target {
        registry_gate::lifecycle::cli::Target {
            config_given: self.config.is_some(),
            config: self.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG)),
            url: self.url,
            user: self.user,
            ca_cert: self.ca_cert,
        }
    }
}

#[derive(clap::Args)]
struct UserFiles {
    /// Take the files from this configuration's [auth] section.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// The htpasswd file (instead of the configuration's).
    #[arg(long, requires = "groups")]
    htpasswd: Option<PathBuf>,
    /// The group file (instead of the configuration's).
    #[arg(long, requires = "htpasswd")]
    groups: Option<PathBuf>,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user (or set a new password), bcrypt; the password is read from the
    /// terminal without echo, or from the first line of standard input.
    Add {
        name: String,
        /// Also add the user to this group (repeatable), e.g. `--group pusher`.
        #[arg(long = "group", value_name = "GROUP")]
        add_to: Vec<String>,
        /// bcrypt cost (4–31).
        #[arg(long, default_value_t = 10)]
        cost: u32,
        #[command(flatten)]
        files: UserFiles,
    },
    /// Remove a user from the htpasswd file and from every group.
    Del {
        name: String,
        #[command(flatten)]
        files: UserFiles,
    },
    /// Set a new password for an existing user (bcrypt); its groups stay.
    Passwd {
        name: String,
        /// bcrypt cost (4–31).
        #[arg(long, default_value_t = 10)]
        cost: u32,
        #[command(flatten)]
        files: UserFiles,
    },
    /// Change a user's groups; the password stays.
    Groups {
        name: String,
        /// Add the user to this group (repeatable), e.g. `--add pusher`.
        #[arg(long = "add", value_name = "GROUP")]
        add: Vec<String>,
        /// Remove the user from this group (repeatable).
        #[arg(long = "remove", value_name = "GROUP")]
        remove: Vec<String>,
        #[command(flatten)]
        files: UserFiles,
    },
    /// List users, their password hash type and their groups.
    List {
        #[command(flatten)]
        files: UserFiles,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("registry-gate: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve { config } => {
            let config = Config::load(&config).map_err(|e| e.to_string())?;
            logging::init(&config.log);
            registry_gate::runtime()?.block_on(async {
                let listener = server::bind(config.listen)
                    .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
                server::serve(config, listener, shutdown_signal())
                    .await
                    .map_err(|e| e.to_string())
            })
        }
        Command::CheckConfig { config } => {
            let loaded = Config::load(&config).map_err(|e| e.to_string())?;
            // Parse the files the gate would read at start, as it would.
            let pair =
                registry_gate::tls::load_pair(&loaded.tls.certificate, &loaded.tls.private_key)
                    .map_err(|e| e.to_string())?;
            let tls = registry_gate::tls::summarize(&pair);
            let mut summary = vec![tls.line()];
            let mut warnings = tls.warnings(loaded.public_url.as_deref());
            if let Some(auth) = &loaded.auth {
                let accounts = registry_gate::auth::Authenticator::load(auth)
                    .map_err(|e| e.to_string())?
                    .accounts();
                let (line, more) = accounts.summary(&auth.push_group);
                summary.push(line);
                warnings.extend(more);
            } else {
                summary.push("no [auth]: nobody can push (a read-only mirror)".into());
            }
            // Reach the storage as the server would (an object store: list one key).
            if loaded.upstream.is_none()
                && let Some(storage) = &loaded.storage
            {
                let store = registry_gate::registry::open_storage(storage)?;
                registry_gate::runtime()?
                    .block_on(store.check())
                    .map_err(|e| format!("storage: {e}"))?;
                eprintln!("storage: {} answers", store.describe());
            }
            print!("{}", loaded.to_toml_masked());
            for line in summary {
                eprintln!("{line}");
            }
            for warning in warnings {
                eprintln!("warning: {warning}");
            }
            eprintln!("{}: OK", config.display());
            Ok(())
        }
        Command::Gc {
            config,
            dry_run,
            delete_untagged,
            grace_secs,
        } => {
            let loaded = Config::load(&config).map_err(|e| e.to_string())?;
            logging::init(&loaded.log);
            let storage = match (&loaded.upstream, &loaded.storage) {
                (None, Some(storage)) => storage.clone(),
                _ => {
                    return Err(format!(
                        "{} has no built-in registry ([storage] without [upstream]): gc is \
                         for the built-in registry",
                        config.display()
                    ));
                }
            };
            let store = registry_gate::registry::store::Store::new(
                registry_gate::registry::open_storage(&storage)?,
            );
            let options = registry_gate::registry::gc::GcOptions {
                dry_run,
                delete_untagged,
                grace: std::time::Duration::from_secs(grace_secs),
            };
            let report = registry_gate::runtime()?
                .block_on(registry_gate::registry::gc::collect(&store, options))
                .map_err(|e| e.to_string())?;
            let verb = if dry_run { "would remove" } else { "removed" };
            for m in &report.manifests_removed {
                println!("{verb} manifest {m}");
            }
            for (d, size) in &report.blobs_removed {
                println!("{verb} blob {d} ({size} bytes)");
            }
            if report.blobs_young > 0 {
                println!(
                    "{} blobs ({}) unreferenced but younger than the grace period ({grace_secs} s), kept",
                    report.blobs_young,
                    mib(report.bytes_young)
                );
            }
            println!(
                "{} repositories, {} manifests kept; {verb} {} manifests and {} blobs, {} bytes",
                report.repositories,
                report.manifests_kept,
                report.manifests_removed.len(),
                report.blobs_removed.len(),
                report.bytes_freed
            );
            Ok(())
        }
        Command::Ls { what, target, json } => {
            logging::init(&LogConfig::default());
            registry_gate::lifecycle::cli::ls(&target.target(), what.as_deref(), json)
        }
        Command::Rm {
            what,
            target,
            dry_run,
        } => {
            logging::init(&LogConfig::default());
            registry_gate::lifecycle::cli::rm(&target.target(), &what, dry_run)
        }
        Command::Prune {
            target,
            dry_run,
            gc,
        } => {
            logging::init(&LogConfig::default());
            registry_gate::lifecycle::cli::prune(&target.target(), dry_run, gc)
        }
        Command::Cache { action, config } => {
            logging::init(&LogConfig::default());
            let loaded = Config::load(&config).map_err(|e| e.to_string())?;
            let cache = loaded
                .cache
                .ok_or_else(|| format!("{} has no [cache] section", config.display()))?;
            println!(
                "{}",
                registry_gate::cache::command(&cache, action == "clear")?
            );
            Ok(())
        }
        Command::Healthcheck {
            config,
            timeout_secs,
        } => {
            let timeout = std::time::Duration::from_secs(timeout_secs);
            println!("{}", registry_gate::healthcheck::run(&config, timeout)?);
            Ok(())
        }
        Command::User { action } => {
            logging::init(&LogConfig::default());
            user_command(action)
        }
    }
}

/// Bytes in MiB with one decimal, for people.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn user_files(files: &UserFiles) -> Result<(PathBuf, PathBuf), String> {
    if let (Some(h), Some(g)) = (&files.htpasswd, &files.groups) {
        return Ok((h.clone(), g.clone()));
    }
    // The files may not exist yet: `user add` creates them.
    let config = Config::load_unchecked(&files.config).map_err(|e| e.to_string())?;
    let auth = config.auth.ok_or_else(|| {
        format!(
            "{} has no [auth] section; give --htpasswd and --groups",
            files.config.display()
        )
    })?;
    Ok((auth.htpasswd, auth.groups))
}

fn user_command(action: UserCommand) -> Result<(), String> {
    match action {
        UserCommand::Add {
            name,
            add_to,
            cost,
            files,
        } => {
            let (htpasswd, group_file) = user_files(&files)?;
            let password = users::read_password(true).map_err(|e| e.to_string())?;
            users::add_user(&htpasswd, &group_file, &name, &password, &add_to, cost)
                .map_err(|e| e.to_string())?;
            eprintln!("user {name} saved in {}", htpasswd.display());
            Ok(())
        }
        UserCommand::Del { name, files } => {
            let (htpasswd, group_file) = user_files(&files)?;
            users::del_user(&htpasswd, &group_file, &name).map_err(|e| e.to_string())?;
            eprintln!("user {name} removed");
            Ok(())
        }
        UserCommand::Passwd { name, cost, files } => {
            let (htpasswd, _) = user_files(&files)?;
            let password = users::read_password(true).map_err(|e| e.to_string())?;
            users::set_password(&htpasswd, &name, &password, cost).map_err(|e| e.to_string())?;
            eprintln!("password of {name} changed in {}", htpasswd.display());
            Ok(())
        }
        UserCommand::Groups {
            name,
            add,
            remove,
            files,
        } => {
            if add.is_empty() && remove.is_empty() {
                return Err("say what to change: --add GROUP and/or --remove GROUP".into());
            }
            let (htpasswd, group_file) = user_files(&files)?;
            users::set_groups(&htpasswd, &group_file, &name, &add, &remove)
                .map_err(|e| e.to_string())?;
            let listed = users::list_users(&htpasswd, &group_file).map_err(|e| e.to_string())?;
            let now = listed
                .iter()
                .find(|u| u.name == name)
                .map(|u| u.groups.join(","))
                .unwrap_or_default();
            eprintln!(
                "{name} is now in: {}",
                if now.is_empty() { "-" } else { &now }
            );
            Ok(())
        }
        UserCommand::List { files } => {
            let (htpasswd, group_file) = user_files(&files)?;
            let listed = users::list_users(&htpasswd, &group_file).map_err(|e| e.to_string())?;
            for user in &listed {
                let scheme = user.scheme.map_or("?".to_owned(), |s| s.to_string());
                println!("{}\t{scheme}\t{}", user.name, user.groups.join(","));
            }
            for user in listed
                .iter()
                .filter(|u| u.scheme.is_some_and(|s| s.is_weak()))
            {
                let how = match user.scheme {
                    Some(registry_gate::auth::htpasswd::Scheme::Sha1) => "unsalted {SHA}",
                    _ => "MD5, cheap to guess",
                };
                eprintln!(
                    "warning: {}'s password is {how}; set it again as bcrypt with \
                     `registry-gate user passwd {}`",
                    user.name, user.name
                );
            }
            Ok(())
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot watch SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
