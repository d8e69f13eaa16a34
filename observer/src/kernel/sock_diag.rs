//! sock_diag over netlink (NETLINK_SOCK_DIAG): the kernel's own table of TCP sockets, with queue
//! sizes, tcp_info and the socket cookie the BPF programs key their maps by. This is what `ss`
//! reads; SOCK_DESTROY on the same socket family is what `ss -K` sends.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use observer_common::{SockActivity, TcpState, TcpStates};
use thiserror::Error;

use super::tcp_info::TcpInfo;

const NETLINK_SOCK_DIAG: libc::c_int = 4;
/// The original inet_diag request: one dump covers both address families (the kernel walks
/// its socket table once instead of once per family).
const TCPDIAG_GETSOCK: u16 = 18;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_SKMEMINFO: u16 = 7;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
/// An attribute's type without its flags (nested, network byte order).
const NLA_TYPE_MASK: u16 = 0x3fff;
/// Index of sk_drops in the SK_MEMINFO array.
const SK_MEMINFO_DROPS: usize = 8;

const NLMSG_HDR_LEN: usize = 16;
const SOCKID_LEN: usize = 48;
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// struct inet_diag_req: family, src_len, dst_len, ext, the socket id, states, dbs.
const COMPAT_REQ_LEN: usize = 4 + SOCKID_LEN + 8;
const DIAG_MSG_LEN: usize = 4 + SOCKID_LEN + 20;

#[derive(Debug, Error)]
pub enum DiagError {
    #[error("cannot open a sock_diag netlink socket: {0}")]
    Open(#[source] io::Error),
    #[error("sock_diag request failed")]
    Io(#[from] io::Error),
    #[error(
        "the kernel's TCP socket table (sock_diag) is not available: load it with \
         `modprobe tcp_diag` (it needs CONFIG_INET_TCP_DIAG)"
    )]
    NoTcpDiag,
    #[error("sock_diag reply is malformed: {0}")]
    Malformed(&'static str),
}

/// An IP address and port, packed into 20 bytes (a `SocketAddr` takes 32): the agent holds two
/// per watched socket.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    ip: [u8; 16],
    port: u16,
    v6: bool,
}

impl Endpoint {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip(), self.port)
    }

    pub fn ip(&self) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from(self.ip))
        } else {
            IpAddr::V4(Ipv4Addr::new(self.ip[0], self.ip[1], self.ip[2], self.ip[3]))
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Endpoint { ip: ip_bytes(addr.ip()), port: addr.port(), v6: addr.is_ipv6() }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<SocketAddr>().map(Endpoint::from)
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr().fmt(f)
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr().fmt(f)
    }
}

/// One socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct DiagSocket {
    pub family: u8,
    pub state: TcpState,
    /// Which timer is pending: 0 none, 1 retransmit, 2 keepalive, 3 TIME_WAIT, 4 zero-window probe.
    pub timer: u8,
    /// Milliseconds until that timer fires.
    pub timer_expires_ms: u32,
    pub local: Endpoint,
    pub remote: Endpoint,
    pub interface: u32,
    pub cookie: u64,
    /// Bytes queued for reading (LISTEN: connections waiting in the accept queue).
    pub rqueue: u32,
    /// Bytes queued for sending (LISTEN: the accept queue's limit).
    pub wqueue: u32,
    pub inode: u32,
    /// Packets the socket dropped; for a listener, connections refused because its accept
    /// queue was full.
    pub drops: Option<u32>,
    pub tcp: Option<TcpInfo>,
    /// What the probes recorded in the socket's own storage, when the dump asked for it.
    pub activity: Option<SockActivity>,
}

/// What a dump asks the kernel for.
#[derive(Clone, Copy)]
pub struct Dump<'a> {
    pub states: TcpStates,
    /// Optional attributes: each costs kernel time per socket.
    pub extensions: Extensions,
    /// Only the sockets it keeps (the kernel skips filling in the others).
    pub filter: Option<&'a PortFilter>,
    /// A BPF socket storage map whose value each socket should carry (`DiagSocket::activity`).
    pub storage: Option<BorrowedFd<'a>>,
}

