//! The fq qdisc that ingress ACK pacing needs on the shaped interface.
//!
//! A receiver can only slow a TCP sender as far as two segments per round
//! trip by marking or clamping; on short round trips that is faster than
//! most shares. Holding the receiver's ACKs until the flow's rate allows
//! them (an earliest departure time set by the datapath) slows the sender
//! to exactly that rate, whatever the round trip. The kernel honours such
//! times only in the fq qdisc, so qosd puts fq at the interface's root when
//! the root is the kernel's default (handle `0:`): one fq, or one per
//! transmit queue under mq. It never replaces a qdisc someone configured.
//!
//! Ours is told apart by its handle, [`OUR_HANDLE`]; `qosd --cleanup`
//! removes it (the kernel's default comes back), a restart keeps it.
//!
//! The qdiscs are read and changed over rtnetlink (no `tc` binary needed);
//! the kernel's extended ack, when it sends one, is kept in the error.

use std::{io, path::Path};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcHandle, TcHeader, TcMessage, TcOption},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tracing::{info, warn};

/// Handle of the root qdisc qosd installs (major 0x7105, as `tc` prints it:
/// `7105:`).
pub const OUR_HANDLE: u32 = 0x7105_0000;
/// Packets one flow may hold in fq (the default, 100, is a few
/// milliseconds of ACKs of a fast flow without GRO).
const FLOW_LIMIT: u32 = 1000;
/// fq's attribute for [`FLOW_LIMIT`] (`TCA_FQ_FLOW_PLIMIT` in
/// `linux/pkt_sched.h`).
const TCA_FQ_FLOW_PLIMIT: u16 = 2;
/// The root of a device (`TC_H_ROOT`).
const TC_H_ROOT: u32 = u32::MAX;

/// The root qdisc of an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootQdisc {
    pub kind: String,
    /// As `tc` prints it (`7105:`, `0:`).
    pub handle: String,
}

impl RootQdisc {
    fn new(kind: String, handle: u32) -> Self {
        Self {
            kind,
            handle: handle_text(handle),
        }
    }

    /// The kernel's default qdisc (nobody configured one).
    pub fn is_default(&self) -> bool {
        self.handle == "0:"
    }

    pub fn is_ours(&self) -> bool {
        self.handle == handle_text(OUR_HANDLE)
    }
}

/// A handle as `tc` prints it: hex major, then the minor if there is one.
fn handle_text(handle: u32) -> String {
    let (major, minor) = (handle >> 16, handle & 0xffff);
    if minor == 0 {
        format!("{major:x}:")
    } else {
        format!("{major:x}:{minor:x}")
    }
}

/// How ACK pacing stands on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AckQdisc {
    /// fq (ours) is at the root; `installed`: by this call.
    Ready { installed: bool },
    /// It cannot be: why, in words for the operator.
    Unavailable(String),
    /// Installing it failed for a reason that may pass (the device was
    /// just created, ...): worth another try later.
    Failed(String),
}

impl AckQdisc {
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready { .. })
    }

    /// "on", or "off: <why>".
    pub fn describe(&self) -> String {
        match self {
            Self::Ready { .. } => "on".into(),
            Self::Unavailable(why) | Self::Failed(why) => format!("off: {why}"),
        }
    }
}

/// A qdisc request the kernel refused (or that could not be made).
#[derive(Debug, thiserror::Error)]
#[error("{what} on {iface}: {source}{}", extack.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
pub struct QdiscError {
    /// The request, in tc's words (`qdisc add root fq`).
    pub what: String,
    pub iface: String,
    #[source]
    pub source: io::Error,
    /// The kernel's own words (netlink extended ack), when it sent them.
    pub extack: Option<String>,
}

impl QdiscError {
    fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// The kind of a qdisc, from its attributes.
fn kind_of(msg: &TcMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        TcAttribute::Kind(k) => Some(k.as_str()),
        _ => None,
    })
}

/// The root qdisc of `ifindex` among the qdiscs of a dump.
fn root_among(msgs: &[TcMessage], ifindex: u32) -> Option<RootQdisc> {
    msgs.iter()
        .filter(|m| m.header.index as u32 == ifindex && u32::from(m.header.parent) == TC_H_ROOT)
        .find_map(|m| {
            Some(RootQdisc::new(
                kind_of(m)?.to_owned(),
                m.header.handle.into(),
            ))
        })
}

