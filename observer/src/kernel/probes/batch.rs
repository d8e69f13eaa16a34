//! Reading a whole BPF hash map with BPF_MAP_LOOKUP_BATCH: a few syscalls for thousands of
//! entries, where iterating keys costs two syscalls per entry. (aya 0.14 has no batch API.)
use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call. A hash bucket's entries come back together, so this must exceed
/// the longest bucket (ENOSPC otherwise, and the call is retried with more room).
const CHUNK: u32 = 4096;

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Calls `each` with every (key, value) in the hash map `map`, a batch at a time into one
/// reused buffer. `K` and `V` must be the map's key and value types: plain data ([`Pod`]), which
/// any bytes the kernel writes make valid.
pub fn for_each<K: Pod, V: Pod>(map: BorrowedFd<'_>, mut each: impl FnMut(K, V)) -> io::Result<()> {
    let mut chunk = CHUNK;
    let mut keys: Vec<MaybeUninit<K>> = Vec::new();
    let mut values: Vec<MaybeUninit<V>> = Vec::new();
    // The batch position token: a bucket index, opaque to us; 8 bytes covers every map type.
    let (mut position, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        keys.resize(chunk as usize, MaybeUninit::uninit());
        values.resize(chunk as usize, MaybeUninit::uninit());
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const position) as u64 },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: attr points at buffers with room for `chunk` keys and values, and outlives the
        // call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let last_batch = if rc < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENOSPC) => {
                    chunk *= 2;
                    continue;
                }
                Some(libc::ENOENT) => true,
                _ => return Err(err),
            }
        } else {
            false
        };
        for i in 0..attr.count as usize {
            // SAFETY: the kernel filled the first `count` keys and values, and any bytes are a
            // valid K and V (Pod).
            unsafe { each(keys[i].assume_init(), values[i].assume_init()) };
        }
        if last_batch {
            return Ok(()); // ENOENT: that was the last batch
        }
        position = next;
        first = false;
    }
}
