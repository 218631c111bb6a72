//! A minimal NFQUEUE client (netfilter's `nfnetlink_queue`): bind queues, receive packet ids,
//! give batch verdicts. Only metadata is copied: the delay line never looks into a packet.
//!
//! The message layouts are those of `linux/netfilter/nfnetlink_queue.h`; encoding and decoding
//! are pure functions, tested below.

use std::os::fd::{AsRawFd, RawFd};

use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};

use crate::error::{LabError, Result};

const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;

const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;

const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
/// Hand whole GSO packets to user space instead of segmenting them first.
const NFQA_CFG_F_GSO: u32 = 1 << 2;

const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;

/// NF_ACCEPT.
pub const VERDICT_ACCEPT: u32 = 1;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Encodes one nfnetlink_queue message: netlink header, nfgenmsg (queue number), attributes.
fn encode(msg: u16, flags: u16, seq: u32, queue: u16, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut b = vec![0u8; NLMSG_HDRLEN];
    // nfgenmsg: family AF_UNSPEC, version 0, res_id = queue (big endian)
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&queue.to_be_bytes());
    for (ty, payload) in attrs {
        let len = 4 + payload.len();
        b.extend_from_slice(&(len as u16).to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(payload);
        b.resize(align4(b.len()), 0);
    }
    let total = b.len() as u32;
    b[0..4].copy_from_slice(&total.to_ne_bytes());
    b[4..6].copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg).to_ne_bytes());
    b[6..8].copy_from_slice(&flags.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    b
}

/// The config messages that bind `queue` with metadata-only copies, GSO packets whole and a
/// kernel queue of `max_len` packets.
fn bind_messages(queue: u16, max_len: u32, seq: u32) -> Vec<Vec<u8>> {
    let flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut params = 0u32.to_be_bytes().to_vec();
    params.push(NFQNL_COPY_META);
    vec![
        // command bind: { u8 command, u8 pad, be16 pf }
        encode(
            NFQNL_MSG_CONFIG,
            flags,
            seq,
            queue,
            &[(NFQA_CFG_CMD, vec![NFQNL_CFG_CMD_BIND, 0, 0, 0])],
        ),
        encode(
            NFQNL_MSG_CONFIG,
            flags,
            seq + 1,
            queue,
            &[(NFQA_CFG_PARAMS, params)],
        ),
        encode(
            NFQNL_MSG_CONFIG,
            flags,
            seq + 2,
            queue,
            &[(NFQA_CFG_QUEUE_MAXLEN, max_len.to_be_bytes().to_vec())],
        ),
        encode(
            NFQNL_MSG_CONFIG,
            flags,
            seq + 3,
            queue,
            &[
                (NFQA_CFG_FLAGS, NFQA_CFG_F_GSO.to_be_bytes().to_vec()),
                (NFQA_CFG_MASK, NFQA_CFG_F_GSO.to_be_bytes().to_vec()),
            ],
        ),
    ]
}

/// A verdict for every packet of `queue` with an id up to `id`.
fn batch_verdict_message(queue: u16, id: u32, verdict: u32) -> Vec<u8> {
    let mut hdr = verdict.to_be_bytes().to_vec();
    hdr.extend_from_slice(&id.to_be_bytes());
    encode(
        NFQNL_MSG_VERDICT_BATCH,
        NLM_F_REQUEST,
        0,
        queue,
        &[(NFQA_VERDICT_HDR, hdr)],
    )
}

/// What a datagram from the kernel holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A queued packet: its queue and id.
    Packet {
        /// Queue number.
        queue: u16,
        /// Packet id (increasing within a queue).
        id: u32,
    },
    /// An acknowledgement (errno 0) or error (negative errno) of request `seq`.
    Ack {
        /// The request's sequence number.
        seq: u32,
        /// 0 or a negative errno.
        errno: i32,
    },
}

/// Decodes every message of one datagram (messages it does not know are skipped).
pub fn decode(mut buf: &[u8]) -> Vec<Incoming> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        let body = &buf[NLMSG_HDRLEN..len];
        if ty == NLMSG_ERROR && body.len() >= 4 {
            let errno = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
            out.push(Incoming::Ack { seq, errno });
        } else if ty == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET && body.len() >= 4 {
            let queue = u16::from_be_bytes([body[2], body[3]]);
            let mut attrs = &body[4..];
            while attrs.len() >= 4 {
                let alen = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
                let aty = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
                if alen < 4 || alen > attrs.len() {
                    break;
                }
                if aty == NFQA_PACKET_HDR && alen >= 8 {
                    let id = u32::from_be_bytes([attrs[4], attrs[5], attrs[6], attrs[7]]);
                    out.push(Incoming::Packet { queue, id });
                    break;
                }
                attrs = &attrs[align4(alen).min(attrs.len())..];
            }
        }
        buf = &buf[align4(len).min(buf.len())..];
    }
    out
}

/// An NFQUEUE socket bound to some queues.
pub struct NfQueue {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl NfQueue {
    /// Opens the socket (in the calling thread's network namespace) with a large receive
    /// buffer.
    pub fn open() -> Result<NfQueue> {
        let mut socket = Socket::new(NETLINK_NETFILTER)
            .map_err(|e| LabError::Setup(format!("opening an NFQUEUE netlink socket: {e}")))?;
        socket
            .bind_auto()
            .map_err(|e| LabError::Setup(format!("binding the NFQUEUE socket: {e}")))?;
        // queued packets stay in the kernel until verdict; a lost notification is made good
        // by the next batch verdict, which covers every lower id
        let _ = socket.set_no_enobufs(true);
        force_receive_buffer(&socket, 16 << 20);
        Ok(NfQueue {
            socket,
            seq: 1,
            buf: Vec::with_capacity(1 << 16),
        })
    }