/// Socket identity as sock_diag requests carry it (inet_diag_sockid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockId {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub interface: u32,
    pub cookie: u64,
}

/// A NETLINK_SOCK_DIAG socket, bound to the network namespace it was created in.
pub struct DiagSocketHandle {
    fd: OwnedFd,
    seq: u32,
    /// Whether the kernel takes TCPDIAG_GETSOCK dumps; if not, each family is dumped apart.
    both_families_at_once: bool,
}

impl DiagSocketHandle {
    pub fn open() -> Result<Self, DiagError> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        };
        if raw < 0 {
            return Err(DiagError::Open(io::Error::last_os_error()));
        }
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(raw) }, seq: 0, both_families_at_once: true })
    }

    /// All TCP sockets of both address families whose state is in `states`, with tcp_info and
    /// memory counters.
    pub fn dump_tcp(&mut self, states: TcpStates) -> Result<Vec<DiagSocket>, DiagError> {
        let mut sockets = Vec::new();
        let dump = Dump { states, extensions: Extensions::ALL, filter: None, storage: None };
        self.dump_each(&dump, |s| sockets.push(s))?;
        Ok(sockets)
    }

    /// The sockets `dump` asks for, each handed to `each` as it is parsed (so the caller can
    /// build its own records without a second copy of the table in memory).
    pub fn dump_each(
        &mut self,
        dump: &Dump<'_>,
        mut each: impl FnMut(DiagSocket),
    ) -> Result<(), DiagError> {
        let Dump { states, extensions, filter, storage } = *dump;
        let bytecode = filter.map(|f| f.bytecode());
        let with_filter = |mut request: Vec<u8>| {
            if let Some(code) = &bytecode {
                request.extend_from_slice(&((4 + code.len()) as u16).to_ne_bytes());
                request.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
                request.extend_from_slice(code);
            }
            if let Some(map) = storage {
                // A nest holding the map's fd: the kernel adds that map's value for each socket.
                request.extend_from_slice(&12u16.to_ne_bytes());
                request.extend_from_slice(
                    &(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED).to_ne_bytes(),
                );
                request.extend_from_slice(&8u16.to_ne_bytes());
                request.extend_from_slice(&SK_DIAG_BPF_STORAGE_REQ_MAP_FD.to_ne_bytes());
                request.extend_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
            }
            request
        };
        if self.both_families_at_once {
            let request = with_filter(encode_compat_request(states.bits(), extensions));
            self.send(TCPDIAG_GETSOCK, NLM_F_REQUEST | NLM_F_DUMP, &request)?;
            let mut delivered = false;
            let result = self.receive(|msg_type, payload| {
                if msg_type == TCPDIAG_GETSOCK {
                    delivered = true;
                    each(parse_diag_msg(payload)?);
                }
                Ok(())
            });
            match result {
                // A kernel without the old interface refuses before sending anything.
                Err(DiagError::Io(e)) if !delivered && e.raw_os_error().is_some() => {
                    log::debug!(
                        "sock_diag: one dump for both families refused ({e}); dumping each"
                    );
                    self.both_families_at_once = false;
                }
                other => return other.map_err(no_tcp_diag),
            }
        }
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            let request = with_filter(encode_request(family, states.bits(), extensions, None));
            self.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &request)?;
            self.receive(|msg_type, payload| {
                if msg_type == SOCK_DIAG_BY_FAMILY {
                    each(parse_diag_msg(payload)?);
                }
                Ok(())
            })
            .map_err(no_tcp_diag)?;
        }
        Ok(())
    }

    /// Destroys the one socket matching `id` exactly (cookie included), as `ss -K` does. The
    /// kernel refuses with ESTALE if the cookie no longer names that socket.
    pub fn destroy(&mut self, id: &SockId) -> Result<(), DiagError> {
        let family = if id.local.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 } as u8;
        let request = encode_request(family, u32::MAX, Extensions::NONE, Some(id));
        self.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &request)?;
        self.receive(|_, _| Ok(()))
    }

    fn send(&mut self, msg_type: u16, flags: u16, payload: &[u8]) -> Result<(), DiagError> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = Vec::with_capacity(NLMSG_HDR_LEN + payload.len());
        msg.extend_from_slice(&((NLMSG_HDR_LEN + payload.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&msg_type.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        // The kernel's netlink address: pid 0.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: msg and addr outlive the call; lengths are theirs.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Reads replies to the last request until DONE, an error, or (for acked requests) the ack.
    fn receive(
        &mut self,
        mut on_message: impl FnMut(u16, &[u8]) -> Result<(), DiagError>,
    ) -> Result<(), DiagError> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err.into());
            }
            for message in netlink_messages(buf.get(..n as usize).unwrap_or_default()) {
                let Message { kind, seq, payload } = message?;
                if seq != self.seq {
                    continue; // a late reply to an earlier, abandoned request
                }
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let errno = super::ne_u32(payload, 0)
                            .ok_or(DiagError::Malformed("netlink error message"))?
                            as i32;
                        // errno 0 is the acknowledgement of a successful request.
                        return if errno == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(errno.wrapping_neg()).into())
                        };
                    }
                    _ => on_message(kind, payload)?,
                }
            }
        }
    }
}

