//! How `shopmesh up` shares the machine's cores among its processes (`launcher.pin_cores`).
//!
//! Every process is confined to its own share of the cores the launcher may use. Within one
//! process, threads hand work to each other all the time (tokio's workers, sqlx's SQLite
//! thread behind every statement); when they sit on different cores, every hand-off is a
//! cross-core wake-up, which on a virtual machine is an interrupt through the hypervisor. On
//! the 2-core machine of issue 9, confining each process to one core cut the shop's CPU per
//! purchase by about a quarter and raised throughput by 20–40% (bench/README). A confined
//! process also sizes itself to its share: confined to one core it runs tokio's current-thread
//! scheduler (`main.rs`), to several one worker per core it may use; the
//! SQLite reader pool twice that.
//!
//! With more processes than cores, each gets one core, the busiest first onto the least loaded
//! core (longest-processing-time first), by the CPU each service costs per purchase as
//! measured (replicas share their service's). With more cores than processes, each gets a
//! disjoint run of them, the spare ones to the busiest per core held.
//!
//! On by default only where it was measured: a launcher given two cores (`pin_by_default`);
//! `launcher.pin_cores = true` or `false` decides elsewhere.

use crate::serve::Service;

/// Relative CPU per purchase journey, from `shopmesh load`'s per-process figures (issue 9):
/// what the assignment balances. Not a limit: a process may use all of its core.
fn weight(service: Service) -> u32 {
    // Per-process CPU µs per journey ÷ 20, with SQLite run inline and commits grouped
    // (bench/README, 2026-12-01): orders 0.83–0.94 ms, inventory 0.33–0.38, gateway and
    // payments 0.24–0.28, catalog 0.13–0.16, notifications 0.06.
    match service {
        Service::Orders => 44,
        Service::Inventory => 18,
        Service::Payments | Service::Gateway => 13,
        Service::Catalog => 7,
        Service::Notifications => 3,
        Service::Users | Service::Cart => 1,
    }
}

/// The cores each process may use, in `processes` order (each a service and how many
/// instances it has), from the `allowed` cores. Empty sets when there is nothing to share.
pub fn assign(processes: &[(Service, u32)], allowed: &[usize]) -> Vec<Vec<usize>> {
    if allowed.is_empty() || processes.is_empty() {
        return vec![Vec::new(); processes.len()];
    }
    let share = |i: usize| {
        let (service, instances) = processes[i];
        (weight(service) * 12 / instances.max(1)).max(1)
    };
    let mut sets = vec![Vec::new(); processes.len()];
    if processes.len() < allowed.len() {
        // One core each, then every spare core to the process with the most work per core it
        // holds (ties: start order); each set a run of neighbouring cores.
        let mut counts = vec![1usize; processes.len()];
        for _ in processes.len()..allowed.len() {
            let busiest = (0..processes.len())
                .max_by(|&a, &b| {
                    // share(a) / counts[a] against share(b) / counts[b], without division.
                    (u64::from(share(a)) * counts[b] as u64)
                        .cmp(&(u64::from(share(b)) * counts[a] as u64))
                        .then(b.cmp(&a))
                })
                .expect("at least one process");
            counts[busiest] += 1;
        }
        let mut next = allowed.iter().copied();
        for (set, count) in sets.iter_mut().zip(counts) {
            set.extend(next.by_ref().take(count));
        }
        return sets;
    }
    let mut order: Vec<usize> = (0..processes.len()).collect();
    // Heaviest first; ties in start order, so the plan is the same every time.
    order.sort_by_key(|&i| (std::cmp::Reverse(share(i)), i));
    let mut load = vec![0u32; allowed.len()];
    for i in order {
        let (core, _) = load
            .iter()
            .enumerate()
            .min_by_key(|(c, l)| (**l, *c))
            .expect("at least one core");
        load[core] += share(i);
        sets[i] = vec![allowed[core]];
    }
    sets
}

/// Whether to confine processes when `launcher.pin_cores` is not set: where it was measured
/// to pay (two cores, issue 9). With more cores, one core each would cap the busiest process
/// (orders) at one core where it could use several; not measured, so not done by default.
pub fn pin_by_default(allowed: &[usize]) -> bool {
    allowed.len() == 2
}

/// The cores this process may run on (Linux; elsewhere none, and nothing is pinned).
pub fn allowed() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        use nix::sched::{CpuSet, sched_getaffinity};
        use nix::unistd::Pid;
        match sched_getaffinity(Pid::from_raw(0)) {
            Ok(set) => (0..CpuSet::count())
                .filter(|&c| set.is_set(c).unwrap_or(false))
                .collect(),
            Err(_) => Vec::new(),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        Vec::new()
    }
}

