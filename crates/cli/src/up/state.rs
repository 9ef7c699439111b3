//! What `up` shows and keeps while it runs: the table it prints, `up.json`, and the lock that
//! keeps a second `up` off the same data directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde::Serialize;

use super::SERVICES;

/// One line of `up.json`.
#[derive(Debug, Clone, Serialize)]
pub(super) struct ProcessInfo {
    pub(super) service: &'static str,
    pub(super) pid: u32,
    pub(super) addr: SocketAddr,
    pub(super) restarts: u32,
}

/// Instances by name (`inventory`, `inventory-2`, ...).
pub(super) type Table = BTreeMap<String, ProcessInfo>;

#[derive(Debug, Serialize)]
pub(super) struct UpState<'a> {
    pub(super) launcher_pid: u32,
    pub(super) gateway: String,
    pub(super) processes: &'a Table,
}

pub(super) fn print_table(table: &Mutex<Table>, gateway: &str) {
    let Ok(table) = table.lock() else { return };
    println!("{:<12} {:>8}  address", "instance", "pid");
    for service in SERVICES {
        for (instance, info) in table.iter().filter(|(_, i)| i.service == service.name()) {
            println!("{instance:<12} {:>8}  http://{}", info.pid, info.addr);
        }
    }
    println!(
        "the shop's API is at {gateway}/api/v1 (register, login, me, users, products, inventory, cart, orders, admin/notifications, admin/cluster)"
    );
}

pub(super) fn write_state(path: &Path, table: &Mutex<Table>, gateway: &str) {
    let Ok(table) = table.lock() else { return };
    let state = UpState {
        launcher_pid: std::process::id(),
        gateway: gateway.to_owned(),
        processes: &table,
    };
    if let Ok(json) = serde_json::to_vec_pretty(&state) {
        // Write then rename, so a reader never sees half a file.
        let tmp = path.with_extension("json.tmp");
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

/// One `up` per data directory: two launchers on the same SQLite files would fight.
pub(super) struct Lock {
    pub(super) path: PathBuf,
}

impl Lock {
    pub(super) fn take(data_dir: &Path) -> anyhow::Result<Lock> {
        let path = data_dir.join("up.lock");
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(pid) = text.trim().parse::<i32>()
            && pid != std::process::id() as i32
            && kill(Pid::from_raw(pid), None).is_ok()
        {
            anyhow::bail!(
                "another `shopmesh up` (pid {pid}) is running on {}; stop it first or use \
                 --data-dir",
                data_dir.display()
            );
        }
        std::fs::write(&path, std::process::id().to_string())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Lock { path })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
