#![no_main]
libfuzzer_sys::fuzz_target!(
    init: sidecar_fuzz::write_seeds_if_asked("wg_datagram"),
    |data: &[u8]| sidecar_fuzz::targets::wg_datagram(data)
);