/// A request for a qdisc of `kind` at `parent` of `ifindex`, with its
/// options (fq's flow limit).
fn qdisc_message(ifindex: u32, parent: u32, handle: u32, kind: &str) -> TcMessage {
    let mut attributes = vec![TcAttribute::Kind(kind.to_owned())];
    if kind == "fq" {
        attributes.push(TcAttribute::Options(vec![TcOption::Other(
            netlink_packet_core::DefaultNla::new(
                TCA_FQ_FLOW_PLIMIT,
                FLOW_LIMIT.to_ne_bytes().to_vec(),
            ),
        )]));
    }
    let header = TcHeader {
        index: ifindex as i32,
        parent: TcHandle::from(parent),
        handle: TcHandle::from(handle),
        ..Default::default()
    };
    TcMessage::from_parts(header, attributes)
}

/// The message of a netlink extended ack (`NLMSGERR_ATTR_MSG`) in the
/// payload of an error: the request's header (16 bytes; the socket asks
/// for capped acks), then attributes.
fn extack_message(error_payload: &[u8]) -> Option<String> {
    const NLMSGERR_ATTR_MSG: u16 = 1;
    let attrs = error_payload.get(16..)?;
    NlasIterator::new(attrs).flatten().find_map(|nla| {
        (nla.kind() == NLMSGERR_ATTR_MSG).then(|| {
            String::from_utf8_lossy(nla.value())
                .trim_end_matches('\0')
                .to_owned()
        })
    })
}

/// One rtnetlink socket for a few tc requests.
struct Rtnl {
    socket: Socket,
    sequence: u32,
}

impl Rtnl {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        // Best effort: older kernels answer without the explanations.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Sends `msg` and collects the qdiscs of the answer until the ack or
    /// the end of the dump; a refusal is an error with the kernel's errno
    /// and explanation.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<TcMessage>, (io::Error, Option<String>)> {
        self.sequence += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0).map_err(|e| (e, None))?;
        let mut answer = Vec::new();
        loop {
            let (buf, _) = self.socket.recv_from_full().map_err(|e| (e, None))?;
            let mut offset = 0;
            while offset < buf.len() {
                let len = NetlinkBuffer::new_checked(&buf[offset..])
                    .map(|b| b.length() as usize)
                    .map_err(|e| (io::Error::other(e.to_string()), None))?;
                let part = &buf[offset..offset + len];
                offset += (len + 3) & !3;
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(part)
                    .map_err(|e| (io::Error::other(e.to_string()), None))?;
                if reply.header.sequence_number != self.sequence {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewQueueDiscipline(m)) => {
                        answer.push(m)
                    }
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(answer),
                            Some(code) => Err((
                                io::Error::from_raw_os_error(-code.get()),
                                extack_message(&e.header),
                            )),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(answer),
                    _ => {}
                }
            }
        }
    }
}

/// One tc request on `iface`, described as `what` in its error.
fn tc_request(
    iface: &str,
    what: &str,
    msg: RouteNetlinkMessage,
    flags: u16,
) -> Result<Vec<TcMessage>, QdiscError> {
    let error = |source: io::Error, extack: Option<String>| QdiscError {
        what: what.to_owned(),
        iface: iface.to_owned(),
        source,
        extack,
    };
    let mut rtnl = Rtnl::open().map_err(|e| error(e, None))?;
    rtnl.request(msg, flags).map_err(|(e, x)| error(e, x))
}

/// The interface index of `iface`.
fn ifindex(iface: &str) -> Result<u32, QdiscError> {
    nix::net::if_::if_nametoindex(iface).map_err(|e| QdiscError {
        what: "looking up the interface".into(),
        iface: iface.to_owned(),
        source: io::Error::from(e),
        extack: None,
    })
}

/// The root qdisc of `iface`.
pub fn root(iface: &str) -> Result<RootQdisc, QdiscError> {
    root_at(iface, ifindex(iface)?)
}

/// The root qdisc of `iface`, whose index is `index`.
fn root_at(iface: &str, index: u32) -> Result<RootQdisc, QdiscError> {
    let dump = tc_request(
        iface,
        "qdisc show",
        RouteNetlinkMessage::GetQueueDiscipline(TcMessage::with_index(index as i32)),
        netlink_packet_core::NLM_F_DUMP,
    )?;
    root_among(&dump, index).ok_or_else(|| QdiscError {
        what: "qdisc show".into(),
        iface: iface.to_owned(),
        source: io::Error::from(io::ErrorKind::NotFound),
        extack: Some("the kernel listed no root qdisc".into()),
    })
}