/// One netlink message of a datagram.
#[derive(Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// The messages of one netlink datagram, in order; a malformed length ends it with an error.
pub fn netlink_messages(datagram: &[u8]) -> impl Iterator<Item = Result<Message<'_>, DiagError>> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HDR_LEN {
            return None;
        }
        let header = (super::ne_u32(rest, 0), super::ne_u16(rest, 4), super::ne_u32(rest, 8));
        let (Some(len), Some(kind), Some(seq)) = header else { return None };
        let len = len as usize;
        let Some(payload) = rest.get(NLMSG_HDR_LEN..len).filter(|_| len >= NLMSG_HDR_LEN) else {
            rest = &[];
            return Some(Err(DiagError::Malformed("netlink message length")));
        };
        rest = rest.get(align4(len)..).unwrap_or_default();
        Some(Ok(Message { kind, seq, payload }))
    })
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

const BC_JMP: u8 = 1;
const BC_D_GE: u8 = 4;
const BC_D_COND: u8 = 8;
const BC_S_EQ: u8 = 11;
const BC_D_EQ: u8 = 12;

/// A socket filter the kernel runs during a dump (sock_diag bytecode), so that it skips filling
/// in the sockets the agent would throw away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortFilter {
    /// Keep a socket whose local or remote port is one of these (`--port`).
    Either(Vec<u16>),
    /// Drop a socket whose remote end is one of these ports on a loopback address, unless its
    /// local port is one of them too. Given a server's listening ports, this drops its clients
    /// on loopback (load generators, health checks, sidecars), which belong to other processes,
    /// and keeps everything of the server's, including its calls to other hosts' services on a
    /// port it also listens on (8080 calling 8080).
    NotLoopbackClientOf(Vec<u16>),
    /// Keep a socket whose remote port is at least `from` and below `to`: splits one dump into
    /// several that can run in parallel.
    RemotePorts { from: u16, to: u32 },
    /// Keep what both filters keep.
    Both(Box<PortFilter>, Box<PortFilter>),
}

/// `code` (a port comparison) for each port, or-ed: [a][JMP over b][b]. Each fragment, as
/// iproute2 compiles filters, ends in success by reaching its end and in failure by jumping
/// 4 bytes past it.
fn any_port(code: u8, ports: &[u16]) -> Vec<u8> {
    let check = |port: u16| {
        let mut c = vec![code, 8];
        c.extend_from_slice(&12u16.to_ne_bytes());
        c.extend_from_slice(&[0, 0]);
        c.extend_from_slice(&port.to_ne_bytes());
        c
    };
    ports.iter().map(|&p| check(p)).reduce(or).unwrap_or_default()
}

