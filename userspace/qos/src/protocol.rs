//! The daemon's socket API: one JSON request per line, one JSON response per
//! line. Requests larger than [`MAX_REQUEST`] are refused.

use blkio::{Device, IoLimits, IoStatus};
use emc::{MemQuota, MemStatus};
use netqos::{NetQuota, NetStatus};
use qos_core::{Rate, Size};
use serde::{Deserialize, Serialize};

use crate::Status;

pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    /// Replaces the cgroup's quota in both directions.
    NetSet {
        cgroup: String,
        #[serde(default)]
        rate: Option<Rate>,
        #[serde(default)]
        ceil: Option<Rate>,
        #[serde(default)]
        priority: u32,
        #[serde(default)]
        ingress_rate: Option<Rate>,
        #[serde(default)]
        ingress_ceil: Option<Rate>,
    },
    NetUnset {
        cgroup: String,
    },
    NetShow,
    /// Replaces the cgroup's memory quota.
    MemSet {
        cgroup: String,
        guarantee: Size,
        #[serde(default)]
        limit: Option<Size>,
        #[serde(default)]
        priority: u32,
    },
    MemUnset {
        cgroup: String,
    },
    MemShow,
    /// Replaces the cgroup's IO limits on one device.
    IoSet {
        cgroup: String,
        /// `/dev/loop3` or `7:3`.
        device: String,
        #[serde(flatten)]
        limits: IoLimits,
    },
    /// Removes the cgroup's IO limits on one device, or on all.
    IoUnset {
        cgroup: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
    },
    IoShow,
    /// Every per-cgroup counter and the daemon's health (`qosctl top`).
    Metrics,
}

