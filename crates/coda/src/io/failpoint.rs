//! Named crash points for the kill -9 tests: with the `failpoints` feature, the process kills
//! itself with SIGKILL (no destructor or cleanup runs, as with `kill -9`) when the environment
//! variable `CODA_FAILPOINT` names the point reached (`NAME` or `NAME@STEP`). Without the
//! feature (every shipped build) the calls compile to nothing.

/// Reached point `name` at training update `step` (0 where there is no step).
#[inline(always)]
pub fn failpoint(name: &str, step: u64) {
    #[cfg(feature = "failpoints")]
    if let Ok(v) = std::env::var("CODA_FAILPOINT") {
        if v == name || v == format!("{name}@{step}") {
            // SAFETY: signalling our own process.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = (name, step);
}
