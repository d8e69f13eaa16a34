//! Hash maps keyed by integers the agent controls or the kernel hands out (cookies, inodes,
//! pids), with a multiply-shift hash instead of SipHash: per-socket maps at 100k sockets spend
//! most of their time hashing otherwise, and these keys come from the kernel, not from peers.
use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasherDefault, Hasher},
};

#[derive(Default, Clone, Copy)]
pub struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: spreads sequential keys over the whole range, top bits included.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_i32(&mut self, n: i32) {
        self.write_u64(n as u32 as u64);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;
pub type FastSet<K> = HashSet<K, BuildHasherDefault<IntHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_keys_differ_in_their_top_bits() {
        let hash = |n: u64| {
            let mut h = IntHasher::default();
            h.write_u64(n);
            h.finish() >> 57
        };
        let distinct: FastSet<u64> = (0..64).map(hash).collect();
        assert!(distinct.len() > 32, "hashbrown uses the top 7 bits as tags");
    }
}