fn or(a: Vec<u8>, b: Vec<u8>) -> Vec<u8> {
    let mut out = a;
    out.push(BC_JMP);
    out.push(4);
    out.extend_from_slice(&((b.len() + 4) as u16).to_ne_bytes());
    out.extend(b);
    out
}

/// [x][JMP +8] turns x's success into failure and failure into success.
fn not(mut x: Vec<u8>) -> Vec<u8> {
    x.extend_from_slice(&[BC_JMP, 4]);
    x.extend_from_slice(&8u16.to_ne_bytes());
    x
}

/// dport >= port.
fn remote_at_least(port: u16) -> Vec<u8> {
    let mut c = vec![BC_D_GE, 8];
    c.extend_from_slice(&12u16.to_ne_bytes());
    c.extend_from_slice(&[0, 0]);
    c.extend_from_slice(&port.to_ne_bytes());
    c
}

/// The remote address is in `prefix` (`prefix_len` bits of `addr`), any port. An IPv4 prefix
/// also matches IPv4-mapped IPv6 addresses, as the kernel applies it.
fn remote_in(addr: std::net::IpAddr, prefix_len: u8) -> Vec<u8> {
    let (family, octets) = family_and_octets(addr);
    // The op, then struct inet_diag_hostcond { family, prefix_len, (pad), int port }, then the
    // address.
    let len = 4 + 8 + octets.len();
    let mut c = vec![BC_D_COND, len as u8];
    c.extend_from_slice(&((len + 4) as u16).to_ne_bytes());
    c.extend_from_slice(&[family, prefix_len, 0, 0]);
    c.extend_from_slice(&(-1i32).to_ne_bytes());
    c.extend(octets);
    c
}

/// An address as sock_diag carries it: its address family and its bytes in network order.
fn family_and_octets(addr: std::net::IpAddr) -> (u8, Vec<u8>) {
    match addr {
        std::net::IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        std::net::IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    }
}

/// The remote address is a loopback one: 127.0.0.0/8 (plain or IPv4-mapped) or ::1.
fn remote_loopback() -> Vec<u8> {
    or(
        remote_in(std::net::Ipv4Addr::new(127, 0, 0, 0).into(), 8),
        remote_in(std::net::Ipv6Addr::LOCALHOST.into(), 128),
    )
}

/// An empty program keeps everything; this one, "dport >= 0", too, where a fragment is needed.
fn keep_all() -> Vec<u8> {
    remote_at_least(0)
}

impl PortFilter {
    fn bytecode(&self) -> Vec<u8> {
        match self {
            PortFilter::Either(ports) if !ports.is_empty() => {
                or(any_port(BC_S_EQ, ports), any_port(BC_D_EQ, ports))
            }
            PortFilter::NotLoopbackClientOf(ports) if !ports.is_empty() => or(
                any_port(BC_S_EQ, ports),
                or(not(any_port(BC_D_EQ, ports)), not(remote_loopback())),
            ),
            PortFilter::RemotePorts { from, to } => {
                let upper = match u16::try_from(*to) {
                    Ok(to) => not(remote_at_least(to)),
                    Err(_) => keep_all(), // no upper bound
                };
                // a and b == not(not a or not b)
                not(or(not(remote_at_least(*from)), not(upper)))
            }
            PortFilter::Both(a, b) => {
                let (a, b) = (a.bytecode_or_all(), b.bytecode_or_all());
                not(or(not(a), not(b)))
            }
            _ => Vec::new(),
        }
    }

    fn bytecode_or_all(&self) -> Vec<u8> {
        let code = self.bytecode();
        if code.is_empty() { keep_all() } else { code }
    }
}

/// Runs `code` the way the kernel's inet_diag_bc_run does, for the tests, on a socket whose
/// remote end is on loopback.
#[cfg(test)]
fn run_bytecode(code: &[u8], sport: u16, dport: u16) -> bool {
    run_bytecode_to(code, sport, std::net::Ipv4Addr::LOCALHOST.into(), dport)
}

