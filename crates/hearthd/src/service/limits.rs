//! What one host takes on: machines in all, boots at once, and the size of each machine. Past a
//! limit a request gets a clear answer before any work starts: 409 when the host is full (a
//! delete makes room), 429 when too many boots are under way (a retry soon succeeds), 400 for a
//! machine larger than this host allows.

use super::Service;
use crate::error::{Error, Result};
use crate::store::MachineRecord;
use tokio::sync::OwnedSemaphorePermit;

impl Service {
    /// A place among the boots under way (creates, restores, forks, starts), held until the
    /// operation ends; 429 past `--max-concurrent-boots`.
    pub(super) fn boot_permit(&self) -> Result<OwnedSemaphorePermit> {
        self.boots.clone().try_acquire_owned().map_err(|_| {
            let n = self.cfg.max_concurrent_boots;
            Error::busy(format!(
                "{n} boots (creates, restores, forks, starts) are under way, the most this host \
                 runs at once (--max-concurrent-boots {n}); try again when one has finished"
            ))
        })
    }

    /// 409 when the host already has `--max-machines` machines.
    pub(super) fn check_room(&self) -> Result<()> {
        let max = self.cfg.max_machines;
        let n = self.store.machine_count()?;
        if n >= max {
            return Err(Error::conflict(format!(
                "this host has {n} machines, the most it keeps (--max-machines {max}); delete \
                 one first"
            )));
        }
        Ok(())
    }

    /// Inserts the record of a new machine unless the host is full; checked and inserted under
    /// one lock, so that operations racing for the last place do not both get it.
    pub(super) fn insert_new_machine(&self, rec: &MachineRecord) -> Result<()> {
        let _admit = self.admit.lock().unwrap_or_else(|e| e.into_inner());
        self.check_room()?;
        self.store.insert_machine(rec)
    }

    /// A machine's memory, vCPUs and disk against what this host allows one machine.
    pub(super) fn check_size(&self, memory_mib: u32, vcpus: u32, storage_bytes: u64) -> Result<()> {
        let max_memory = self.cfg.max_memory_mib();
        if !(MIN_MEMORY_MIB..=max_memory).contains(&memory_mib) {
            return Err(Error::invalid(format!(
                "memory_mib {memory_mib}: a machine has between {MIN_MEMORY_MIB} and {max_memory} \
                 MiB on this host (--max-memory-mib)"
            )));
        }
        let max_vcpus = self.cfg.max_vcpus();
        if !(1..=max_vcpus).contains(&vcpus) {
            return Err(Error::invalid(format!(
                "vcpus {vcpus}: a machine has between 1 and {max_vcpus} on this host (--max-vcpus)"
            )));
        }
        let max_storage = self.cfg.max_storage_bytes;
        if storage_bytes > max_storage {
            return Err(Error::invalid(format!(
                "storage_bytes {storage_bytes}: a machine's disk is at most {max_storage} bytes \
                 on this host (--max-storage-bytes)"
            )));
        }
        Ok(())
    }
}

/// Less than this and the default kernel does not boot.
const MIN_MEMORY_MIB: u32 = 64;