/// The arguments that tell a `shopmesh serve` child its cores (none when `cores` is empty).
pub fn args(cores: &[usize]) -> Vec<String> {
    if cores.is_empty() {
        return Vec::new();
    }
    let list: Vec<String> = cores.iter().map(ToString::to_string).collect();
    vec!["--cpus".to_owned(), list.join(",")]
}

/// Confines this process to `cores` (nothing when empty). Call it before any thread starts:
/// threads inherit the set of the thread that creates them.
pub fn confine_self(cores: &[usize]) -> std::io::Result<()> {
    if cores.is_empty() {
        return Ok(());
    }
    #[cfg(target_os = "linux")]
    {
        use nix::sched::{CpuSet, sched_setaffinity};
        use nix::unistd::Pid;
        let mut set = CpuSet::new();
        for &core in cores {
            set.set(core).map_err(std::io::Error::from)?;
        }
        sched_setaffinity(Pid::from_raw(0), &set).map_err(std::io::Error::from)
    }
    #[cfg(not(target_os = "linux"))]
    {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shop(instances: u32) -> Vec<(Service, u32)> {
        crate::up::BACKENDS
            .iter()
            .flat_map(|&s| std::iter::repeat_n((s, instances), instances as usize))
            .chain([(Service::Gateway, 1)])
            .collect()
    }

    fn loads(processes: &[(Service, u32)], sets: &[Vec<usize>], cores: usize) -> Vec<u32> {
        let mut load = vec![0; cores];
        for ((service, instances), set) in processes.iter().zip(sets) {
            assert_eq!(set.len(), 1, "one core each when cores are fewer");
            load[set[0]] += weight(*service) * 12 / instances;
        }
        load
    }

    #[test]
    fn on_two_cores_each_process_gets_one_and_the_load_is_even() {
        for instances in [1, 2] {
            let processes = shop(instances);
            let sets = assign(&processes, &[0, 1]);
            let load = loads(&processes, &sets, 2);
            let (low, high) = (load[0].min(load[1]), load[0].max(load[1]));
            assert!(
                high * 10 <= low * 12,
                "{load:?} for {instances} instance(s)"
            );
            // Replicas of the busiest service land on different cores.
            let orders: Vec<_> = processes
                .iter()
                .zip(&sets)
                .filter(|((s, _), _)| *s == Service::Orders)
                .map(|(_, set)| set[0])
                .collect();
            assert!(orders.len() == 1 || orders[0] != orders[1], "{orders:?}");
        }
    }

    #[test]
    fn the_cores_given_are_the_only_ones_used() {
        let processes = shop(1);
        let sets = assign(&processes, &[3, 5]);
        assert!(sets.iter().all(|s| s == &[3] || s == &[5]), "{sets:?}");
    }

    #[test]
    fn with_more_cores_than_processes_each_gets_a_disjoint_run_the_busiest_the_most() {
        let processes = shop(1);
        for cores in [9, 12, 20] {
            let allowed: Vec<usize> = (0..cores).collect();
            let sets = assign(&processes, &allowed);
            let mut all: Vec<usize> = sets.concat();
            all.sort_unstable();
            assert_eq!(all, allowed, "every core used once");
            assert!(sets.iter().all(|s| !s.is_empty()), "{sets:?}");
            assert!(
                sets.iter().all(|s| s.windows(2).all(|w| w[1] == w[0] + 1)),
                "runs of neighbours: {sets:?}"
            );
            let cores_of = |service: Service| {
                processes
                    .iter()
                    .zip(&sets)
                    .find(|((s, _), _)| *s == service)
                    .map(|(_, set)| set.len())
                    .expect("planned")
            };
            assert!(
                cores_of(Service::Orders) >= cores_of(Service::Inventory)
                    && cores_of(Service::Inventory) >= cores_of(Service::Users),
                "{cores} cores: {sets:?}"
            );
            assert!(cores_of(Service::Orders) >= 2, "{cores} cores: {sets:?}");
        }
    }

    #[test]
    fn only_two_cores_are_shared_out_unless_asked() {
        assert!(pin_by_default(&[0, 1]));
        assert!(!pin_by_default(&[0]));
        assert!(!pin_by_default(&[0, 1, 2, 3]));
        assert!(assign(&[], &[0, 1]).is_empty());
    }

    #[test]
    fn without_known_cores_nothing_is_pinned() {
        assert!(assign(&shop(1), &[]).iter().all(Vec::is_empty));
    }
}