/// Error categories a client can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request was malformed or a value was refused.
    Invalid,
    /// The cgroup does not exist or has no quota.
    NotFound,
    /// The guarantee does not fit the capacity.
    Admission,
    /// The subsystem is not configured on this host.
    NotConfigured,
    /// Only root may use the API.
    Denied,
    /// A kernel or I/O failure.
    Internal,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok,
    Status(Box<Status>),
    Net(Box<NetStatus>),
    /// The quota as applied (cgroup name canonicalised).
    NetApplied {
        cgroup: String,
        quota: NetQuota,
    },
    Mem(Box<MemStatus>),
    /// The memory quota as applied (cgroup name canonicalised).
    MemApplied {
        cgroup: String,
        quota: MemQuota,
    },
    Io(Box<IoStatus>),
    Metrics(Box<crate::metrics::Snapshot>),
    /// The IO limits as applied (cgroup name canonicalised, device by
    /// number).
    IoApplied {
        cgroup: String,
        device: Device,
        limits: IoLimits,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Response {
    Ok { ok: Reply },
    Err { error: ApiError },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        let r: Request = serde_json::from_str(
            r#"{"op":"net_set","cgroup":"a/b","rate":"100mbit","priority":1}"#,
        )
        .expect("parse");
        assert_eq!(
            r,
            Request::NetSet {
                cgroup: "a/b".into(),
                rate: Some("100mbit".parse().expect("rate")),
                ceil: None,
                priority: 1,
                ingress_rate: None,
                ingress_ceil: None,
            }
        );
        let r: Request = serde_json::from_str(
            r#"{"op":"net_set","cgroup":"c","ingress_rate":"1gbit","ingress_ceil":"2gbit"}"#,
        )
        .expect("parse ingress");
        let Request::NetSet {
            rate, ingress_rate, ..
        } = r
        else {
            panic!("not net_set: {r:?}");
        };
        assert_eq!(rate, None);
        assert_eq!(ingress_rate.map(|r| r.to_string()), Some("1gbit".into()));
        let e = serde_json::from_str::<Request>(r#"{"op":"net_set","cgroup":"a","rate":"lots"}"#)
            .expect_err("bad rate")
            .to_string();
        assert!(e.contains("not a rate"), "{e}");
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        let r: Request =
            serde_json::from_str(r#"{"op":"mem_set","cgroup":"c","guarantee":"1G","limit":"2G"}"#)
                .expect("mem_set");
        assert_eq!(
            r,
            Request::MemSet {
                cgroup: "c".into(),
                guarantee: "1GiB".parse().expect("size"),
                limit: Some("2048M".parse().expect("size")),
                priority: 0,
            }
        );
        let e = serde_json::from_str::<Request>(r#"{"op":"mem_set","cgroup":"c","guarantee":"0"}"#)
            .expect_err("zero")
            .to_string();
        assert!(e.contains("zero"), "{e}");
        let e = serde_json::from_str::<Request>(r#"{"op":"mem_set","cgroup":"c"}"#)
            .expect_err("no guarantee")
            .to_string();
        assert!(e.contains("guarantee"), "{e}");
        let s = serde_json::to_string(&Request::NetUnset { cgroup: "x".into() }).expect("ser");
        assert_eq!(s, r#"{"op":"net_unset","cgroup":"x"}"#);
    }

    #[test]
    fn io_wire_format() {
        let r: Request = serde_json::from_str(
            r#"{"op":"io_set","cgroup":"a","device":"7:3","write_bps":"10MiB","read_iops":300,"weight":50}"#,
        )
        .expect("io_set");
        let limits = IoLimits {
            write_bps: Some("10MiB".parse().expect("rate")),
            read_iops: Some(300),
            weight: Some(50),
            ..IoLimits::default()
        };
        assert_eq!(
            r,
            Request::IoSet {
                cgroup: "a".into(),
                device: "7:3".into(),
                limits,
            }
        );
        // Flattened limits serialise beside the other fields and read back.
        let s = serde_json::to_string(&r).expect("ser");
        assert_eq!(
            s,
            r#"{"op":"io_set","cgroup":"a","device":"7:3","write_bps":"10MiB","read_iops":300,"weight":50}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).expect("de"), r);
        // Bytes per second as a plain number too.
        let r: Request = serde_json::from_str(
            r#"{"op":"io_set","cgroup":"a","device":"/dev/x","read_bps":4096}"#,
        )
        .expect("number");
        let Request::IoSet { limits, .. } = r else {
            panic!("not io_set: {r:?}");
        };
        assert_eq!(limits.read_bps.map(|r| r.bytes_per_sec()), Some(4096));
        for (bad, says) in [
            (
                r#"{"op":"io_set","cgroup":"a","device":"7:3","write_bsp":"1M"}"#,
                "write_bsp",
            ),
            (
                r#"{"op":"io_set","cgroup":"a","device":"7:3","write_bps":"0"}"#,
                "zero",
            ),
            (
                r#"{"op":"io_set","cgroup":"a","device":"7:3","write_bps":"fast"}"#,
                "invalid byte rate 'fast'",
            ),
            (r#"{"op":"io_set","cgroup":"a","weight":5}"#, "device"),
        ] {
            let e = serde_json::from_str::<Request>(bad)
                .expect_err(bad)
                .to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let s = serde_json::to_string(&Request::IoUnset {
            cgroup: "a".into(),
            device: None,
        })
        .expect("ser");
        assert_eq!(s, r#"{"op":"io_unset","cgroup":"a"}"#);
        let r: Request = serde_json::from_str(r#"{"op":"io_unset","cgroup":"a","device":"7:3"}"#)
            .expect("io_unset");
        assert_eq!(
            r,
            Request::IoUnset {
                cgroup: "a".into(),
                device: Some("7:3".into()),
            }
        );
        let reply = Reply::IoApplied {
            cgroup: "a".into(),
            device: Device { major: 7, minor: 3 },
            limits,
        };
        let s = serde_json::to_string(&Response::Ok { ok: reply.clone() }).expect("ser");
        assert!(s.contains(r#""device":"7:3""#), "{s}");
        assert_eq!(
            serde_json::from_str::<Response>(&s).expect("de"),
            Response::Ok { ok: reply }
        );
    }

    #[test]
    fn response_wire_format() {
        let ok = serde_json::to_string(&Response::Ok { ok: Reply::Ok }).expect("ser");
        assert_eq!(ok, r#"{"ok":"ok"}"#);
        let err = Response::Err {
            error: ApiError {
                kind: ErrorKind::Admission,
                message: "m".into(),
            },
        };
        let s = serde_json::to_string(&err).expect("ser");
        assert_eq!(serde_json::from_str::<Response>(&s).expect("de"), err);
    }
}
