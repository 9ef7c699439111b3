//! A SIGTERM that arrives before anything awaits the shutdown signal (a service still
//! migrating its database when a rolling restart reaches it) is seen, not fatal: without
//! handlers installed up front, its default action would end this process. Its own test
//! binary: the handler it installs stays for the life of the process.

#[tokio::test]
async fn a_sigterm_during_start_up_is_caught_by_the_shutdown_signal() {
    let signal = shopmesh_runtime::shutdown_signal();
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).expect("raise SIGTERM");
    tokio::time::timeout(std::time::Duration::from_secs(10), signal)
        .await
        .expect("the shutdown signal completes");
}
