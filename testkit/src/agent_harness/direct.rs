//! One test-guest VM spawned straight from `reddog-vmm`, no agent: its
//! `VmConfig` built by the agent's launcher code over disks made beforehand,
//! with our own listener on its vsock socket (the benchmarks' reference),
//! and the guest-protocol helpers it reads and writes frames with.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent::backend::disks::DiskRequest;
use agent::backend::process::{ProcessLauncher, ProcessLauncherConfig};
use agent::backend::vhd_disks::VhdDiskPreparer;
use agent::backend::vmm::LaunchSpec;
use agent::node::DEFAULT_GUEST_PORT;
use agent::DiskPreparer;
use guest_proto::{Decoded, Frame, GuestMsg, HostMsg, StreamDecoder, MAX_FRAME_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::HarnessError;

/// Encodes a guest message at protocol version 1.
pub fn encode_guest(msg: &GuestMsg<'_>) -> Result<Vec<u8>, HarnessError> {
    let mut out = [0u8; MAX_FRAME_LEN];
    let n = msg
        .encode(1, &mut out)
        .map_err(|e| HarnessError::Failed(format!("encoding {msg:?}: {e}")))?;
    Ok(out[..n].to_vec())
}

/// Encodes a host message at protocol version 1.
pub fn encode_host(msg: &HostMsg) -> Result<Vec<u8>, HarnessError> {
    let mut out = [0u8; MAX_FRAME_LEN];
    let n = msg
        .encode(1, &mut out)
        .map_err(|e| HarnessError::Failed(format!("encoding {msg:?}: {e}")))?;
    Ok(out[..n].to_vec())
}

/// What the host side of [`DirectVm`] saw.
#[derive(Debug, Clone, Copy)]
pub enum Seen {
    /// `Hello`.
    Hello,
    /// A heartbeat with this sequence number.
    Heartbeat(u64),
    /// `Ready`.
    Ready,
    /// Something else (skipped).
    Other,
}

/// Reads the next guest frame from `s`.
pub async fn read_guest_frame(
    s: &mut UnixStream,
    dec: &mut StreamDecoder,
) -> Result<Seen, HarnessError> {
    loop {
        match dec.next_frame::<GuestMsg>() {
            Decoded::NeedMore { .. } => {}
            Decoded::Error { error, .. } => {
                return Err(HarnessError::Failed(format!(
                    "bad frame from the guest: {error}"
                )))
            }
            Decoded::Frame {
                frame: Frame::Known { msg, .. },
                ..
            } => {
                return Ok(match msg {
                    GuestMsg::Hello(_) => Seen::Hello,
                    GuestMsg::Heartbeat(h) => Seen::Heartbeat(h.seq),
                    GuestMsg::Ready => Seen::Ready,
                    _ => Seen::Other,
                })
            }
            Decoded::Frame { .. } => return Ok(Seen::Other),
        }
        let n = s
            .read(dec.spare_mut())
            .await
            .map_err(HarnessError::io("reading from the guest"))?;
        if n == 0 {
            return Err(HarnessError::Failed(
                "the guest closed the connection".into(),
            ));
        }
        dec.commit(n);
    }
}

/// One test-guest VM spawned straight from `reddog-vmm` (no agent): its own
/// `VmConfig` built by the agent's launcher code over disks made beforehand.
pub struct DirectVm {
    child: tokio::process::Child,
    stream: Option<UnixStream>,
    dec: StreamDecoder,
    /// Before the spawn.
    pub t0: Instant,
    /// Spawn returned.
    pub spawned: Duration,
    /// `Hello` read.
    pub hello: Option<Duration>,
    /// First heartbeat read.
    pub first_heartbeat: Option<Duration>,
}

/// A prepared direct VM: its directory, `vm.json` and vsock socket.
#[derive(Debug, Clone)]
pub struct DirectSetup {
    /// Its directory.
    pub dir: PathBuf,
    /// The `VmConfig`.
    pub config: PathBuf,
    /// The VMM's vsock socket.
    pub uds: PathBuf,
}

impl DirectSetup {
    /// Makes the three disks (as the agent does: qcow2 overlay over `base`,
    /// ext4 resource and role disks) and the `VmConfig` the agent's launcher
    /// would write for it, under `dir`.
    pub async fn prepare(
        dir: &Path,
        name: &str,
        base: &Path,
        role: &Path,
        memory_mib: u32,
        launcher: &ProcessLauncherConfig,
    ) -> Result<Self, HarnessError> {
        let vdir = dir.join(name);
        std::fs::create_dir_all(vdir.join("disks"))
            .map_err(HarnessError::io("making the direct VM's directory"))?;
        let disks = VhdDiskPreparer
            .prepare(&DiskRequest {
                instance_id: name.into(),
                role: "bench".into(),
                env: Default::default(),
                dir: vdir.join("disks"),
                base: base.to_path_buf(),
                base_format: vmm_api::DiskFormat::Raw,
                role_package: role.to_path_buf(),
                resource_disk_bytes: 16 << 20,
                net: None,
            })
            .await
            .map_err(HarnessError::agent("making the direct VM's disks"))?;
        let uds = vdir.join("v.vsock");
        let spec = LaunchSpec {
            instance_id: name.into(),
            dir: vdir.clone(),
            vcpus: 1,
            memory_mib,
            disks: disks.in_order(),
            vsock: vmm_api::VsockConfig {
                guest_cid: vmm_api::config::MIN_GUEST_CID,
                uds_path: uds.clone(),
            },
            guest_port: DEFAULT_GUEST_PORT,
            serial_path: vdir.join("serial.log"),
            net: None,
        };
        let cfg = ProcessLauncher::new(launcher.clone()).vm_config(&spec);
        cfg.validate()
            .map_err(HarnessError::agent("the launcher's VmConfig"))?;
        let config = vdir.join("vm.json");
        let json =
            serde_json::to_vec_pretty(&cfg).map_err(HarnessError::agent("encoding vm.json"))?;
        std::fs::write(&config, json).map_err(HarnessError::io("writing vm.json"))?;
        Ok(Self {
            dir: vdir,
            config,
            uds,
        })
    }
}

impl DirectVm {
    /// Listens on `<uds>_<port>`, spawns `reddog-vmm --config`, and waits for
    /// the guest's connection (bounded by `limit`).
    pub async fn start(
        vmm: &Path,
        setup: &DirectSetup,
        limit: Duration,
    ) -> Result<Self, HarnessError> {
        let mut listen = setup.uds.clone().into_os_string();
        listen.push(format!("_{DEFAULT_GUEST_PORT}"));
        let listen = PathBuf::from(listen);
        let _ = std::fs::remove_file(&setup.uds);
        let _ = std::fs::remove_file(&listen);
        let listener = UnixListener::bind(&listen).map_err(HarnessError::io(format!(
            "listening on {}",
            listen.display()
        )))?;
        let log = std::fs::File::create(setup.dir.join("vmm.log"))
            .map_err(HarnessError::io("creating vmm.log"))?;
        let log2 = log.try_clone().map_err(HarnessError::io("vmm.log"))?;
        let t0 = Instant::now();
        let child = tokio::process::Command::new(vmm)
            .arg("--config")
            .arg(&setup.config)
            .arg("--exit-report")
            .arg(setup.dir.join("exit-report.json"))
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .map_err(HarnessError::io(format!("spawning {}", vmm.display())))?;
        let spawned = t0.elapsed();
        let mut vm = Self {
            child,
            stream: None,
            dec: StreamDecoder::new(),
            t0,
            spawned,
            hello: None,
            first_heartbeat: None,
        };
        let accepted = tokio::time::timeout(limit, listener.accept()).await;
        match accepted {
            Ok(Ok((s, _))) => vm.stream = Some(s),
            Ok(Err(e)) => return Err(HarnessError::io("accepting the guest")(e)),
            Err(_) => {
                let _ = vm.child.start_kill();
                return Err(HarnessError::Failed(format!(
                    "the guest did not connect within {limit:?}; see {}",
                    setup.dir.display()
                )));
            }
        }
        Ok(vm)
    }

    /// Reads `Hello`, answers `HelloAck` and reads up to the first heartbeat.
    pub async fn first_heartbeat(
        &mut self,
        interval_ms: u32,
        limit: Duration,
    ) -> Result<(), HarnessError> {
        let t0 = self.t0;
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| HarnessError::Failed("not connected".into()))?;
        let dec = &mut self.dec;
        let mut hello = None;
        let fut = async {
            loop {
                match read_guest_frame(stream, dec).await? {
                    Seen::Hello => {
                        hello = Some(t0.elapsed());
                        let ack = encode_host(&HostMsg::HelloAck(guest_proto::HelloAck {
                            version: 1,
                            heartbeat_interval_ms: interval_ms,
                        }))?;
                        stream
                            .write_all(&ack)
                            .await
                            .map_err(HarnessError::io("writing HelloAck"))?;
                    }
                    Seen::Heartbeat(_) => return Ok::<_, HarnessError>(t0.elapsed()),
                    Seen::Ready | Seen::Other => {}
                }
            }
        };
        let hb = tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| HarnessError::Failed(format!("no heartbeat within {limit:?}")))??;
        self.hello = hello;
        self.first_heartbeat = Some(hb);
        if self.hello.is_none() {
            return Err(HarnessError::Failed("a heartbeat before Hello".into()));
        }
        Ok(())
    }

    /// Asks the guest to shut down (`Shutdown`: ACPI power-off) and waits for
    /// the VMM to exit; kills it after `limit`. Returns the exit status.
    pub async fn shutdown(
        mut self,
        limit: Duration,
    ) -> Result<std::process::ExitStatus, HarnessError> {
        if let Some(s) = self.stream.as_mut() {
            let msg = encode_host(&HostMsg::Shutdown(guest_proto::Shutdown {
                deadline_ms: 1000,
            }))?;
            let _ = s.write_all(&msg).await;
        }
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(r) => r.map_err(HarnessError::io("waiting for the VMM")),
            Err(_) => {
                let _ = self.child.start_kill();
                let st = self
                    .child
                    .wait()
                    .await
                    .map_err(HarnessError::io("waiting for the killed VMM"))?;
                Err(HarnessError::Failed(format!(
                    "the VMM did not exit within {limit:?} of Shutdown (killed: {st})"
                )))
            }
        }
    }
}
