//! What the agent stores per instance (`<state>/instances/<id>/record.json`)
//! to pick the instance up again after its own restart: the spec, the disks,
//! the VMM to re-adopt, a remake or a spawn in progress, the crash-loop
//! history.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::lifecycle::{InstanceState, Transition};
use crate::backend::disks::{DiskSet, PreparedDisks};
use crate::backend::guest::GuestEndpoint;
use crate::backend::vmm::VmmRecord;
use crate::spec::InstanceSpec;
use crate::util::{read_json, write_json_atomic, ReadJsonError};

/// What is stored per instance in `<state>/instances/<id>/record.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Format version.
    pub version: u32,
    /// The spec.
    pub spec: InstanceSpec,
    /// The state when written.
    pub state: InstanceState,
    /// The disks, once made.
    pub disks: Option<PreparedDisks>,
    /// The VMM, while one runs.
    pub vmm: Option<VmmRecord>,
    /// An update's disks being remade: the disks before it, and which of
    /// them are stale. Set while `disks` is `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaking: Option<PendingRemake>,
    /// A VMM is being spawned and is not recorded yet: after an agent
    /// restart, look for it ([`crate::backend::VmmLauncher::recover`]) before starting
    /// another over the same disks.
    #[serde(default)]
    pub launching: bool,
    /// The guest endpoint.
    pub guest: GuestEndpoint,
    /// Restarts so far.
    pub restarts: u32,
    /// Recent transitions.
    pub history: Vec<Transition>,
    /// The crash-loop guard's failures inside its window, as ages in ms at
    /// `written_unix_ms`: an agent restart neither forgets a crash loop nor
    /// restarts an instance the guard failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failure_ages_ms: Vec<u64>,
    /// The last error shown for the instance (cleared when it is ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The instance's network (its slot of the instance subnet), kept
    /// across agent restarts; none when the node has no instance subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<crate::network::InstanceNet>,
    /// When the record was written (ms since the Unix epoch; 0 in records
    /// from before this field).
    #[serde(default)]
    pub written_unix_ms: u64,
}

/// An update's remake in progress (see [`InstanceRecord::remaking`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRemake {
    /// The disks before the update.
    pub disks: PreparedDisks,
    /// The ones to make again.
    pub stale: DiskSet,
}

/// The version [`InstanceRecord::version`] is written with.
pub const RECORD_VERSION: u32 = 1;

/// The record's file in an instance directory.
pub fn record_path(instance_dir: &Path) -> PathBuf {
    instance_dir.join("record.json")
}

/// Why a record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Reading failed.
    #[error("cannot read {path}: {source}; check the state directory")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a record.
    #[error("{path} is not a valid instance record: {why}; move it away to start without it")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

impl InstanceRecord {
    /// Reads `<instance_dir>/record.json`; `None` when there is none.
    pub fn read(instance_dir: &Path) -> Result<Option<InstanceRecord>, RecordError> {
        let path = record_path(instance_dir);
        read_json(&path).map_err(|e| match e {
            ReadJsonError::Io(source) => RecordError::Io { path, source },
            ReadJsonError::Corrupt(e) => RecordError::Corrupt {
                path,
                why: e.to_string(),
            },
        })
    }

    /// Writes it atomically to `<instance_dir>/record.json`.
    pub fn write(&self, instance_dir: &Path) -> std::io::Result<()> {
        write_json_atomic(&record_path(instance_dir), self)
    }
}

/// How a task starts.
pub(crate) enum StartMode {
    /// A new instance.
    New,
    /// Picked up from its record after an agent restart.
    Resume(Box<InstanceRecord>),
}
