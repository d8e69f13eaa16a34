//! What the kernel knows about sockets: the sock_diag table and, per network namespace, a netlink
//! socket to read it from.
pub mod netns;
pub mod sock_diag;
pub mod tcp_info;
