//! What the operating system says about this process's memory: resident
//! set and its peak (`/proc/self/status`), available memory
//! (`/proc/meminfo`) and an address-space limit.

/// Limits the address space of this process (`RLIMIT_AS`) to `bytes`: a
/// backstop for processes without [`crate::alloc::Counting`]. Allocations beyond it
/// fail instead of pushing the machine into swap or the OOM killer.
pub fn limit_address_space(bytes: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: a plain system call with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peak resident set of this process (VmHWM), in bytes.
pub fn peak_rss() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

/// Resident set of this process now (VmRSS), in bytes.
pub fn current_rss() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

/// Resets the peak resident set (VmHWM) to the current one (Linux
/// `/proc/self/clear_refs`); false where that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes of one core's L2 cache (sysfs; 1 MiB where it cannot be read).
pub fn l2_cache_bytes() -> u64 {
    let read = |index: u32| {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{index}");
        let level = std::fs::read_to_string(format!("{dir}/level")).ok()?;
        if level.trim() != "2" {
            return None;
        }
        let size = std::fs::read_to_string(format!("{dir}/size")).ok()?;
        let size = size.trim();
        let (digits, scale) = match size.strip_suffix('K') {
            Some(d) => (d, 1 << 10),
            None => match size.strip_suffix('M') {
                Some(d) => (d, 1 << 20),
                None => (size, 1),
            },
        };
        digits.parse::<u64>().ok().map(|n| n * scale)
    };
    (0..8).find_map(read).unwrap_or(1 << 20)
}

/// Memory the kernel says is available for new work (MemAvailable), in bytes.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}