/// As `run_bytecode`, for a socket whose remote end is `daddr` port `dport`.
#[cfg(test)]
fn run_bytecode_to(code: &[u8], sport: u16, daddr: std::net::IpAddr, dport: u16) -> bool {
    let mut at = 0usize;
    let mut len = code.len() as isize;
    while len > 0 {
        let op = &code[at..];
        let yes = match op[0] {
            BC_JMP => false,
            BC_S_EQ => sport == u16::from_ne_bytes([op[6], op[7]]),
            BC_D_EQ => dport == u16::from_ne_bytes([op[6], op[7]]),
            BC_D_GE => dport >= u16::from_ne_bytes([op[6], op[7]]),
            BC_D_COND => host_matches(&op[4..], daddr, dport),
            _ => true,
        };
        let step = if yes { op[1] as isize } else { u16::from_ne_bytes([op[2], op[3]]) as isize };
        len -= step;
        at = (at as isize + step) as usize;
    }
    len == 0
}

/// inet_diag_bc_run's INET_DIAG_BC_D_COND, on `cond` (struct inet_diag_hostcond and address).
#[cfg(test)]
fn host_matches(cond: &[u8], daddr: std::net::IpAddr, dport: u16) -> bool {
    let (family, prefix_len) = (cond[0], cond[1] as usize);
    let port = i32::from_ne_bytes([cond[4], cond[5], cond[6], cond[7]]);
    if port != -1 && port != i32::from(dport) {
        return false;
    }
    let (entry_family, entry) = family_and_octets(daddr);
    let entry = match (family, entry_family) {
        (f, e) if f == e => entry,
        // An IPv4 condition on an IPv6 socket: only an IPv4-mapped address can match.
        (f, _)
            if f == libc::AF_INET as u8
                && entry[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255] =>
        {
            entry[12..].to_vec()
        }
        _ => return false,
    };
    let want = &cond[8..];
    (0..prefix_len).all(|bit| {
        let mask = 0x80u8 >> (bit % 8);
        entry[bit / 8] & mask == want[bit / 8] & mask
    })
}

/// Which optional attributes a dump asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extensions(u8);

impl Extensions {
    pub const NONE: Extensions = Extensions(0);
    /// tcp_info: times since last data, byte counters, retransmission state.
    pub const INFO: Extensions = Extensions(1 << (INET_DIAG_INFO - 1));
    /// Socket memory counters, of which the drop count matters (for listeners).
    pub const MEMINFO: Extensions = Extensions(1 << (INET_DIAG_SKMEMINFO - 1));
    pub const ALL: Extensions = Extensions(Self::INFO.0 | Self::MEMINFO.0);
}

fn encode_request(family: u8, states: u32, extensions: Extensions, id: Option<&SockId>) -> Vec<u8> {
    let mut req = Vec::with_capacity(REQ_LEN);
    req.push(family);
    req.push(libc::IPPROTO_TCP as u8);
    // Extensions wanted in the reply: bit (attribute - 1).
    req.push(extensions.0);
    req.push(0);
    req.extend_from_slice(&states.to_ne_bytes());
    match id {
        Some(id) => encode_sockid(&mut req, id),
        None => req.resize(REQ_LEN, 0),
    }
    req
}

