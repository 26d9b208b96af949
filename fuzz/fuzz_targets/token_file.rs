#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| coda::fuzzing::token_file(data));
