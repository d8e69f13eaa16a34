//! What the kernel says, and nothing else: the BPF probes and their maps, the sock_diag socket
//! table (per network namespace), /proc, BTF and system settings. Nothing here knows what a stuck
//! connection is.
pub mod btf;
pub mod netns;
pub mod privileges;
pub mod probes;
pub mod procfs;
pub mod sock_diag;
pub mod syscalls;
pub mod system;
pub mod tcp_info;

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

/// The native-endian integer at `at` in bytes the kernel wrote, if they reach that far.
pub fn ne_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

pub fn ne_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

pub fn ne_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(bytes.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// SO_COOKIE: the socket's cookie, the number sock_diag and the probes know it by.
pub fn socket_cookie(socket: &impl AsFd) -> io::Result<u64> {
    let mut value = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: value and len are valid for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}
