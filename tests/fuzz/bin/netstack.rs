#![no_main]
libfuzzer_sys::fuzz_target!(
    init: sidecar_fuzz::write_seeds_if_asked("netstack"),
    |data: &[u8]| sidecar_fuzz::targets::netstack(data)
);
