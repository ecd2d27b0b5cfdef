#![no_main]
libfuzzer_sys::fuzz_target!(
    init: sidecar_fuzz::write_seeds_if_asked("api_body"),
    |data: &[u8]| sidecar_fuzz::targets::api_body(data)
);
