//! A minimal writer for the "newc" cpio format the kernel unpacks as an initramfs (so building
//! one needs no cpio tool).
use std::io::{self, Write};

pub struct Cpio<W: Write> {
    out: W,
    next_ino: u32,
    written: usize,
}

const DIR: u32 = 0o040_755;
const FILE: u32 = 0o100_755;
const SYMLINK: u32 = 0o120_777;

impl<W: Write> Cpio<W> {
    pub fn new(out: W) -> Self {
        Cpio { out, next_ino: 1, written: 0 }
    }

    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        self.entry(path, DIR, &[])
    }

    pub fn file(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        self.entry(path, FILE, data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, SYMLINK, target.as_bytes())
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, &[])?;
        Ok(self.out)
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode == DIR { 2 } else { 1 };
        let fields =
            [ino, mode, 0, 0, nlink, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
        let mut header = String::from("070701");
        for f in fields {
            header.push_str(&format!("{f:08X}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len();
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.write(&[0; 3][..pad])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_four_byte_aligned_and_trailer_terminated() {
        let mut c = Cpio::new(Vec::new());
        c.dir("/bin").unwrap();
        c.file("/init", b"#!/bin/sh\n").unwrap();
        c.symlink("/bin/sh", "busybox").unwrap();
        let out = c.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("bin\0") && text.contains("init\0") && text.contains("TRAILER!!!"));
        // Name and data are each padded to 4 bytes.
        assert_eq!(text.find("#!/bin/sh").unwrap() % 4, 0);
        // File size of /init is in the 7th field of its header.
        let init_at = text.find("init\0").unwrap();
        let header = &text[init_at - 110..init_at];
        assert_eq!(&header[6 + 6 * 8..6 + 7 * 8], "0000000A");
    }
}
