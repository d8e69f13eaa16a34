//! observer's BPF programs. Every backend records into the same maps (see `activity`), so the agent
//! reads one format whichever probes the kernel allowed.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// BPF has atomic add but no compare-and-swap, so core::sync::atomic offers no fetch_add there.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

mod activity;
mod fentry;
mod filter;
mod kprobe;
mod resets;
mod sleeps;
mod store;
mod syscall_timing;
mod tcp_calls;
mod tracepoint;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves BPF code cannot panic; this is only here to satisfy no_std.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
