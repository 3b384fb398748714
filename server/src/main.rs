//! construir-server: hosts jobs and results. Strangers submit jobs; runners anyone may run pull
//! them, run each in a throw-away VM and upload the result.
//!
//! `construir-server [--data DIR] [--listen ADDR] [--config FILE]` serves; `token create|list|
//! revoke` manage who may do what (on the same data directory, while the server runs or not);
//! `image publish INDEX [--images DIR]` stores an image from the images directory as blobs and
//! makes it the index's current digest (printed), what jobs submitted for that index are pinned to;
//! `user add NAME [--admin]` and `user password NAME` set a password read from stdin (one line),
//! for signing in to the website.

use anyhow::Context;
use clap::{Parser, Subcommand};
use construir_server::db::Db;
use construir_server::settings::SettingArgs;
use construir_server::{backup, deletion, serve, tokens};

#[derive(Parser, Debug)]
#[command(
    name = "construir-server",
    about = "Host construir jobs and results: strangers submit jobs, pull runners run them",
    after_help = "Examples:\n  construir-server --data /var/lib/construir/server\n  \
construir-server --data DIR token create --name alice --role submitter\n  \
construir-server --data DIR token list\n  \
construir-server --data DIR image publish i0\n  \
construir-server --data DIR user add alice --admin < password-file\n  \
construir-server --data DIR backup /backups/farm-2026-12-02\n  \
construir-server --data NEW-DIR restore /backups/farm-2026-12-02"
)]
struct Cli {
    #[command(flatten)]
    settings: SettingArgs,
    #[command(flatten)]
    serve: serve::ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve (what no subcommand does too).
    Serve,
    /// Make, list and revoke tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Publish images, served by digest.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Give users a password for the website.
    #[command(subcommand)]
    User(UserCommand),
    /// Back up the embedded default (the database, the blobs, the key, the config file) into
    /// DEST, a new directory, while the server runs or not.
    Backup { dest: std::path::PathBuf },
    /// Restore a backup into the data directory (--data), which must hold no database; start
    /// the server on it afterwards.
    Restore { src: std::path::PathBuf },
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Make user NAME (or take the one there is) with the password read from stdin (one line,
    /// 8 to 256 bytes); an admin with --admin, else not one.
    Add {
        name: String,
        #[arg(long)]
        admin: bool,
    },
    /// Replace user NAME's password with the one read from stdin (one line, 8 to 256 bytes).
    Password { name: String },
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Store image INDEX's kernel, qcow2 and manifest as blobs and make it the index's current
    /// digest (jobs submitted for INDEX are pinned to it); prints the digest (the manifest's
    /// sha256). Publishing the same bits again changes nothing.
    Publish {
        index: String,
        /// The images directory (default $CONSTRUIR_IMAGES, else ~/.cache/construir/images).
        #[arg(long)]
        images: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Make a token for user NAME (made if new); prints the token, once, and nothing else.
    Create {
        #[arg(long)]
        name: String,
        /// submitter (submits and follows its own jobs), runner (runs jobs), admin.
        #[arg(long)]
        role: String,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by its id (from `token list`).
    Revoke { id: i64 },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CONSTRUIR_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("construir-server: error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("construir-server: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = cli.settings.resolve()?;
    if let Some(Command::Restore { src }) = &cli.command {
        // Before the database is opened: opening one would make an empty one.
        anyhow::ensure!(
            settings.database.is_none() && settings.store.is_none(),
            "restore fills the embedded default (a data directory); restore PostgreSQL with \
             pg_restore and the bucket with its own tools (docs/operations.md)"
        );
        let done = backup::restore(src, &settings.data)
            .await
            .with_context(|| {
                format!("restore {} into {}", src.display(), settings.data.display())
            })?;
        eprintln!(
            "construir-server: restored {} blobs ({} bytes), the database and the key into {}",
            done.blobs,
            done.blob_bytes,
            settings.data.display()
        );
        if src.join("config.toml").exists() {
            eprintln!(
                "construir-server: the backed-up config file is {}: put it where --config points",
                src.join("config.toml").display()
            );
        }
        return Ok(());
    }
    std::fs::create_dir_all(&settings.data)
        .with_context(|| format!("make the data directory {}", settings.data.display()))?;
    let db = Db::open(settings.database.as_ref(), &settings.data)
        .await
        .with_context(|| match &settings.database {
            Some(url) => format!("open the database {url}"),
            None => format!("open the database in {}", settings.data.display()),
        })?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve::serve(settings, cli.serve.resolve(), db).await,
        Command::Token(TokenCommand::Create { name, role }) => {
            anyhow::ensure!(
                ["submitter", "runner", "admin"].contains(&role.as_str()),
                "--role {role:?}: expected submitter, runner or admin"
            );
            let user = db.ensure_user(&name).await?;
            let token = tokens::generate().context("make a random token")?;
            let id = db.add_token(user, &role, &tokens::digest(&token)).await?;
            eprintln!("construir-server: token {id} for {name} ({role}); it is shown once:");
            println!("{token}");
            Ok(())
        }
        Command::Token(TokenCommand::List) => {
            println!("{:>5}  {:<20} {:<10} {:<8}", "id", "user", "role", "state");
            for t in db.list_tokens().await? {
                println!(
                    "{:>5}  {:<20} {:<10} {:<8}",
                    t.id,
                    t.user,
                    t.role,
                    if t.revoked_ms.is_some() {
                        "revoked"
                    } else {
                        "live"
                    }
                );
            }
            Ok(())
        }
        Command::Image(ImageCommand::Publish { index, images }) => {
            let dir = images.unwrap_or_else(construir_contract::manifest::default_images_dir);
            let blobs =
                construir_server::blobs::Blobs::open(settings.store.as_ref(), &settings.data)
                    .with_context(|| {
                        format!("open the blob store of {}", settings.data.display())
                    })?;
            let done = construir_server::images::publish(&db, &blobs, &dir, &index).await?;
            eprintln!(
                "construir-server: image {index} {}",
                if done.changed {
                    "published; it is the index's current digest"
                } else {
                    "was published already and is current: nothing changed"
                }
            );
            println!("{}", done.digest);
            Ok(())
        }
        Command::User(command) => {
            let (name, admin) = match command {
                UserCommand::Add { name, admin } => (name, Some(admin)),
                UserCommand::Password { name } => (name, None),
            };
            // Said before the password is asked for.
            anyhow::ensure!(
                admin.is_some() || db.account(&name).await?.is_some(),
                "no user {name}: `user add {name}` makes one"
            );
            let mut stdin = std::io::stdin().lock();
            let password = if std::io::IsTerminal::is_terminal(&stdin) {
                eprint!("construir-server: the password for {name}: ");
                without_echo(|| deletion::read_password(&mut stdin))?
            } else {
                deletion::read_password(&mut stdin)?
            };
            let done = deletion::set_user_password(&db, &name, admin, password).await?;
            eprintln!("construir-server: {done}");
            Ok(())
        }
        Command::Backup { dest } => {
            let blobs =
                construir_server::blobs::Blobs::open(settings.store.as_ref(), &settings.data)
                    .with_context(|| {
                        format!("open the blob store of {}", settings.data.display())
                    })?;
            let config = cli.settings.config.as_deref();
            let done = backup::backup(&db, &blobs, &settings.data, config, &dest)
                .await
                .with_context(|| format!("back up into {}", dest.display()))?;
            eprintln!(
                "construir-server: backed up {} blobs ({} bytes), the database and the key into {}",
                done.blobs,
                done.blob_bytes,
                dest.display()
            );
            for sha in &done.missing {
                eprintln!(
                    "construir-server: warning: blob {sha} was removed (retention) while the \
                     backup ran: the restored server will not have it"
                );
            }
            Ok(())
        }
        Command::Restore { .. } => unreachable!("restored above"),
        Command::Token(TokenCommand::Revoke { id }) => {
            anyhow::ensure!(db.revoke_token(id).await?, "no live token {id}");
            eprintln!("construir-server: token {id} revoked");
            Ok(())
        }
    }
}

/// Runs `read` with the terminal on stdin not echoing what is typed (a password).
fn without_echo<T>(read: impl FnOnce() -> T) -> T {
    let fd = libc::STDIN_FILENO;
    // SAFETY: an all-zero termios is a valid value of the plain C struct, filled in next.
    let mut term: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `term` is a valid termios for tcgetattr to write.
    if unsafe { libc::tcgetattr(fd, &mut term) } != 0 {
        return read();
    }
    let quiet = libc::termios {
        c_lflag: term.c_lflag & !libc::ECHO,
        ..term
    };
    // SAFETY: `quiet` is a valid termios, read by tcsetattr.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    let out = read();
    // SAFETY: as above; the terminal as it was.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &term) };
    eprintln!();
    out
}
