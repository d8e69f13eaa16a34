//! Two network namespaces joined by a veth pair: a server side and a client side with real,
//! non-loopback addresses, where packets can be made to vanish with nftables.
use std::{
    fs::File,
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

pub const SERVER_IP: &str = "10.77.0.1";
pub const CLIENT_IP: &str = "10.77.0.2";

pub struct NetPair {
    pub server: String,
    pub client: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn nft(netns: &str, script: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(script.as_bytes())?;
            child.wait_with_output()
        })
        .expect("run nft (install nftables)");
    assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
}

impl NetPair {
    /// Creates the namespaces and the link (not `Default`: it changes the machine).
    pub fn create() -> NetPair {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!("obs{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let pair = NetPair { server: format!("{id}-s"), client: format!("{id}-c") };
        ip(&["netns", "add", &pair.server]);
        ip(&["netns", "add", &pair.client]);
        ip(&[
            "-n",
            &pair.server,
            "link",
            "add",
            "veth0",
            "type",
            "veth",
            "peer",
            "name",
            "veth1",
            "netns",
            &pair.client,
        ]);
        for (ns, addr) in [(&pair.server, SERVER_IP), (&pair.client, CLIENT_IP)] {
            let dev = if ns == &pair.server { "veth0" } else { "veth1" };
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// Connects to `addr` from the client namespace (the socket lives there).
    pub fn connect(&self, addr: SocketAddr) -> TcpStream {
        let ns = File::open(format!("/var/run/netns/{}", self.client)).expect("open netns");
        std::thread::spawn(move || {
            // SAFETY: setns on this short-lived thread only.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .expect("connect from client netns")
        })
        .join()
        .unwrap()
    }

    /// From now on the client side silently drops every packet that reaches it: to the server,
    /// the peer has vanished.
    pub fn drop_client_traffic(&self) {
        nft(
            &self.client,
            "table inet vanish {\n  chain input {\n    type filter hook input priority 0; policy drop;\n  }\n}\n",
        );
    }

    /// Undoes [`Self::drop_client_traffic`].
    pub fn restore_client_traffic(&self) {
        nft(&self.client, "delete table inet vanish");
    }

    /// From now on the server side silently drops connection requests (SYNs) to `port`, as a
    /// host behind a firewall that drops, or under a SYN flood, does: a client's connect() to
    /// it retries its SYN for minutes.
    pub fn drop_syns_to(&self, port: u16) {
        nft(
            &self.server,
            &format!(
                "table inet syndrop{port} {{\n  chain input {{\n    type filter hook input \
                 priority 0; policy accept;\n    tcp dport {port} tcp flags & (syn | ack) == syn \
                 drop\n  }}\n}}\n"
            ),
        );
    }

    /// Undoes [`Self::drop_syns_to`]: the next SYN retransmission gets through.
    pub fn allow_syns_to(&self, port: u16) {
        nft(&self.server, &format!("delete table inet syndrop{port}"));
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.server, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
