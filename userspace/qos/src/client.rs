//! Client side of the socket API (used by `qosctl`, usable by any tool).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::protocol::{ApiError, ErrorKind, Reply, Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "qosd is not running (no daemon listens on {0}); start it with `systemctl start qosd` or `qosd --config FILE`"
    )]
    NotRunning(PathBuf),
    #[error("permission denied on {0}: the qosd API is for root only")]
    Denied(PathBuf),
    #[error("talking to qosd on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("qosd sent an unreadable reply: {0}")]
    Protocol(String),
    #[error("{}", .0.message)]
    Api(ApiError),
}

impl ClientError {
    /// Exit status for command-line tools: 2 bad input, 3 not found,
    /// 4 admission refused, 5 daemon unavailable, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::NotRunning(_) | Self::Denied(_) => 5,
            Self::Api(ApiError { kind, .. }) => match kind {
                ErrorKind::Invalid => 2,
                ErrorKind::NotFound => 3,
                ErrorKind::Admission => 4,
                ErrorKind::NotConfigured | ErrorKind::Denied => 5,
                ErrorKind::Internal => 1,
            },
            _ => 1,
        }
    }
}

#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(path.into())
            }
            std::io::ErrorKind::PermissionDenied => ClientError::Denied(path.into()),
            _ => ClientError::Io {
                path: path.into(),
                source: e,
            },
        })?;
        let io = |source| ClientError::Io {
            path: path.into(),
            source,
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io)?;
        let reader = BufReader::new(stream.try_clone().map_err(io)?);
        Ok(Self {
            path: path.into(),
            stream,
            reader,
        })
    }

    pub fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.stream.write_all(&line).map_err(io)?;
        let mut reply = String::new();
        let n = self.reader.read_line(&mut reply).map_err(io)?;
        if n == 0 {
            return Err(ClientError::Protocol(
                "connection closed without a reply".into(),
            ));
        }
        match serde_json::from_str::<Response>(&reply)
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            Response::Ok { ok } => Ok(ok),
            Response::Err { error } if error.kind == ErrorKind::Denied => {
                Err(ClientError::Denied(self.path.clone()))
            }
            Response::Err { error } => Err(ClientError::Api(error)),
        }
    }
}
