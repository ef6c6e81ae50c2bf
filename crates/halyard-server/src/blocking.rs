//! Running store I/O from async code without stalling the runtime.

/// Runs `f`, which may block on I/O, handing the worker over on a multi-threaded runtime.
pub(crate) fn blocking<T>(may_block: bool, f: impl FnOnce() -> T) -> T {
    let flavor = tokio::runtime::Handle::current().runtime_flavor();
    if may_block && flavor == tokio::runtime::RuntimeFlavor::MultiThread {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}
