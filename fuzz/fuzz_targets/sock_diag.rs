#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| observer::fuzzing::sock_diag(data));