    /// Binds `queue`: metadata only, GSO whole, `max_len` packets held at most.
    pub fn bind(&mut self, queue: u16, max_len: u32) -> Result<()> {
        for m in bind_messages(queue, max_len, self.seq) {
            self.seq += 1;
            self.socket
                .send(&m, 0)
                .map_err(|e| LabError::Setup(format!("NFQUEUE config of queue {queue}: {e}")))?;
            self.wait_ack(queue)?;
        }
        Ok(())
    }

    fn wait_ack(&mut self, queue: u16) -> Result<()> {
        loop {
            for m in self.recv_blocking()? {
                if let Incoming::Ack { errno, .. } = m {
                    if errno == 0 {
                        return Ok(());
                    }
                    return Err(LabError::Setup(format!(
                        "NFQUEUE config of queue {queue} refused: {}",
                        std::io::Error::from_raw_os_error(-errno)
                    )));
                }
            }
        }
    }

    fn recv_blocking(&mut self) -> Result<Vec<Incoming>> {
        self.buf.clear();
        self.socket
            .recv(&mut self.buf, 0)
            .map_err(|e| LabError::Setup(format!("NFQUEUE receive: {e}")))?;
        Ok(decode(&self.buf))
    }

    /// Receives whatever is waiting without blocking (an empty list when nothing is).
    pub fn recv_ready(&mut self) -> Result<Vec<Incoming>> {
        self.buf.clear();
        match self.socket.recv(&mut self.buf, nix::libc::MSG_DONTWAIT) {
            Ok(_) => Ok(decode(&self.buf)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Vec::new()),
            // the receive buffer overflowed: some notifications are lost, their packets are
            // released by the next batch verdict
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => Ok(Vec::new()),
            Err(e) => Err(LabError::Setup(format!("NFQUEUE receive: {e}"))),
        }
    }

    /// Accepts every packet of `queue` up to and including `id`.
    pub fn accept_through(&mut self, queue: u16, id: u32) -> Result<()> {
        let m = batch_verdict_message(queue, id, VERDICT_ACCEPT);
        self.socket
            .send(&m, 0)
            .map_err(|e| LabError::Setup(format!("NFQUEUE verdict on queue {queue}: {e}")))?;
        Ok(())
    }

    /// The socket, for polling.
    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// A large receive buffer: SO_RCVBUFFORCE (root) lifts the rmem_max cap, SO_RCVBUF otherwise.
fn force_receive_buffer(socket: &Socket, bytes: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bind_command_is_laid_out_as_the_kernel_expects() {
        let m = &bind_messages(7, 1000, 42)[0];
        assert_eq!(m.len(), 16 + 4 + 8);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 28);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), 0x0302);
        assert_eq!(u16::from_ne_bytes(m[6..8].try_into().unwrap()), 5);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 42);
        assert_eq!(&m[16..20], &[0, 0, 0, 7]);
        assert_eq!(u16::from_ne_bytes(m[20..22].try_into().unwrap()), 8);
        assert_eq!(m[24], NFQNL_CFG_CMD_BIND);
        // params: be32 range 0 + mode META, padded to 4
        let p = &bind_messages(7, 1000, 42)[1];
        assert_eq!(u16::from_ne_bytes(p[20..22].try_into().unwrap()), 9);
        assert_eq!(&p[24..29], &[0, 0, 0, 0, NFQNL_COPY_META]);
        assert_eq!(p.len() % 4, 0);
    }

    #[test]
    fn a_batch_verdict_carries_verdict_and_id_big_endian() {
        let m = batch_verdict_message(3, 0x01020304, VERDICT_ACCEPT);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), 0x0303);
        assert_eq!(&m[18..20], &[0, 3]);
        assert_eq!(&m[24..28], &[0, 0, 0, 1]);
        assert_eq!(&m[28..32], &[1, 2, 3, 4]);
    }

    fn packet(queue: u16, id: u32) -> Vec<u8> {
        let mut hdr = id.to_be_bytes().to_vec();
        hdr.extend_from_slice(&[0x08, 0x00, 2]); // hw protocol, hook
        // a leading attribute the decoder must step over, then the packet header
        encode(
            NFQNL_MSG_PACKET,
            0,
            0,
            queue,
            &[(11, vec![1, 2, 3, 4, 5]), (NFQA_PACKET_HDR, hdr)],
        )
    }

    #[test]
    fn packets_and_acks_decode_from_one_datagram() {
        let mut dgram = packet(2, 17);
        dgram.extend(packet(5, 18));
        let mut ack = vec![0u8; 16 + 4 + 16];
        ack[0..4].copy_from_slice(&36u32.to_ne_bytes());
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack[8..12].copy_from_slice(&9u32.to_ne_bytes());
        ack[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        dgram.extend(ack);
        assert_eq!(
            decode(&dgram),
            vec![
                Incoming::Packet { queue: 2, id: 17 },
                Incoming::Packet { queue: 5, id: 18 },
                Incoming::Ack { seq: 9, errno: -1 },
            ]
        );
        // truncated input decodes to what is whole
        assert_eq!(decode(&dgram[..10]), vec![]);
    }
}
