//! `shopmesh admin ...`: operator tasks.

use std::path::PathBuf;

use clap::Subcommand;
use shopmesh_config::Sources;
use shopmesh_users::AdminOutcome;

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Make an admin: create the account, or promote an existing one and set its password.
    ///
    /// Writes to the users database directly (./data/users.db by default, or
    /// SHOPMESH_DATABASE__URL, or SHOPMESH_LAUNCHER__DATABASE_URL_TEMPLATE as `up` uses it), so
    /// it works beside a running `shopmesh up` and before one.
    /// Containers can use SHOPMESH_USERS__BOOTSTRAP_ADMIN_EMAIL/_PASSWORD instead.
    CreateAdmin {
        /// The admin's e-mail address.
        #[arg(long)]
        email: String,
        /// The admin's password (8 to 128 characters, not a common one).
        #[arg(long)]
        password: String,
        /// Display name of a new account.
        #[arg(long, default_value = "Administrator")]
        name: String,
        /// Data directory of the shop [default: ./data, or SHOPMESH_DATA_DIR].
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

pub async fn run(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::CreateAdmin {
            email,
            password,
            name,
            data_dir,
        } => {
            let mut sources = Sources::from_process();
            if let Some(dir) = data_dir {
                sources = sources.set("SHOPMESH_DATA_DIR", dir.display().to_string());
            }
            // Beside an `up` that runs on a database URL template, the users database is the
            // template's, not the SQLite file.
            let env = sources.env_map();
            if !env.contains_key("SHOPMESH_DATABASE__URL")
                && let Some(template) = env.get("SHOPMESH_LAUNCHER__DATABASE_URL_TEMPLATE")
            {
                let url = template.replace("{service}", "users");
                sources = sources.set("SHOPMESH_DATABASE__URL", url);
            }
            let config = shopmesh_users::Config::load(&sources)?;
            let outcome = shopmesh_users::create_admin(&config, &email, &name, password).await?;
            let email = email.trim().to_lowercase();
            match outcome {
                AdminOutcome::Created => println!("created admin {email}"),
                AdminOutcome::Promoted => {
                    println!("{email} existed: it is now an admin, with the given password")
                }
            }
            Ok(())
        }
    }
}