fn encode_compat_request(states: u32, extensions: Extensions) -> Vec<u8> {
    let mut req = Vec::with_capacity(COMPAT_REQ_LEN);
    // Family (ignored by the kernel for dumps), source and destination prefix lengths.
    req.extend_from_slice(&[libc::AF_INET as u8, 0, 0]);
    req.push(extensions.0);
    req.resize(4 + SOCKID_LEN, 0);
    req.extend_from_slice(&states.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req
}

/// A dump only fails with ENOENT when no handler for TCP is registered.
fn no_tcp_diag(e: DiagError) -> DiagError {
    match e {
        DiagError::Io(io) if io.raw_os_error() == Some(libc::ENOENT) => DiagError::NoTcpDiag,
        other => other,
    }
}

fn encode_sockid(out: &mut Vec<u8>, id: &SockId) {
    out.extend_from_slice(&id.local.port().to_be_bytes());
    out.extend_from_slice(&id.remote.port().to_be_bytes());
    out.extend_from_slice(&ip_bytes(id.local.ip()));
    out.extend_from_slice(&ip_bytes(id.remote.ip()));
    out.extend_from_slice(&id.interface.to_ne_bytes());
    // The cookie travels as two native-endian u32 halves, low half first.
    out.extend_from_slice(&(id.cookie as u32).to_ne_bytes());
    out.extend_from_slice(&((id.cookie >> 32) as u32).to_ne_bytes());
}

fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            b
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn parse_addr(family: u8, raw: &[u8], port: u16) -> Option<Endpoint> {
    let v6 = family != libc::AF_INET as u8;
    let mut ip = [0u8; 16];
    if v6 {
        ip.copy_from_slice(raw.get(..16)?);
    } else {
        ip[..4].copy_from_slice(raw.get(..4)?);
    }
    Some(Endpoint { ip, port, v6 })
}

/// Parses one inet_diag_msg and its attributes.
pub fn parse_diag_msg(payload: &[u8]) -> Result<DiagSocket, DiagError> {
    let short = DiagError::Malformed("short inet_diag_msg");
    if payload.len() < DIAG_MSG_LEN {
        return Err(short);
    }
    let u32_at =
        |at: usize| super::ne_u32(payload, at).ok_or(DiagError::Malformed("short inet_diag_msg"));
    let id = payload.get(4..4 + SOCKID_LEN).ok_or(short)?;
    let (family, state, timer) = (payload[0], payload[1], payload[2]);
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let half = |at: usize| super::ne_u32(id, at).map(u64::from).unwrap_or(0);
    let cookie = half(40) | half(44) << 32;
    let address = DiagError::Malformed("socket address");
    let mut socket = DiagSocket {
        family,
        // Dumps ask only for states this type names: anything else is a broken reply.
        state: TcpState::from_raw(u32::from(state))
            .ok_or(DiagError::Malformed("unknown TCP state"))?,
        timer,
        local: parse_addr(family, &id[4..20], sport)
            .ok_or(DiagError::Malformed("socket address"))?,
        remote: parse_addr(family, &id[20..36], dport).ok_or(address)?,
        interface: u32_at(4 + 36)?,
        cookie,
        timer_expires_ms: u32_at(52)?,
        rqueue: u32_at(56)?,
        wqueue: u32_at(60)?,
        inode: u32_at(68)?,
        drops: None,
        tcp: None,
        activity: None,
    };
    let mut attrs = &payload[DIAG_MSG_LEN..];
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        let value = attrs
            .get(4..len)
            .filter(|_| len >= 4)
            .ok_or(DiagError::Malformed("attribute length"))?;
        match kind & NLA_TYPE_MASK {
            INET_DIAG_INFO => socket.tcp = Some(TcpInfo::parse(value)),
            INET_DIAG_SKMEMINFO => socket.drops = super::ne_u32(value, SK_MEMINFO_DROPS * 4),
            INET_DIAG_SK_BPF_STORAGES => socket.activity = storage_value(value),
            _ => {}
        }
        attrs = attrs.get(align4(len)..).unwrap_or_default();
    }
    Ok(socket)
}

/// The attributes nested in `nest`: (type without flags, value), as far as they are well formed.
fn nested(nest: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = nest;
    std::iter::from_fn(move || {
        let (len, kind) = (usize::from(super::ne_u16(rest, 0)?), super::ne_u16(rest, 2)?);
        let value = rest.get(4..len).filter(|_| len >= 4)?;
        rest = rest.get(align4(len)..).unwrap_or_default();
        Some((kind & NLA_TYPE_MASK, value))
    })
}

