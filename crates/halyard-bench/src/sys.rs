//! Process-level measurements: the tool's own CPU time, and the open-file limit.

use std::time::Instant;

/// User and system CPU time of this process at one instant.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    /// When the sample was taken.
    pub at: Instant,
    /// User CPU seconds since the process started.
    pub user_s: f64,
    /// System CPU seconds since the process started.
    pub sys_s: f64,
}

fn timeval_s(tv: libc::timeval) -> f64 {
    tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6
}

impl CpuSample {
    /// Samples `getrusage(RUSAGE_SELF)` (all threads of the process).
    pub fn now() -> CpuSample {
        // SAFETY: `getrusage` only writes into the zero-initialised struct we pass.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a `rusage`; RUSAGE_SELF is always a valid `who`.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        let at = Instant::now();
        if rc != 0 {
            return CpuSample {
                at,
                user_s: 0.0,
                sys_s: 0.0,
            };
        }
        CpuSample {
            at,
            user_s: timeval_s(usage.ru_utime),
            sys_s: timeval_s(usage.ru_stime),
        }
    }

    /// CPU used between `earlier` and `self`, as (user s, sys s, wall s, cores busy).
    pub fn since(&self, earlier: &CpuSample) -> CpuUse {
        let wall_s = self.at.saturating_duration_since(earlier.at).as_secs_f64();
        let user_s = (self.user_s - earlier.user_s).max(0.0);
        let sys_s = (self.sys_s - earlier.sys_s).max(0.0);
        CpuUse {
            user_s,
            sys_s,
            wall_s,
            cores: if wall_s > 0.0 {
                (user_s + sys_s) / wall_s
            } else {
                0.0
            },
        }
    }
}

/// CPU used over an interval.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CpuUse {
    /// User CPU seconds.
    pub user_s: f64,
    /// System CPU seconds.
    pub sys_s: f64,
    /// Wall-clock seconds of the interval.
    pub wall_s: f64,
    /// (user + sys) / wall: 1.0 means one core fully busy.
    pub cores: f64,
}

/// Raises the soft open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: plain libc calls on a stack-allocated, zero-initialised `rlimit`.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                return wanted.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

/// Number of CPUs this process may run on.
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Peak resident set (`VmHWM` in `/proc/PID/status`) of process `pid`, KiB; `None` if it is
/// gone or this is not Linux.
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}
