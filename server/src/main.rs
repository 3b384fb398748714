//! construir-server: hosts jobs and results. Strangers submit jobs; runners anyone may run pull
//! them, run each in a throw-away VM and upload the result.
//!
//! `construir-server [--data DIR] [--listen ADDR] [--config FILE]` serves; `token create|list|
//! revoke` manage who may do what (on the same data directory, while the server runs or not);
//! `image publish INDEX [--images DIR]` stores an image from the images directory as blobs and
//! makes it the index's current digest (printed), what jobs submitted for that index are pinned to.

use anyhow::Context;
use clap::{Parser, Subcommand};
use construir_server::db::Db;
use construir_server::settings::SettingArgs;
use construir_server::{serve, tokens};

#[derive(Parser, Debug)]
#[command(
    name = "construir-server",
    about = "Host construir jobs and results: strangers submit jobs, pull runners run them",
    after_help = "Examples:\n  construir-server --data /var/lib/construir/server\n  \
construir-server --data DIR token create --name alice --role submitter\n  \
construir-server --data DIR token list\n  \
construir-server --data DIR image publish i0"
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
    std::fs::create_dir_all(&settings.data)
        .with_context(|| format!("make the data directory {}", settings.data.display()))?;
    let db = Db::open_embedded(&settings.data)
        .await
        .with_context(|| format!("open the database in {}", settings.data.display()))?;
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
            let blobs = construir_server::blobs::Blobs::open_local(&settings.data)
                .with_context(|| format!("open the blobs in {}", settings.data.display()))?;
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
        Command::Token(TokenCommand::Revoke { id }) => {
            anyhow::ensure!(db.revoke_token(id).await?, "no live token {id}");
            eprintln!("construir-server: token {id} revoked");
            Ok(())
        }
    }
}