/// Transmit queues of `iface` (1 when unknown).
fn tx_queues(iface: &str) -> usize {
    let dir = Path::new("/sys/class/net").join(iface).join("queues");
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("tx-"))
                .count()
        })
        .unwrap_or(1)
        .max(1)
}

/// Installs fq (ours) at the root of `iface`, or mq with one fq per
/// transmit queue.
fn install_fq(iface: &str, index: u32, queues: usize) -> Result<(), QdiscError> {
    // `add` (create, exclusive), not `replace`, at the root: the kernel lets
    // it take the place of the default qdisc but refuses it over a
    // configured one, so a qdisc configured since the caller's check is
    // never replaced.
    let kind = if queues == 1 { "fq" } else { "mq" };
    tc_request(
        iface,
        &format!("qdisc add root {kind}"),
        RouteNetlinkMessage::NewQueueDiscipline(qdisc_message(index, TC_H_ROOT, OUR_HANDLE, kind)),
        NLM_F_CREATE | NLM_F_EXCL,
    )?;
    if queues == 1 {
        return Ok(());
    }
    // One fq per transmit queue keeps the device's queues parallel.
    (1..=queues as u32).try_for_each(|q| {
        let msg = qdisc_message(index, OUR_HANDLE | q, 0, "fq");
        tc_request(
            iface,
            &format!("qdisc replace parent {} fq", handle_text(OUR_HANDLE | q)),
            RouteNetlinkMessage::NewQueueDiscipline(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    })
}

/// Deletes the root qdisc of `iface` (the kernel's default comes back).
fn delete_root(iface: &str, index: u32) -> Result<(), QdiscError> {
    let header = TcHeader {
        index: index as i32,
        parent: TcHandle::from(TC_H_ROOT),
        ..Default::default()
    };
    tc_request(
        iface,
        "qdisc del root",
        RouteNetlinkMessage::DelQueueDiscipline(TcMessage::from_parts(header, Vec::new())),
        0,
    )
    .map(drop)
}

/// Makes sure fq (ours) is the root qdisc of `iface`, installing it over
/// the kernel's default.
pub fn ensure_fq(iface: &str) -> AckQdisc {
    let (index, current) = match ifindex(iface).and_then(|i| Ok((i, root_at(iface, i)?))) {
        Ok(found) => found,
        Err(e) => return AckQdisc::Failed(e.to_string()),
    };
    if current.is_ours() {
        return AckQdisc::Ready { installed: false };
    }
    if !current.is_default() {
        return AckQdisc::Unavailable(format!(
            "{iface} has a configured root qdisc ({} {}); ACK pacing needs fq there and qosd \
             does not replace a qdisc it did not install",
            current.kind, current.handle
        ));
    }
    let queues = tx_queues(iface);
    match install_fq(iface, index, queues) {
        Ok(()) => {
            info!(
                iface,
                queues, "fq installed at the root for ingress ACK pacing"
            );
            AckQdisc::Ready { installed: true }
        }
        Err(e) => {
            // Leave the default as it was.
            if root_at(iface, index).is_ok_and(|r| r.is_ours()) {
                let _ = delete_root(iface, index);
            }
            // The kernel answers ENOENT for a qdisc kind it has no module
            // for ("Specified qdisc kind is unknown").
            if e.errno() == Some(libc::ENOENT) && e.what.ends_with(" fq") {
                AckQdisc::Unavailable(format!("the kernel has no fq qdisc (sch_fq): {e}"))
            } else {
                AckQdisc::Failed(e.to_string())
            }
        }
    }
}

/// Removes the root qdisc of `iface` if it is ours (the kernel's default
/// comes back); anything else is left alone.
pub fn remove_ours(iface: &str) {
    let Ok(index) = ifindex(iface) else { return };
    if !root_at(iface, index).is_ok_and(|r| r.is_ours()) {
        return;
    }
    match delete_root(iface, index) {
        Ok(()) => info!(iface, "fq for ACK pacing removed"),
        Err(e) => warn!(iface, error = %e, "removing the fq qdisc"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use netlink_packet_core::{Emitable, Parseable};

    #[test]
    fn handles_print_as_tc_prints_them() {
        assert_eq!(handle_text(OUR_HANDLE), "7105:");
        assert_eq!(handle_text(0), "0:");
        assert_eq!(handle_text(0x0001_0000), "1:");
        assert_eq!(handle_text(OUR_HANDLE | 0xa), "7105:a");
    }

    #[test]
    fn the_root_is_found_among_the_qdiscs_of_a_dump() {
        let dump = [
            qdisc_message(1, TC_H_ROOT, 0, "noqueue"),
            // An mq's children are not the root.
            qdisc_message(7, OUR_HANDLE | 1, 0x8001_0000, "fq"),
            qdisc_message(7, TC_H_ROOT, OUR_HANDLE, "mq"),
            qdisc_message(9, TC_H_ROOT, 0x0001_0000, "htb"),
            // The ingress qdisc hangs off its own parent.
            qdisc_message(12, 0xffff_fff1, 0xffff_0000, "clsact"),
        ];
        let r = root_among(&dump, 1).unwrap();
        assert_eq!((r.kind.as_str(), r.handle.as_str()), ("noqueue", "0:"));
        assert!(r.is_default() && !r.is_ours());
        let r = root_among(&dump, 7).unwrap();
        assert_eq!(r.kind, "mq");
        assert!(r.is_ours() && !r.is_default());
        let r = root_among(&dump, 9).unwrap();
        assert_eq!((r.kind.as_str(), r.handle.as_str()), ("htb", "1:"));
        assert!(!r.is_default() && !r.is_ours());
        assert_eq!(root_among(&dump, 12), None);
        assert_eq!(root_among(&dump, 2), None);
        // A root without a kind attribute is not trusted.
        let nameless =
            TcMessage::from_parts(qdisc_message(3, TC_H_ROOT, 0, "x").header, Vec::new());
        assert_eq!(root_among(&[nameless], 3), None);
    }

    #[test]
    fn an_fq_request_carries_its_flow_limit_and_round_trips() {
        let msg = qdisc_message(5, TC_H_ROOT, OUR_HANDLE, "fq");
        let mut bytes = vec![0; msg.buffer_len()];
        msg.emit(&mut bytes);
        let back = TcMessage::parse(bytes.as_slice()).unwrap();
        assert_eq!(back.header.index, 5);
        assert_eq!(u32::from(back.header.parent), TC_H_ROOT);
        assert_eq!(u32::from(back.header.handle), OUR_HANDLE);
        assert_eq!(kind_of(&back), Some("fq"));
        let options: Vec<_> = back
            .attributes
            .iter()
            .filter_map(|a| match a {
                TcAttribute::Options(o) => Some(o.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        // The crate reads the options of a kind it has no type for (fq) as
        // one attribute holding the nested bytes: TCA_OPTIONS (2) with
        // TCA_FQ_FLOW_PLIMIT (length 8, type 2, value 1000).
        let nested = [8u8, 0, 2, 0]
            .into_iter()
            .chain(1000u32.to_ne_bytes())
            .collect();
        assert_eq!(
            options,
            vec![TcOption::Other(netlink_packet_core::DefaultNla::new(
                2, nested
            ))]
        );
        // mq takes no options.
        let mq = qdisc_message(5, TC_H_ROOT, OUR_HANDLE, "mq");
        assert_eq!(mq.attributes, vec![TcAttribute::Kind("mq".into())]);
    }

    #[test]
    fn the_kernels_explanation_is_read_from_an_extended_ack() {
        // The capped request header, then NLMSGERR_ATTR_MSG and an
        // NLMSGERR_ATTR_OFFS (kind 2) the reader skips.
        let text = b"Specified qdisc kind is unknown\0";
        let mut payload = vec![0u8; 16];
        let offs = [8u8, 0, 2, 0, 20, 0, 0, 0];
        payload.extend_from_slice(&offs);
        let len = 4 + text.len();
        payload.extend_from_slice(&(len as u16).to_ne_bytes());
        payload.extend_from_slice(&1u16.to_ne_bytes());
        payload.extend_from_slice(text);
        payload.resize(payload.len().next_multiple_of(4), 0);
        assert_eq!(
            extack_message(&payload).as_deref(),
            Some("Specified qdisc kind is unknown")
        );
        assert_eq!(extack_message(&payload[..16]), None);
        assert_eq!(extack_message(&[0; 8]), None);
        let e = QdiscError {
            what: "qdisc add root fq".into(),
            iface: "eth9".into(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
            extack: extack_message(&payload),
        };
        let shown = e.to_string();
        assert!(
            shown.starts_with("qdisc add root fq on eth9: No such file or directory")
                && shown.ends_with("(Specified qdisc kind is unknown)"),
            "{shown}"
        );
        assert_eq!(e.errno(), Some(libc::ENOENT));
    }
}
