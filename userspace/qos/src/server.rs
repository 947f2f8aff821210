//! The daemon's unix-socket API server: root only, bounded requests, one
//! thread per connection, every request serialised on the shared [`Qos`].

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use blkio::BlkioError;
use emc::{EmcError, MemQuota};
use netqos::{NetError, NetQuota};
use qos_core::CgroupError;
use tracing::{debug, warn};

use crate::{
    Qos, QosError,
    protocol::{ApiError, ErrorKind, MAX_REQUEST, Reply, Request, Response},
};

/// A bound API socket; the file is removed on drop.
#[derive(Debug)]
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiSocket {
    /// Binds the socket (mode 0600). A stale socket file of a dead daemon is
    /// replaced; a live one is an error.
    pub fn bind(path: &Path) -> Result<Self, QosError> {
        let io = |source| QosError::Io {
            path: path.into(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(QosError::Io {
                    path: path.into(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "another qosd is listening here",
                    ),
                });
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        let listener = UnixListener::bind(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        Ok(Self {
            listener,
            path: path.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections until `stop` is set.
    pub fn serve(&self, qos: &Arc<Mutex<Qos>>, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let qos = Arc::clone(qos);
                    std::thread::spawn(move || handle(stream, &qos));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    warn!(error = %e, "accept");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn peer_uid(stream: &UnixStream) -> Option<u32> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|c| c.uid())
}

fn send(stream: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Err {
        error: ApiError {
            kind,
            message: message.into(),
        },
    }
}

fn handle(mut stream: UnixStream, qos: &Mutex<Qos>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    if peer_uid(&stream) != Some(0) {
        let _ = send(
            &mut stream,
            &error(ErrorKind::Denied, "only root may use the qosd API"),
        );
        return;
    }
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    loop {
        let mut line = Vec::new();
        let n = match (&mut reader)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(n) => n,
            Err(e) => {
                debug!(error = %e, "reading a request");
                return;
            }
        };
        if n == 0 {
            return;
        }
        if line.len() > MAX_REQUEST {
            lock_qos(qos).count_request(false);
            let _ = send(
                &mut stream,
                &error(
                    ErrorKind::Invalid,
                    format!("request larger than {MAX_REQUEST} bytes"),
                ),
            );
            return;
        }
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => {
                let mut guard = lock_qos(qos);
                let response = dispatch(&mut guard, req);
                guard.count_request(matches!(response, Response::Ok { .. }));
                response
            }
            Err(e) => {
                lock_qos(qos).count_request(false);
                error(ErrorKind::Invalid, format!("malformed request: {e}"))
            }
        };
        if send(&mut stream, &response).is_err() {
            return;
        }
    }
}

fn lock_qos(qos: &Mutex<Qos>) -> std::sync::MutexGuard<'_, Qos> {
    qos.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Executes one request.
pub fn dispatch(qos: &mut Qos, req: Request) -> Response {
    let result = match req {
        Request::Status => Ok(Reply::Status(Box::new(qos.status()))),
        Request::NetShow => qos.net_status().map(|s| Reply::Net(Box::new(s))),
        Request::NetSet {
            cgroup,
            rate,
            ceil,
            priority,
            ingress_rate,
            ingress_ceil,
        } => {
            let quota = NetQuota {
                rate,
                ceil,
                priority,
                ingress_rate,
                ingress_ceil,
            };
            qos.set_net_quota(&cgroup, quota)
                .map(|cgroup| Reply::NetApplied { cgroup, quota })
        }
        Request::NetUnset { cgroup } => qos.unset_net_quota(&cgroup).map(|_| Reply::Ok),
        Request::MemSet {
            cgroup,
            guarantee,
            limit,
            priority,
        } => {
            let quota = MemQuota {
                guarantee,
                limit,
                priority,
            };
            qos.set_mem_quota(&cgroup, quota)
                .map(|cgroup| Reply::MemApplied { cgroup, quota })
        }
        Request::MemUnset { cgroup } => qos.unset_mem_quota(&cgroup).map(|_| Reply::Ok),
        Request::MemShow => qos.mem_status().map(|s| Reply::Mem(Box::new(s))),
        Request::IoSet {
            cgroup,
            device,
            limits,
        } => qos
            .set_io_limits(&cgroup, &device, limits)
            .map(|(cgroup, device)| Reply::IoApplied {
                cgroup,
                device,
                limits,
            }),
        Request::IoUnset { cgroup, device } => qos
            .unset_io_limits(&cgroup, device.as_deref())
            .map(|_| Reply::Ok),
        Request::IoShow => qos.io_status().map(|s| Reply::Io(Box::new(s))),
        Request::Metrics => Ok(Reply::Metrics(Box::new(qos.snapshot()))),
    };
    match result {
        Ok(ok) => Response::Ok { ok },
        Err(e) => error(kind_of(&e), e.to_string()),
    }
}

/// The category a client sees for an error.
pub fn kind_of(e: &QosError) -> ErrorKind {
    match e {
        QosError::Cgroup(CgroupError::NotFound { .. } | CgroupError::NotADirectory { .. }) => {
            ErrorKind::NotFound
        }
        QosError::Cgroup(
            CgroupError::Io { .. } | CgroupError::NoCgroups(_) | CgroupError::NoCgroup2,
        ) => ErrorKind::Internal,
        QosError::Cgroup(_) => ErrorKind::Invalid,
        QosError::Net(NetError::InvalidQuota(_)) => ErrorKind::Invalid,
        // A full class table is a capacity refusal too.
        QosError::Net(NetError::Admission(_) | NetError::NoSlots(_)) => ErrorKind::Admission,
        QosError::Net(NetError::NotConfigured(_)) => ErrorKind::NotFound,
        QosError::NetNotConfigured | QosError::MemNotConfigured | QosError::IoNotConfigured => {
            ErrorKind::NotConfigured
        }
        QosError::Mem(EmcError::Invalid { .. } | EmcError::Tuning(_)) => ErrorKind::Invalid,
        QosError::Mem(EmcError::Admission(_)) => ErrorKind::Admission,
        QosError::Mem(EmcError::NotFound { .. } | EmcError::NotConfigured(_)) => {
            ErrorKind::NotFound
        }
        QosError::Mem(EmcError::Cgroup(
            CgroupError::Io { .. } | CgroupError::NoCgroups(_) | CgroupError::NoCgroup2,
        )) => ErrorKind::Internal,
        QosError::Mem(EmcError::Cgroup(_)) => ErrorKind::Invalid,
        QosError::Blkio(BlkioError::Policy(_) | BlkioError::Device { .. }) => ErrorKind::Invalid,
        QosError::Blkio(BlkioError::NoCgroup { .. } | BlkioError::NotConfigured { .. }) => {
            ErrorKind::NotFound
        }
        QosError::Blkio(BlkioError::Cgroup(
            CgroupError::Io { .. } | CgroupError::NoCgroups(_) | CgroupError::NoCgroup2,
        )) => ErrorKind::Internal,
        QosError::Blkio(BlkioError::Cgroup(_)) => ErrorKind::Invalid,
        // Io, Tracker, Btf, Unsupported: the kernel or the host.
        _ => ErrorKind::Internal,
    }
}
