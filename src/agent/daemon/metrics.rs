//! Host metrics (CPU, memory, disk, uptime) from sysinfo. Sampling reads `/proc` and calls
//! `statvfs`, so the refresher runs it on a blocking thread; `/health` only reads the result.

use std::path::{Path, PathBuf};
use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, System};

/// One sample of the host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSample {
    /// CPU use since the previous sample, percent of all cores.
    pub cpu: f64,
    /// Total memory, MiB.
    pub memory_total_mb: f64,
    /// Memory in use, MiB.
    pub memory_used_mb: f64,
    /// Size of the disk, GiB.
    pub disk_total_gb: f64,
    /// Disk space in use, GiB.
    pub disk_used_gb: f64,
    /// The mount point the disk numbers are for; `None` when no disk holds the configured path.
    pub disk_mount: Option<PathBuf>,
    /// Seconds since the host booted.
    pub uptime_secs: u64,
}

impl HostSample {
    /// Memory in use, percent of the total (0 when the total is unknown).
    pub fn memory_percent(&self) -> f64 {
        pct(self.memory_used_mb, self.memory_total_mb)
    }
    /// Disk space in use, percent of the disk (0 when its size is unknown).
    pub fn disk_percent(&self) -> f64 {
        pct(self.disk_used_gb, self.disk_total_gb)
    }
}

fn pct(used: f64, total: f64) -> f64 {
    if total > 0.0 {
        used / total * 100.0
    } else {
        0.0
    }
}

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Keeps sysinfo's state between samples (CPU use is a difference of two readings).
pub struct Sampler {
    sys: Option<System>,
    last_cpu: std::time::Instant,
    disks: Option<Disks>,
    disk_path: PathBuf,
}

impl Sampler {
    /// A sampler for the disk holding `disk_path`.
    pub fn new(disk_path: &Path) -> Self {
        let mut sys = System::new().ok();
        if let Some(s) = sys.as_mut() {
            s.refresh_cpu_specifics(CpuRefreshKind::nothing().with_usage());
        }
        Self {
            sys,
            last_cpu: std::time::Instant::now(),
            disks: Disks::new_with_refreshed_list().ok(),
            disk_path: disk_path.to_path_buf(),
        }
    }

    /// Samples the host now (CPU use since the previous sample).
    pub fn sample(&mut self) -> HostSample {
        let mut out = HostSample {
            uptime_secs: System::uptime().unwrap_or(0),
            ..Default::default()
        };
        if let Some(sys) = self.sys.as_mut() {
            // CPU use is the difference of two readings; too close together they mean nothing.
            let since = self.last_cpu.elapsed();
            if since < sysinfo::MINIMUM_CPU_UPDATE_INTERVAL {
                std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL - since);
            }
            self.last_cpu = std::time::Instant::now();
            sys.refresh_cpu_specifics(CpuRefreshKind::nothing().with_usage());
            sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
            out.cpu = round1(f64::from(sys.global_cpu_usage()));
            let total = sys.total_memory() as f64;
            let used = total - sys.available_memory() as f64;
            out.memory_total_mb = (total / MIB).round();
            out.memory_used_mb = (used.max(0.0) / MIB).round();
        }
        if let Some(disks) = self.disks.as_mut() {
            disks.refresh(true);
            // The disk whose mount point is the longest prefix of the configured path.
            let best = disks
                .iter()
                .filter(|d| self.disk_path.starts_with(d.mount_point()))
                .max_by_key(|d| d.mount_point().as_os_str().len());
            if let Some(d) = best {
                let total = d.total_space() as f64;
                let used = total - d.available_space() as f64;
                out.disk_total_gb = round1(total / GIB);
                out.disk_used_gb = round1(used.max(0.0) / GIB);
                out.disk_mount = Some(d.mount_point().to_path_buf());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_host() {
        let mut s = Sampler::new(Path::new("/"));
        let a = s.sample();
        assert!(a.memory_total_mb > 0.0, "{a:?}");
        assert!(a.memory_used_mb <= a.memory_total_mb);
        assert!(a.uptime_secs > 0);
        assert!((0.0..=100.0).contains(&a.memory_percent()));
    }
}
