//! struct tcp_info (include/uapi/linux/tcp.h) as sock_diag returns it. Older kernels send a
//! shorter struct; fields beyond what was sent read as zero.

/// The tcp_info fields the detectors use. Times are milliseconds, sizes bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpInfo {
    pub state: u8,
    /// Consecutive unanswered retransmission timeouts (resets when the peer acknowledges).
    pub retransmits: u8,
    /// Unanswered zero-window or keepalive probes.
    pub probes: u8,
    /// Exponential backoff of the retransmission timer.
    pub backoff: u8,
    pub rto_us: u32,
    /// Segments sent but not yet acknowledged.
    pub unacked: u32,
    /// Time since data was last sent / received / an ACK was last received.
    pub last_data_sent_ms: u32,
    pub last_data_recv_ms: u32,
    pub last_ack_recv_ms: u32,
    pub total_retrans: u32,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// Bytes the application wrote that TCP has not sent yet.
    pub notsent_bytes: u32,
    pub bytes_sent: u64,
    /// The peer's advertised receive window.
    pub snd_wnd: u32,
}

impl TcpInfo {
    pub fn parse(raw: &[u8]) -> TcpInfo {
        let u8_at = |at: usize| raw.get(at).copied().unwrap_or(0);
        let u32_at = |at: usize| super::ne_u32(raw, at).unwrap_or(0);
        let u64_at = |at: usize| super::ne_u64(raw, at).unwrap_or(0);
        TcpInfo {
            state: u8_at(0),
            retransmits: u8_at(2),
            probes: u8_at(3),
            backoff: u8_at(4),
            rto_us: u32_at(8),
            unacked: u32_at(24),
            last_data_sent_ms: u32_at(44),
            last_data_recv_ms: u32_at(52),
            last_ack_recv_ms: u32_at(56),
            total_retrans: u32_at(100),
            bytes_acked: u64_at(120),
            bytes_received: u64_at(128),
            notsent_bytes: u32_at(144),
            bytes_sent: u64_at(200),
            snd_wnd: u32_at(228),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_at_their_uapi_offsets() {
        let mut raw = vec![0u8; 240];
        raw[0] = 1;
        raw[2] = 3;
        raw[24..28].copy_from_slice(&7u32.to_ne_bytes());
        raw[44..48].copy_from_slice(&1500u32.to_ne_bytes());
        raw[52..56].copy_from_slice(&2500u32.to_ne_bytes());
        raw[128..136].copy_from_slice(&99u64.to_ne_bytes());
        raw[200..208].copy_from_slice(&1234u64.to_ne_bytes());
        raw[228..232].copy_from_slice(&65536u32.to_ne_bytes());
        let info = TcpInfo::parse(&raw);
        assert_eq!((info.state, info.retransmits, info.unacked), (1, 3, 7));
        assert_eq!((info.last_data_sent_ms, info.last_data_recv_ms), (1500, 2500));
        assert_eq!((info.bytes_received, info.bytes_sent, info.snd_wnd), (99, 1234, 65536));
    }

    #[test]
    fn short_struct_from_old_kernel_reads_zero_beyond_its_end() {
        let mut raw = vec![0u8; 104];
        raw[44..48].copy_from_slice(&10u32.to_ne_bytes());
        let info = TcpInfo::parse(&raw);
        assert_eq!(info.last_data_sent_ms, 10);
        assert_eq!(info.bytes_sent, 0);
    }
}