/// The one storage map's value a dump asked for: SK_DIAG_BPF_STORAGE { MAP_ID, MAP_VALUE }.
fn storage_value(storages: &[u8]) -> Option<SockActivity> {
    let (_, storage) = nested(storages).find(|(kind, _)| *kind == SK_DIAG_BPF_STORAGE)?;
    let (_, value) = nested(storage).find(|(kind, _)| *kind == SK_DIAG_BPF_STORAGE_MAP_VALUE)?;
    if value.len() < size_of::<SockActivity>() {
        return None;
    }
    // SAFETY: at least size_of::<SockActivity>() bytes, read unaligned; any bytes make a valid
    // SockActivity (plain integers).
    Some(unsafe { std::ptr::read_unaligned(value.as_ptr().cast::<SockActivity>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_msg(family: u8) -> Vec<u8> {
        let id = SockId {
            local: if family == libc::AF_INET as u8 {
                "127.0.0.1:8080".parse().unwrap()
            } else {
                "[::1]:8080".parse().unwrap()
            },
            remote: if family == libc::AF_INET as u8 {
                "10.1.2.3:51234".parse().unwrap()
            } else {
                "[2001:db8::7]:51234".parse().unwrap()
            },
            interface: 0,
            cookie: 0x1_0000_0002,
        };
        let mut msg = vec![family, 1, 2, 0];
        encode_sockid(&mut msg, &id);
        for v in [7000u32, 5, 10, 1000, 4242] {
            msg.extend_from_slice(&v.to_ne_bytes());
        }
        // An attribute the parser does not use (INET_DIAG_SHUTDOWN, len 5, padded to 8).
        const INET_DIAG_SHUTDOWN: u16 = 8;
        msg.extend_from_slice(&5u16.to_ne_bytes());
        msg.extend_from_slice(&INET_DIAG_SHUTDOWN.to_ne_bytes());
        msg.extend_from_slice(&[1, 0, 0, 0]);
        // INET_DIAG_SKMEMINFO: nine u32 counters, drops last.
        msg.extend_from_slice(&(4u16 + 36).to_ne_bytes());
        msg.extend_from_slice(&INET_DIAG_SKMEMINFO.to_ne_bytes());
        for v in 0u32..9 {
            msg.extend_from_slice(&(v * 100).to_ne_bytes());
        }
        msg
    }

    #[test]
    fn parses_ipv4_message() {
        let s = parse_diag_msg(&sample_msg(libc::AF_INET as u8)).unwrap();
        assert_eq!(s.local.to_string(), "127.0.0.1:8080");
        assert_eq!(s.remote.to_string(), "10.1.2.3:51234");
        assert_eq!((s.state, s.timer, s.timer_expires_ms), (TcpState::Established, 2, 7000));
        assert_eq!((s.rqueue, s.wqueue, s.inode), (5, 10, 4242));
        assert_eq!(s.cookie, 0x1_0000_0002);
        assert_eq!(s.drops, Some(800));
        assert!(s.tcp.is_none());
    }

    #[test]
    fn parses_ipv6_message() {
        let s = parse_diag_msg(&sample_msg(libc::AF_INET6 as u8)).unwrap();
        assert_eq!(s.local.to_string(), "[::1]:8080");
        assert_eq!(s.remote.to_string(), "[2001:db8::7]:51234");
    }

    #[test]
    fn rejects_truncated_messages() {
        let msg = sample_msg(libc::AF_INET as u8);
        assert!(parse_diag_msg(&msg[..40]).is_err());
        let mut bad_attr = msg.clone();
        let at = DIAG_MSG_LEN;
        bad_attr[at..at + 2].copy_from_slice(&200u16.to_ne_bytes());
        assert!(parse_diag_msg(&bad_attr).is_err());
    }

    #[test]
    fn port_filter_keeps_the_servers_sockets_and_drops_its_local_clients() {
        let filter = PortFilter::NotLoopbackClientOf(vec![8080, 8443, 9000]);
        let code = filter.bytecode();
        // The server's accepted connections and listeners.
        assert!(run_bytecode(&code, 8080, 51000));
        assert!(run_bytecode(&code, 9000, 0));
        // Its outbound connections, and anyone else's unrelated sockets.
        assert!(run_bytecode(&code, 40000, 5432));
        // Clients of the server on this host: not its sockets.
        assert!(!run_bytecode(&code, 51000, 8080));
        assert!(!run_bytecode(&code, 51001, 8443));
        let v6_loopback = std::net::Ipv6Addr::LOCALHOST.into();
        let mapped = std::net::Ipv4Addr::new(127, 0, 0, 2).to_ipv6_mapped().into();
        assert!(!run_bytecode_to(&code, 51002, v6_loopback, 8080));
        assert!(!run_bytecode_to(&code, 51003, mapped, 8080));
        // Its calls to another host's service on a port it also listens on: its own.
        let elsewhere: std::net::IpAddr = std::net::Ipv4Addr::new(10, 0, 0, 9).into();
        assert!(run_bytecode_to(&code, 40000, elsewhere, 8080));
        assert!(run_bytecode_to(&code, 40000, "fd00::9".parse().unwrap(), 8443));
        assert!(run_bytecode_to(&code, 40000, "::ffff:10.0.0.9".parse().unwrap(), 8080));
        assert!(run_bytecode_to(&code, 40000, "::2".parse().unwrap(), 8080));
        let single = PortFilter::NotLoopbackClientOf(vec![80]).bytecode();
        assert!(
            run_bytecode(&single, 80, 1)
                && !run_bytecode(&single, 1, 80)
                && run_bytecode(&single, 1, 2)
                && run_bytecode_to(&single, 1, elsewhere, 80)
        );
        assert!(PortFilter::NotLoopbackClientOf(vec![]).bytecode().is_empty());
    }

    #[test]
    fn remote_port_ranges_split_a_dump_exactly() {
        let low = PortFilter::RemotePorts { from: 0, to: 32768 }.bytecode();
        let high = PortFilter::RemotePorts { from: 32768, to: 65536 }.bytecode();
        for dport in [0, 1, 1024, 32767, 32768, 40000, 65535] {
            assert_ne!(run_bytecode(&low, 80, dport), run_bytecode(&high, 80, dport), "{dport}");
        }
        let both = PortFilter::Both(
            Box::new(PortFilter::NotLoopbackClientOf(vec![8080])),
            Box::new(PortFilter::RemotePorts { from: 32768, to: 65536 }),
        )
        .bytecode();
        assert!(run_bytecode(&both, 8080, 40000));
        assert!(!run_bytecode(&both, 8080, 1000), "outside the range");
        assert!(!run_bytecode(&both, 40000, 8080), "a client of the server");
        let open_ended = PortFilter::Both(
            Box::new(PortFilter::NotLoopbackClientOf(vec![])),
            Box::new(PortFilter::RemotePorts { from: 0, to: 32768 }),
        )
        .bytecode();
        assert!(run_bytecode(&open_ended, 1, 5) && !run_bytecode(&open_ended, 1, 50000));
    }

    #[test]
    fn either_port_filter_keeps_both_ends_of_the_given_ports() {
        let code = PortFilter::Either(vec![8080, 5432]).bytecode();
        assert!(run_bytecode(&code, 8080, 40000));
        assert!(run_bytecode(&code, 40000, 5432));
        assert!(run_bytecode(&code, 5432, 8080));
        assert!(!run_bytecode(&code, 40000, 40001));
    }

    #[test]
    fn request_carries_cookie_halves() {
        let id = SockId {
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:2".parse().unwrap(),
            interface: 0,
            cookie: 0xAABB_CCDD_0011_2233,
        };
        let req = encode_request(libc::AF_INET as u8, u32::MAX, Extensions::NONE, Some(&id));
        assert_eq!(req.len(), REQ_LEN);
        assert_eq!(&req[8 + 40..8 + 44], &0x0011_2233u32.to_ne_bytes());
        assert_eq!(&req[8 + 44..8 + 48], &0xAABB_CCDDu32.to_ne_bytes());
    }

    #[test]
    fn compat_request_is_struct_inet_diag_req() {
        let req = encode_compat_request(1 << 1, Extensions::INFO);
        assert_eq!(req.len(), COMPAT_REQ_LEN);
        assert_eq!(req[3], Extensions::INFO.0);
        assert_eq!(&req[4 + SOCKID_LEN..4 + SOCKID_LEN + 4], &2u32.to_ne_bytes());
    }
}
